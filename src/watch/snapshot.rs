//! `bridge snapshot TABLE`: requests a snapshot of a table (core NATS request on
//! `snapshot.request.{table}`) and follows it: the chunks `init.snap.{table}.{id}.*` as they
//! arrive, until `init.meta.{table}` of that snapshot says it is complete (or that it failed).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use bytes::Bytes;
use futures_util::StreamExt;
use rmpv::Value;

use super::{on_nats, open_stream, tail, WatchError};
use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::wire::decode as doc;
use crate::wire::fields;
use crate::wire::subject::{
    snapshot_chunks_filter, snapshot_meta_subject, snapshot_request_subject,
};

/// NATS connection name.
const CONNECTION_NAME: &str = "pgbridge-snapshot";
/// How long the bridge may take to answer the request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `--wait-secs`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// Least time between two progress lines when the output is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(1);
/// Width of the progress bar, in characters.
const BAR_WIDTH: usize = 30;

/// What a finished snapshot was.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotSummary {
    /// The snapshot id.
    pub snapshot_id: String,
    /// Rows in its chunks.
    pub rows: u64,
    /// Its chunks.
    pub chunks: u64,
    /// From the accepted request to the meta.
    pub elapsed: Duration,
    /// The consistent point.
    pub lsn: String,
    /// The CDC stream sequence to continue after.
    pub cdc_stream_seq: u64,
}

/// Progress shown while chunks arrive.
struct Progress {
    terminal: bool,
    table: String,
    id: String,
    estimated: Option<u64>,
    started: Instant,
    last_line: Option<Instant>,
}

impl Progress {
    fn rate(&self, rows: u64) -> u64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 {
            (rows as f64 / secs) as u64
        } else {
            0
        }
    }

    fn show(&mut self, rows: u64, chunks: u64) -> std::io::Result<()> {
        let rate = self.rate(rows);
        let mut out = std::io::stdout().lock();
        if self.terminal {
            let text = match self.estimated.filter(|e| *e > 0) {
                Some(total) => {
                    let ratio = (rows as f64 / total as f64).min(1.0);
                    let filled = (ratio * BAR_WIDTH as f64) as usize;
                    format!(
                        "[{}{}] {:>3}% {rows}/~{total} rows, {chunks} chunks, {rate} rows/s",
                        "#".repeat(filled),
                        "-".repeat(BAR_WIDTH - filled),
                        (ratio * 100.0) as u64
                    )
                }
                None => format!("{rows} rows, {chunks} chunks, {rate} rows/s"),
            };
            // Redrawn in place: back to the line start, then clear to its end.
            write!(out, "\r{text}\x1b[K")?;
        } else {
            if self.last_line.is_some_and(|t| t.elapsed() < LINE_EVERY) {
                return Ok(());
            }
            self.last_line = Some(Instant::now());
            let of = self
                .estimated
                .map(|e| format!(" of ~{e}"))
                .unwrap_or_default();
            writeln!(
                out,
                "snapshot {} of {}: {rows}{of} rows, {chunks} chunks, {rate} rows/s",
                self.id, self.table
            )?;
        }
        out.flush()
    }

    /// Ends the in-place line, so what follows starts on a line of its own.
    fn finish(&self) -> std::io::Result<()> {
        if self.terminal {
            let mut out = std::io::stdout().lock();
            writeln!(out)?;
            out.flush()?;
        }
        Ok(())
    }
}

/// Requests a snapshot of `table` (`users` or `schema.table`) and follows it until its meta.
/// `wait` bounds the time without any sign of progress.
pub fn run(
    config: &Config,
    table: &str,
    wait: Duration,
    shutdown: &Shutdown,
) -> Result<SnapshotSummary, WatchError> {
    let token = tail::table_spec_token(table)?;
    on_nats(config, CONNECTION_NAME, |client| async move {
        let js = jetstream::new(client.clone());
        let init = open_stream(&js, &config.streams.init).await?;
        let rt_err = |e: &dyn std::fmt::Display| WatchError::Runtime(e.to_string());
        // Subscribed before the request, so the meta cannot be missed.
        let meta_subject = snapshot_meta_subject(&token);
        let mut metas = init
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: meta_subject.clone(),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| rt_err(&format!("consumer on {meta_subject}: {e}")))?
            .messages()
            .await
            .map_err(|e| rt_err(&e))?;

        let subject = snapshot_request_subject(&token);
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, client.request(subject.clone(), Bytes::new()))
            .await
            .map_err(|_| {
                rt_err(&format!(
                    "no reply to the snapshot request on {subject} within {REQUEST_TIMEOUT:?}: is the bridge running?"
                ))
            })?
            .map_err(|e| {
                rt_err(&format!(
                    "snapshot request on {subject}: {e} (no bridge serves snapshot requests: is it running and streaming?)"
                ))
            })?;
        let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
        let id = match (
            answer[fields::STATUS].as_str(),
            answer[fields::SNAPSHOT_ID].as_str(),
        ) {
            (Some(fields::STATUS_ACCEPTED), Some(id)) => id.to_owned(),
            _ => {
                let reason = answer[fields::ERROR].as_str().map_or_else(
                    || String::from_utf8_lossy(&reply.payload).into_owned(),
                    str::to_owned,
                );
                return Err(WatchError::Refused {
                    table: token.clone(),
                    reason,
                });
            }
        };
        let estimated = answer[fields::ESTIMATED_ROWS].as_u64();
        let mut progress = Progress {
            terminal: std::io::stdout().is_terminal(),
            table: token.clone(),
            id: id.clone(),
            estimated,
            started: Instant::now(),
            last_line: None,
        };
        let chunk_subject = snapshot_chunks_filter(&token, &id);
        let mut chunks = init
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: chunk_subject.clone(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| rt_err(&format!("consumer on {chunk_subject}: {e}")))?
            .messages()
            .await
            .map_err(|e| rt_err(&e))?;

        let mut rows = 0u64;
        let mut loaded = 0u64;
        // The meta's batch_count, row_count, lsn and cdc_stream_seq once it arrived.
        let mut meta: Option<(u64, u64, String, u64)> = None;
        let mut last_progress = Instant::now();
        progress.show(0, 0)?;
        loop {
            if let Some((batches, row_count, lsn, cdc_stream_seq)) = &meta {
                if loaded >= *batches {
                    progress.finish()?;
                    if rows != *row_count {
                        return Err(rt_err(&format!(
                            "snapshot {id} of {token}: its chunks hold {rows} rows, its meta says {row_count}"
                        )));
                    }
                    return Ok(SnapshotSummary {
                        snapshot_id: id,
                        rows,
                        chunks: loaded,
                        elapsed: progress.started.elapsed(),
                        lsn: lsn.clone(),
                        cdc_stream_seq: *cdc_stream_seq,
                    });
                }
            }
            if shutdown.is_triggered() {
                progress.finish()?;
                return Err(rt_err(&format!(
                    "stopped watching; snapshot {id} of {token} goes on in the bridge"
                )));
            }
            if last_progress.elapsed() > wait {
                progress.finish()?;
                return Err(rt_err(&format!(
                    "snapshot {id} of {token}: nothing arrived for {} s (--wait-secs); is the bridge still running?",
                    wait.as_secs()
                )));
            }
            tokio::select! {
                m = chunks.next() => {
                    let msg = m.ok_or_else(|| rt_err(&"the chunk consumer ended"))?
                        .map_err(|e| rt_err(&e))?;
                    let chunk = decode(&msg)?;
                    let n = doc::u64_field(&chunk, fields::CHUNK).map_err(|e| bad(&msg, e))?;
                    if n != loaded {
                        return Err(bad(&msg, format!("chunk {n} came where {loaded} was due")));
                    }
                    match doc::field(&chunk, fields::DATA) {
                        Some(Value::Array(d)) => rows += d.len() as u64,
                        _ => return Err(bad(&msg, "chunk without a data list")),
                    }
                    loaded += 1;
                    last_progress = Instant::now();
                    progress.show(rows, loaded)?;
                }
                m = metas.next() => {
                    let msg = m.ok_or_else(|| rt_err(&"the meta consumer ended"))?
                        .map_err(|e| rt_err(&e))?;
                    let d = decode(&msg)?;
                    if doc::str_field(&d, fields::SNAPSHOT_ID).ok() != Some(id.as_str()) {
                        continue; // another snapshot of the same table
                    }
                    if let Some(err) = doc::field(&d, fields::ERROR) {
                        progress.finish()?;
                        return Err(WatchError::Failed {
                            table: token.clone(),
                            snapshot_id: id,
                            reason: err.as_str().map_or_else(|| err.to_string(), str::to_owned),
                        });
                    }
                    let field = |k| doc::u64_field(&d, k).map_err(|e| bad(&msg, e));
                    let lsn = doc::str_field(&d, fields::LSN).map_err(|e| bad(&msg, e))?.to_owned();
                    meta = Some((field(fields::BATCH_COUNT)?, field(fields::ROW_COUNT)?, lsn, field(fields::CDC_STREAM_SEQ)?));
                    last_progress = Instant::now();
                }
                // Wakes for the idle check, or at once on shutdown.
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.triggered() => {}
            }
        }
    })
}

fn decode(msg: &jetstream::Message) -> Result<Value, WatchError> {
    doc::decode(&msg.payload).map_err(|e| bad(msg, e))
}

fn bad(msg: &jetstream::Message, reason: impl std::fmt::Display) -> WatchError {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
    WatchError::Runtime(format!("message #{seq} on {}: {reason}", msg.subject))
}

impl SnapshotSummary {
    /// The final line: `key=value` pairs, easy to read and to parse.
    pub fn line(&self, table: &str) -> String {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            (self.rows as f64 / secs) as u64
        } else {
            self.rows
        };
        format!(
            "snapshot of {table} done: rows={} chunks={} seconds={secs:.2} rows_per_sec={rate} \
             snapshot_id={} lsn={} cdc_stream_seq={}",
            self.rows, self.chunks, self.snapshot_id, self.lsn, self.cdc_stream_seq
        )
    }
}
