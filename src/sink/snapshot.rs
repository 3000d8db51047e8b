//! The snapshot service: answers `snapshot.request.{table}` (core NATS request/reply), takes
//! a consistent snapshot of the table (see [`crate::pg::snapshot`]) and publishes it to the
//! INIT stream as chunks `init.snap.{table}.{snapshot_id}.{chunk}`, followed by
//! `init.meta.{table}` with the consistent point and the CDC stream sequence to continue from.
//!
//! Replies are JSON whatever the message format, so they can be read with `nats req`:
//! `{"status":"accepted","snapshot_id":...,"table":...}` or `{"status":"error","error":...}`.
//! Snapshots run on their own threads: change streaming never waits for them, and a request
//! never takes the bridge down.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::config::{Config, Format};
use crate::pg::setup::PublishedTable;
use crate::pg::snapshot::{take_snapshot, SnapshotColumns};
use crate::pg::Lsn;
use crate::shutdown::Shutdown;

use super::encode::{encode_chunk, encode_document, ChunkHeader, ChunkRows};
use super::nats::{stream_last_sequence, INIT_SUBJECT_PREFIX};
use super::schemas::{SchemaWriter, SCHEMAS_BUCKET};
use super::subject::{parse_table_token, push_table_token};

/// Subject prefix of snapshot requests.
pub const REQUEST_PREFIX: &str = "snapshot.request";
/// How long publishing one chunk may take before the snapshot fails.
const CHUNK_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunks whose PubAck may be outstanding at once. Waiting for each ack before reading on
/// would make PostgreSQL, the bridge and nats-server take turns; with a few chunks in flight
/// they work at the same time. A chunk is at most about half the server's max_payload, so
/// this keeps at most two max_payloads of chunks in flight.
const CHUNK_ACK_WINDOW: usize = 4;

/// Everything a snapshot needs, shared by the request handler and snapshot threads.
pub struct SnapshotService {
    js: Context,
    rt: tokio::runtime::Handle,
    pg_params: Vec<(&'static str, String)>,
    publication: String,
    cdc_stream: String,
    format: Format,
    chunk_rows: usize,
    tables: Vec<PublishedTable>,
    busy: Mutex<HashSet<(String, String)>>,
    shutdown: Shutdown,
}

impl SnapshotService {
    /// A service for `tables` (the tables the bridge streams).
    pub fn new(
        config: &Config,
        js: Context,
        rt: tokio::runtime::Handle,
        tables: Vec<PublishedTable>,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        Arc::new(SnapshotService {
            js,
            rt,
            pg_params: config.postgres.libpq_params(),
            publication: config.replication.publication.clone(),
            cdc_stream: config.streams.cdc.clone(),
            format: config.replication.format,
            chunk_rows: config.snapshot.chunk_rows,
            tables,
            busy: Mutex::new(HashSet::new()),
            shutdown,
        })
    }

    /// Serves requests, and keeps the schemas bucket current from `schema_changes` (tables
    /// whose Relation message arrived), until shutdown. Runs on the runtime of `self.rt`.
    pub async fn serve(
        self: Arc<Self>,
        client: async_nats::Client,
        mut schemas: Option<SchemaWriter>,
        mut schema_changes: tokio::sync::mpsc::UnboundedReceiver<(Arc<str>, Arc<str>)>,
    ) {
        if let Some(w) = schemas.as_mut() {
            for t in &self.tables {
                match w.refresh(&t.schema, &t.name).await {
                    Ok(true) => log::info!(
                        "schema of {} written to KV bucket {SCHEMAS_BUCKET}",
                        t.qualified()
                    ),
                    Ok(false) => {}
                    Err(e) => log::warn!("{e}"),
                }
            }
        }
        let mut sub = match client.subscribe(format!("{REQUEST_PREFIX}.>")).await {
            Ok(s) => s,
            Err(e) => {
                log::error!(
                    "cannot subscribe to {REQUEST_PREFIX}.>: {e}; snapshots are unavailable"
                );
                return;
            }
        };
        log::info!("snapshot requests served on {REQUEST_PREFIX}.{{table}}");
        while !self.shutdown.is_triggered() {
            let msg = tokio::select! {
                m = sub.next() => match m {
                    Some(m) => m,
                    None => break,
                },
                Some((schema, table)) = schema_changes.recv() => {
                    if let Some(w) = schemas.as_mut() {
                        match w.refresh(&schema, &table).await {
                            Ok(true) => log::info!("schema of {schema}.{table} changed: new revision in KV bucket {SCHEMAS_BUCKET}"),
                            Ok(false) => {}
                            Err(e) => log::warn!("{e}"),
                        }
                    }
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
            };
            let reply = self.handle_request(msg.subject.as_str());
            if let Some(to) = msg.reply {
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                if let Err(e) = client.publish(to, Bytes::from(body)).await {
                    log::warn!("snapshot reply not sent: {e}");
                }
            }
        }
    }

    /// Validates a request and starts the snapshot; the reply document.
    fn handle_request(self: &Arc<Self>, subject: &str) -> serde_json::Value {
        let error = |e: String| serde_json::json!({"status": "error", "error": e});
        let Some(token) = subject
            .strip_prefix(REQUEST_PREFIX)
            .and_then(|t| t.strip_prefix('.'))
        else {
            return error(format!(
                "malformed subject {subject:?}: expected {REQUEST_PREFIX}.{{table}}"
            ));
        };
        let (schema, table) = match parse_table_token(token) {
            Ok(st) => st,
            Err(e) => {
                return error(format!(
                    "malformed subject {subject:?}: {e} (expected {REQUEST_PREFIX}.{{table}} or {REQUEST_PREFIX}.{{schema}}.{{table}})"
                ))
            }
        };
        if !self
            .tables
            .iter()
            .any(|t| t.schema == schema && t.name == table)
        {
            let known: Vec<String> = self.tables.iter().map(PublishedTable::qualified).collect();
            return error(format!(
                "unknown table {schema}.{table}: this bridge streams {}",
                if known.is_empty() {
                    "no tables".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
        {
            let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
            if !busy.insert((schema.clone(), table.clone())) {
                return error(format!(
                    "a snapshot of {schema}.{table} is already in progress"
                ));
            }
        }
        let snapshot_id = new_snapshot_id();
        let me = Arc::clone(self);
        let (s, t, id) = (schema.clone(), table.clone(), snapshot_id.clone());
        let spawned = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                match me.run_snapshot(&s, &t, &id) {
                    Ok((lsn, rows, chunks)) => log::info!(
                        "snapshot {id} of {s}.{t}: {rows} rows in {chunks} chunks, consistent point {lsn}"
                    ),
                    Err(e) => log::error!("snapshot {id} of {s}.{t} failed: {e}"),
                }
                me.busy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(s, t));
            });
        if let Err(e) = spawned {
            self.busy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(schema.clone(), table.clone()));
            return error(format!("cannot start the snapshot: {e}"));
        }
        serde_json::json!({"status": "accepted", "snapshot_id": snapshot_id, "table": table, "schema": schema})
    }

    /// Publishes one message; its PubAck is awaited with [`Self::wait_ack`].
    fn send(
        &self,
        subject: String,
        id: String,
        payload: Vec<u8>,
    ) -> Result<(String, PublishAckFuture), String> {
        self.rt.block_on(async {
            let msg = PublishMessage::build()
                .payload(Bytes::from(payload))
                .message_id(id);
            match self.js.send_publish(subject.clone(), msg).await {
                Ok(ack) => Ok((subject, ack)),
                Err(e) => Err(format!("publish to {subject}: {e}")),
            }
        })
    }

    /// Waits for the PubAck of a message published to `subject`.
    fn wait_ack(&self, (subject, ack): (String, PublishAckFuture)) -> Result<(), String> {
        self.rt.block_on(async {
            tokio::time::timeout(CHUNK_ACK_TIMEOUT, ack)
                .await
                .map_err(|_| format!("no PubAck for {subject} within {CHUNK_ACK_TIMEOUT:?}"))?
                .map_err(|e| format!("publish to {subject}: {e}"))?;
            Ok(())
        })
    }

    /// Takes and publishes the snapshot: (consistent point, rows, chunks).
    fn run_snapshot(&self, schema: &str, table: &str, id: &str) -> Result<(Lsn, u64, u64), String> {
        // Read before the slot exists: consumers continue the CDC stream after this sequence.
        let cdc_stream_seq = self
            .rt
            .block_on(stream_last_sequence(&self.js, &self.cdc_stream))
            .map_err(|e| e.to_string())?;
        let mut token = String::new();
        push_table_token(&mut token, schema, table);
        let params: Vec<(&str, &str)> = self
            .pg_params
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let mut rows = ChunkRows::new(self.format);
        let mut out = Vec::new();
        // Half the server's limit leaves room for the chunk's own fields and the next row.
        let max_chunk_bytes = self.js.client().server_info().max_payload / 2;
        // Consistent point and column names, set before the first row.
        let started: std::cell::RefCell<(Lsn, Vec<Arc<str>>)> = Default::default();
        let mut chunk = 0u64;
        // Chunks published and not yet acknowledged, oldest first.
        let mut in_flight = VecDeque::with_capacity(CHUNK_ACK_WINDOW);
        let flush = |rows: &mut ChunkRows,
                     chunk: &mut u64,
                     out: &mut Vec<u8>,
                     in_flight: &mut VecDeque<_>,
                     lsn: Lsn|
         -> Result<(), String> {
            let header = ChunkHeader {
                table,
                schema,
                snapshot_id: id,
                chunk: *chunk,
                lsn,
            };
            encode_chunk(self.format, &header, rows, out);
            if in_flight.len() >= CHUNK_ACK_WINDOW {
                if let Some(oldest) = in_flight.pop_front() {
                    self.wait_ack(oldest)?;
                }
            }
            in_flight.push_back(self.send(
                format!("{INIT_SUBJECT_PREFIX}.snap.{token}.{id}.{chunk}"),
                format!("snap-{id}-{chunk}"),
                std::mem::take(out),
            )?);
            *chunk += 1;
            rows.clear();
            Ok(())
        };
        let outcome = take_snapshot(
            &params,
            &self.publication,
            schema,
            table,
            |c: Lsn, cols: &SnapshotColumns| {
                *started.borrow_mut() = (c, cols.names.clone());
                Ok(())
            },
            |values| {
                if self.shutdown.is_triggered() {
                    return Err("the bridge is shutting down".into());
                }
                let (lsn, names) = &*started.borrow();
                rows.push_row(names, values);
                // A chunk also ends before it could outgrow the server's max_payload.
                if rows.len() >= self.chunk_rows || rows.encoded_len() >= max_chunk_bytes {
                    flush(&mut rows, &mut chunk, &mut out, &mut in_flight, *lsn)?;
                }
                Ok(())
            },
        )
        .map_err(|e| e.to_string())?;
        if !rows.is_empty() || chunk == 0 {
            flush(&mut rows, &mut chunk, &mut out, &mut in_flight, outcome.lsn)?;
        }
        // The meta says the snapshot is complete: only once every chunk is stored.
        for pending in in_flight.drain(..) {
            self.wait_ack(pending)?;
        }
        let meta = serde_json::json!({
            "snapshot_id": id,
            "lsn": outcome.lsn.to_string(),
            "timestamp": now_rfc3339(),
            "batch_count": chunk,
            "row_count": outcome.rows,
            "table": table,
            "schema": schema,
            "cdc_stream_seq": cdc_stream_seq,
        });
        encode_document(self.format, &meta, &mut out);
        let meta = self.send(
            format!("{INIT_SUBJECT_PREFIX}.meta.{token}"),
            format!("meta-{id}"),
            out,
        )?;
        self.wait_ack(meta)?;
        Ok((outcome.lsn, outcome.rows, chunk))
    }
}

/// A new snapshot id: time-ordered, unique per process, one subject token.
fn new_snapshot_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(
        "{ms:x}{:04x}{:04x}",
        std::process::id() & 0xffff,
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xffff
    )
}

fn now_rfc3339() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let mut buf = [0u8; super::encode::TIMESTAMP_LEN];
    super::encode::format_timestamp(crate::pg::pgoutput::unix_to_pg_micros(micros), &mut buf)
        .to_string()
}
