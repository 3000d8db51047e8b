//! Loading a snapshot: the request, then its chunks and meta in one SQLite transaction.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use bytes::Bytes;
use futures_util::StreamExt;
use rmpv::Value;

use super::{open_stream, ordered, Mirror, MirrorError, Position, BRIDGE_WAIT, REQUEST_TIMEOUT};
use crate::wire::decode;
use crate::wire::fields;
use crate::wire::subject::{
    snapshot_chunks_filter, snapshot_meta_subject, snapshot_request_subject,
};

impl Mirror {
    /// Requests a snapshot of the table and loads it with its position, replacing the table's
    /// rows. Returns false when stopped by shutdown (nothing changed then).
    pub(super) async fn snapshot(&mut self, token: &str) -> Result<bool, MirrorError> {
        let js_err = |e: &dyn std::fmt::Display| MirrorError::JetStream(e.to_string());
        let init = open_stream(&self.js, &self.init).await?;
        loop {
            // Subscribed before the request, so the meta cannot be missed.
            let meta_subject = snapshot_meta_subject(token);
            let mut metas = ordered(&init, meta_subject, DeliverPolicy::New).await?;
            let Some(id) = self.request_snapshot(token).await? else {
                return Ok(false);
            };
            log::info!("snapshot {id} of {token} requested");
            let chunk_subjects = snapshot_chunks_filter(token, &id);
            let mut chunks = ordered(&init, chunk_subjects, DeliverPolicy::All).await?;
            self.store.begin()?;
            self.store.clear(token)?;
            let mut loaded = 0u64;
            let mut rows = 0u64;
            let mut meta: Option<(Position, u64)> = None;
            let mut progress = Instant::now();
            let outcome = loop {
                if let Some((position, batches)) = &meta {
                    if loaded == *batches {
                        self.store.set_position(token, position)?;
                        self.store.commit()?;
                        break Some(position.clone());
                    }
                }
                if self.shutdown.is_triggered() {
                    self.store.rollback()?;
                    return Ok(false);
                }
                if progress.elapsed() > self.options.snapshot_stall {
                    log::warn!(
                        "snapshot {id} of {token}: nothing arrived for {:?} (was the bridge \
                         stopped?); requesting a new one",
                        self.options.snapshot_stall
                    );
                    self.store.rollback()?;
                    break None;
                }
                tokio::select! {
                    m = chunks.next() => {
                        let msg = m.ok_or_else(|| js_err(&"chunk consumer ended"))?
                            .map_err(|e| js_err(&e))?;
                        let chunk = self.decode(&msg)?;
                        let n = decode::u64_field(&chunk, fields::CHUNK).map_err(|e| self.bad(&msg, e))?;
                        if n != loaded {
                            self.store.rollback()?;
                            return Err(self.bad(&msg, format!("chunk {n} came where {loaded} was due")));
                        }
                        let data = match decode::field(&chunk, fields::DATA) {
                            Some(Value::Array(d)) => d,
                            _ => return Err(self.bad(&msg, "chunk without a data list")),
                        };
                        for row in data {
                            let pairs = decode::row_pairs(row).map_err(|e| self.bad(&msg, e))?;
                            let names: Vec<&str> = pairs.iter().map(|p| p.0).collect();
                            self.ensure_columns(token, &names).await?;
                            self.store.upsert(token, &pairs)?;
                        }
                        rows += data.len() as u64;
                        loaded += 1;
                        progress = Instant::now();
                    }
                    m = metas.next() => {
                        let msg = m.ok_or_else(|| js_err(&"meta consumer ended"))?
                            .map_err(|e| js_err(&e))?;
                        let doc = self.decode(&msg)?;
                        if decode::str_field(&doc, fields::SNAPSHOT_ID).ok() != Some(id.as_str()) {
                            continue; // another consumer's snapshot of the same table
                        }
                        if let Some(err) = decode::field(&doc, fields::ERROR) {
                            self.store.rollback()?;
                            return Err(MirrorError::SnapshotFailed {
                                table: token.to_owned(),
                                snapshot_id: id,
                                reason: err.as_str().map_or_else(|| err.to_string(), str::to_owned),
                            });
                        }
                        let position = Position {
                            snapshot_id: id.clone(),
                            lsn: decode::lsn_field(&doc, fields::LSN).map_err(|e| self.bad(&msg, e))?,
                            last_seq: decode::u64_field(&doc, fields::CDC_STREAM_SEQ).map_err(|e| self.bad(&msg, e))?,
                        };
                        let batches = decode::u64_field(&doc, fields::BATCH_COUNT).map_err(|e| self.bad(&msg, e))?;
                        meta = Some((position, batches));
                        progress = Instant::now();
                    }
                    // Wakes for the stall check, or at once on shutdown.
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = self.shutdown.triggered() => {}
                }
            };
            if let Some(p) = outcome {
                self.summary.snapshots += 1;
                self.summary.snapshot_rows += rows;
                log::info!(
                    "snapshot {id} of {token}: {rows} rows loaded, consistent point {}, CDC from \
                     sequence {}",
                    p.lsn,
                    p.last_seq + 1
                );
                return Ok(true);
            }
        }
    }

    /// Sends the snapshot request until the bridge accepts it: the snapshot id, or `None` on
    /// shutdown.
    async fn request_snapshot(&self, token: &str) -> Result<Option<String>, MirrorError> {
        let subject = snapshot_request_subject(token);
        let deadline = Instant::now() + BRIDGE_WAIT;
        let mut warned = false;
        loop {
            if self.shutdown.is_triggered() {
                return Ok(None);
            }
            let reply = tokio::time::timeout(
                REQUEST_TIMEOUT,
                self.client.request(subject.clone(), Bytes::new()),
            )
            .await;
            match reply {
                Ok(Ok(msg)) => {
                    let answer: serde_json::Value =
                        serde_json::from_slice(&msg.payload).unwrap_or_default();
                    if answer[fields::STATUS] == fields::STATUS_ACCEPTED {
                        if let Some(id) = answer[fields::SNAPSHOT_ID].as_str() {
                            return Ok(Some(id.to_owned()));
                        }
                    }
                    let reason = answer[fields::ERROR].as_str().map_or_else(
                        || String::from_utf8_lossy(&msg.payload).into_owned(),
                        str::to_owned,
                    );
                    // Passing refusals: a snapshot of this table runs or just started (another
                    // consumer's), or the bridge runs as many as it allows.
                    let passing = matches!(
                        answer[fields::REASON].as_str(),
                        Some(
                            fields::REASON_IN_PROGRESS
                                | fields::REASON_COOLDOWN
                                | fields::REASON_BUSY
                        )
                    ) || reason.contains("already in progress");
                    if !passing {
                        return Err(MirrorError::SnapshotRefused {
                            table: token.to_owned(),
                            reason,
                        });
                    }
                    // Ask again shortly.
                }
                Ok(Err(e)) => {
                    if !warned {
                        log::warn!("snapshot request on {subject}: {e}; retrying");
                        warned = true;
                    }
                }
                Err(_) => {
                    if !warned {
                        log::warn!("snapshot request on {subject}: no reply in {REQUEST_TIMEOUT:?}; retrying");
                        warned = true;
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(MirrorError::NoBridge { subject });
            }
            if self.shutdown.sleep(Duration::from_secs(1)).await {
                return Ok(None);
            }
        }
    }
}
