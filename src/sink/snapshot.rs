//! The snapshot service: answers `snapshot.request.{table}` (core NATS request/reply), takes
//! a consistent snapshot of the table (see [`crate::pg::snapshot`]) and publishes it to the
//! INIT stream as chunks `init.snap.{table}.{snapshot_id}.{chunk}`, followed by
//! `init.meta.{table}` with the consistent point and the CDC stream sequence to continue from.
//!
//! A snapshot that fails after it was accepted publishes a failure document on the same
//! `init.meta.{table}` subject instead (`{snapshot_id, table, schema, timestamp, error}`), so a
//! consumer waiting for the meta learns why rather than waiting forever. With
//! `snapshot.on_start`, tables without any meta in the INIT stream are snapshotted at start,
//! one after the other, through the same path as requests.
//!
//! Replies are JSON whatever the message format, so they can be read with `nats req`:
//! `{"status":"accepted","snapshot_id":...,"table":...}` or `{"status":"error","error":...}`.
//! Snapshots run on their own threads: change streaming never waits for them, and a request
//! never takes the bridge down.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::Context;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::config::{Config, Format};
use crate::pg::setup::PublishedTable;
use crate::pg::snapshot::{take_snapshot, SnapshotColumns, SnapshotError};
use crate::pg::value::Value;
use crate::pg::Lsn;
use crate::shutdown::Shutdown;

use super::encode::{encode_chunk, encode_document, ChunkHeader, ChunkRows};
use super::nats::{max_payload, stream_last_sequence, NatsError, INIT_SUBJECT_PREFIX};
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
/// How long publishing a failure document may take. Short: when it does not get through,
/// NATS is the problem and the log is all that is left.
const FAILURE_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for running snapshots to stop and publish their failure document.
/// A snapshot checks for shutdown at every row, so this is only reached when PostgreSQL or
/// NATS hangs.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// Room left in a chunk for the message headers (`Nats-Msg-Id: snap-{id}-{chunk}`), which
/// count against the server's max_payload too.
const HEADER_ALLOWANCE: usize = 128;

/// Why an accepted snapshot failed. The text is what consumers find in the failure document
/// on `init.meta.{table}`, so each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFailure {
    /// The CDC stream's last sequence (the meta's `cdc_stream_seq`) could not be read.
    #[error(
        "cannot read the last sequence of stream '{stream}', which the snapshot needs as its \
         cdc_stream_seq: {source}; request the snapshot again once NATS answers"
    )]
    CdcSequence {
        /// The CDC stream's name.
        stream: String,
        /// What NATS said.
        source: NatsError,
    },
    /// One row does not fit in a message under the server's `max_payload`.
    #[error(
        "row {row} of {table}{key} encodes to {size} bytes, so a snapshot chunk holding it \
         exceeds the NATS server's max_payload of {max} bytes: raise max_payload in the \
         nats-server configuration (changes to this row need it too), then request the \
         snapshot again"
    )]
    RowTooLarge {
        /// `schema.table`.
        table: String,
        /// The row's ordinal in the COPY, from 1.
        row: u64,
        /// ` (first column name = value)` when the value is short enough to show, else empty.
        key: String,
        /// The row's encoded size.
        size: usize,
        /// The server's max_payload.
        max: usize,
    },
    /// JetStream did not store a chunk or the meta.
    #[error("publishing {subject} to JetStream failed: {reason}; request the snapshot again")]
    Publish {
        /// The subject of the message that failed.
        subject: String,
        /// What went wrong.
        reason: String,
    },
    /// The bridge is stopping.
    #[error(
        "the bridge shut down before the snapshot finished; request it again once the bridge \
         runs"
    )]
    ShuttingDown,
    /// PostgreSQL refused, failed or could not be reached.
    #[error("{}", postgres_failure(.0))]
    Postgres(#[from] SnapshotError),
}

/// The text of a PostgreSQL failure, with what to do for the common cases.
fn postgres_failure(e: &SnapshotError) -> String {
    match e {
        SnapshotError::Pg(pg) if pg.is_connection_problem() => format!(
            "{pg}; PostgreSQL is unreachable or went away: request the snapshot again once it \
             accepts connections"
        ),
        // configuration_limit_exceeded: no free replication slot or walsender.
        SnapshotError::Pg(pg) if pg.sqlstate() == Some("53400") => format!(
            "{pg}; each running snapshot uses a temporary replication slot and a walsender: \
             raise max_replication_slots and max_wal_senders, or request the snapshot again \
             when other snapshots have finished"
        ),
        other => format!("{other}; request the snapshot again once this is fixed"),
    }
}

/// What a finished snapshot published.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Published {
    lsn: Lsn,
    rows: u64,
    chunks: u64,
    row_filter: Option<String>,
}

/// The last `init.meta.{table}` message the INIT stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LastMeta {
    /// None: no snapshot of the table was ever published (or it expired).
    Missing,
    /// A finished snapshot.
    Finished,
    /// A failure document.
    Failed,
}

/// Everything a snapshot needs, shared by the request handler and snapshot threads.
pub struct SnapshotService {
    js: Context,
    rt: tokio::runtime::Handle,
    pg_params: Vec<(&'static str, String)>,
    publication: String,
    cdc_stream: String,
    init_stream: String,
    format: Format,
    chunk_rows: usize,
    on_start: bool,
    tables: Vec<PublishedTable>,
    /// Tables with a snapshot running; requests for them are refused meanwhile.
    busy: Mutex<HashSet<(String, String)>>,
    /// Snapshot threads, so shutdown can wait for them: they publish through this thread's
    /// runtime, which must keep running until they are done.
    workers: Mutex<Vec<JoinHandle<()>>>,
    shutdown: Shutdown,
}

/// A table marked busy; dropping it frees the table for the next snapshot.
struct Claim {
    service: Arc<SnapshotService>,
    key: (String, String),
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.service
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
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
            init_stream: config.streams.init.clone(),
            format: config.replication.format,
            chunk_rows: config.snapshot.chunk_rows,
            on_start: config.snapshot.on_start,
            tables,
            busy: Mutex::new(HashSet::new()),
            workers: Mutex::new(Vec::new()),
            shutdown,
        })
    }

    /// Serves requests, and keeps the schemas bucket current from `schema_changes` (tables
    /// whose Relation message arrived), until shutdown; then waits (bounded) for running
    /// snapshots to stop. Runs on the runtime of `self.rt`.
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
        if self.on_start {
            let me = Arc::clone(&self);
            if let Err(e) = self.spawn_worker("snapshot-on-start", move || me.snapshot_on_start()) {
                log::error!("snapshot on start: cannot start the thread: {e}");
            }
        }
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
        drop(sub);
        self.wait_for_workers().await;
    }

    /// Waits until every snapshot thread has ended, at most [`STOP_WAIT`]. The runtime keeps
    /// running meanwhile, so they can still publish their failure documents.
    async fn wait_for_workers(&self) {
        let deadline = Instant::now() + STOP_WAIT;
        loop {
            let running = {
                let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
                workers.retain(|w| !w.is_finished());
                workers.len()
            };
            if running == 0 {
                return;
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "{running} snapshot thread(s) still running after {STOP_WAIT:?}; stopping without them"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a snapshot thread and keeps its handle for [`SnapshotService::wait_for_workers`].
    fn spawn_worker(&self, name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let handle = std::thread::Builder::new().name(name.into()).spawn(f)?;
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.retain(|w| !w.is_finished());
        workers.push(handle);
        Ok(())
    }

    /// Marks the table busy; `None` when a snapshot of it is already running.
    fn claim(self: &Arc<Self>, schema: &str, table: &str) -> Option<Claim> {
        let key = (schema.to_string(), table.to_string());
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.insert(key.clone()).then(|| Claim {
            service: Arc::clone(self),
            key,
        })
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
        let Some(claim) = self.claim(&schema, &table) else {
            return error(format!(
                "a snapshot of {schema}.{table} is already in progress"
            ));
        };
        let snapshot_id = new_snapshot_id();
        let id = snapshot_id.clone();
        // The claim moves into the thread and frees the table when the snapshot ends; if
        // the thread cannot start, it is dropped with the closure and frees it at once.
        if let Err(e) = self.spawn_worker("snapshot", move || {
            claim.service.execute(&claim.key.0, &claim.key.1, &id);
            drop(claim);
        }) {
            return error(format!("cannot start the snapshot: {e}"));
        }
        serde_json::json!({"status": "accepted", "snapshot_id": snapshot_id, "table": table, "schema": schema})
    }

    /// `snapshot.on_start`: snapshots, one after the other, every streamed table whose INIT
    /// stream holds no `init.meta.{table}`, or whose last one reports a failure. One at a
    /// time, because each snapshot holds a replication slot and a walsender.
    fn snapshot_on_start(self: &Arc<Self>) {
        for t in &self.tables {
            if self.shutdown.is_triggered() {
                return;
            }
            let qualified = t.qualified();
            let mut token = String::new();
            push_table_token(&mut token, &t.schema, &t.name);
            let subject = format!("{INIT_SUBJECT_PREFIX}.meta.{token}");
            match self.rt.block_on(self.last_meta(&subject)) {
                Ok(LastMeta::Finished) => {
                    log::info!(
                        "snapshot on start: stream '{}' already holds a snapshot of {qualified} ({subject}); none taken",
                        self.init_stream
                    );
                    continue;
                }
                Ok(LastMeta::Missing) => log::info!(
                    "snapshot on start: stream '{}' holds no snapshot of {qualified} ({subject}); taking one",
                    self.init_stream
                ),
                Ok(LastMeta::Failed) => log::info!(
                    "snapshot on start: the last snapshot of {qualified} in stream '{}' failed; taking a new one",
                    self.init_stream
                ),
                Err(e) => {
                    log::warn!(
                        "snapshot on start: cannot read {subject} from stream '{}': {e}; {qualified} not snapshotted",
                        self.init_stream
                    );
                    continue;
                }
            }
            let Some(claim) = self.claim(&t.schema, &t.name) else {
                log::info!(
                    "snapshot on start: a requested snapshot of {qualified} is already running; none taken"
                );
                continue;
            };
            self.execute(&t.schema, &t.name, &new_snapshot_id());
            drop(claim);
        }
    }

    /// What the INIT stream's last message on `subject` (an `init.meta.{table}`) is.
    async fn last_meta(&self, subject: &str) -> Result<LastMeta, String> {
        let stream = self
            .js
            .get_stream_no_info(&self.init_stream)
            .await
            .map_err(|e| e.to_string())?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(msg) => Ok(if is_failure_document(&msg.payload) {
                LastMeta::Failed
            } else {
                LastMeta::Finished
            }),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(LastMeta::Missing),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Takes and publishes one snapshot; a failure is logged and published as a failure
    /// document on `init.meta.{table}`.
    fn execute(&self, schema: &str, table: &str, id: &str) {
        match self.run_snapshot(schema, table, id) {
            Ok(p) => log::info!(
                "snapshot {id} of {schema}.{table}: {} rows in {} chunks, consistent point {}{}",
                p.rows,
                p.chunks,
                p.lsn,
                p.row_filter
                    .map(|f| format!(", publication row filter {f}"))
                    .unwrap_or_default()
            ),
            Err(e) => {
                log::error!("snapshot {id} of {schema}.{table} failed: {e}");
                self.publish_failure(schema, table, id, &e);
            }
        }
    }

    /// Publishes the failure document; when even that fails (NATS is the problem), logs it.
    fn publish_failure(&self, schema: &str, table: &str, id: &str, failure: &SnapshotFailure) {
        let mut token = String::new();
        push_table_token(&mut token, schema, table);
        let subject = format!("{INIT_SUBJECT_PREFIX}.meta.{token}");
        let doc = failure_document(
            id,
            schema,
            table,
            &super::encode::now_timestamp(),
            &failure.to_string(),
        );
        let mut out = Vec::new();
        encode_document(self.format, &doc, &mut out);
        match self.publish(subject.clone(), format!("meta-{id}"), out, FAILURE_ACK_TIMEOUT) {
            Ok(()) => log::info!("snapshot {id} of {schema}.{table}: failure published to {subject}"),
            Err(e) => log::error!(
                "snapshot {id} of {schema}.{table}: the failure could not be published to {subject} ({e}); consumers waiting for it will time out"
            ),
        }
    }

    /// Publishes one message and waits (at most `timeout`) for its PubAck.
    fn publish(
        &self,
        subject: String,
        id: String,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), SnapshotFailure> {
        let pending = self.send(subject, id, payload)?;
        self.wait_ack(pending, timeout)
    }

    /// Publishes one message; its PubAck is awaited with [`Self::wait_ack`].
    fn send(
        &self,
        subject: String,
        id: String,
        payload: Vec<u8>,
    ) -> Result<(String, PublishAckFuture), SnapshotFailure> {
        self.rt.block_on(async {
            let msg = PublishMessage::build()
                .payload(Bytes::from(payload))
                .message_id(id);
            match self.js.send_publish(subject.clone(), msg).await {
                Ok(ack) => Ok((subject, ack)),
                Err(e) => Err(SnapshotFailure::Publish {
                    reason: self.publish_reason(e),
                    subject,
                }),
            }
        })
    }

    /// Waits (at most `timeout`) for the PubAck of a message published to `subject`.
    fn wait_ack(
        &self,
        (subject, ack): (String, PublishAckFuture),
        timeout: Duration,
    ) -> Result<(), SnapshotFailure> {
        self.rt.block_on(async {
            let failed = |reason: String| SnapshotFailure::Publish {
                subject: subject.clone(),
                reason,
            };
            tokio::time::timeout(timeout, ack)
                .await
                .map_err(|_| failed(format!("no PubAck within {timeout:?}")))?
                .map_err(|e| failed(self.publish_reason(e)))?;
            Ok(())
        })
    }

    /// What a failed publish means, with what to do when the message is too large.
    fn publish_reason(&self, e: async_nats::jetstream::context::PublishError) -> String {
        if e.kind() == PublishErrorKind::MaxPayloadExceeded {
            format!(
                "{e}: the message exceeds the NATS server's max_payload of {} bytes; raise it in the nats-server configuration",
                max_payload(&self.js.client())
            )
        } else {
            e.to_string()
        }
    }

    /// Takes and publishes the snapshot.
    fn run_snapshot(
        &self,
        schema: &str,
        table: &str,
        id: &str,
    ) -> Result<Published, SnapshotFailure> {
        // Read before the slot exists: consumers continue the CDC stream after this sequence.
        let cdc_stream_seq = self
            .rt
            .block_on(stream_last_sequence(&self.js, &self.cdc_stream))
            .map_err(|source| SnapshotFailure::CdcSequence {
                stream: self.cdc_stream.clone(),
                source,
            })?;
        let mut token = String::new();
        push_table_token(&mut token, schema, table);
        let params: Vec<(&str, &str)> = self
            .pg_params
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let mut rows = ChunkRows::new(self.format);
        // A row that would push a chunk past max_payload waits here to start the next one.
        let mut carried = ChunkRows::new(self.format);
        let mut out = Vec::new();
        let max = max_payload(&self.js.client());
        // Half the server's limit leaves room for the chunk's own fields and the next row.
        let max_chunk_bytes = max / 2;
        // What a chunk may hold in rows: the limit less its own fields (measured with the
        // widest chunk number) and the message headers.
        let frame = {
            let header = ChunkHeader {
                table,
                schema,
                snapshot_id: id,
                chunk: u64::MAX,
                lsn: Lsn(u64::MAX),
            };
            encode_chunk(self.format, &header, &ChunkRows::new(self.format), &mut out);
            out.len()
        };
        let row_budget = max.saturating_sub(frame + HEADER_ALLOWANCE);
        // Consistent point and column names, set before the first row.
        let started: std::cell::RefCell<(Lsn, Vec<Arc<str>>)> = Default::default();
        let mut chunk = 0u64;
        let mut row_number = 0u64;
        // Chunks published and not yet acknowledged, oldest first.
        let mut in_flight = VecDeque::with_capacity(CHUNK_ACK_WINDOW);
        let mut flush = |rows: &mut ChunkRows,
                         chunk: &mut u64,
                         out: &mut Vec<u8>,
                         lsn: Lsn|
         -> Result<(), SnapshotFailure> {
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
                    self.wait_ack(oldest, CHUNK_ACK_TIMEOUT)?;
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
        // The typed reason a row callback stopped the COPY (it can only pass text through).
        let mut stopped: Option<SnapshotFailure> = None;
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
                let mut step = || -> Result<(), SnapshotFailure> {
                    if self.shutdown.is_triggered() {
                        return Err(SnapshotFailure::ShuttingDown);
                    }
                    let (lsn, names) = &*started.borrow();
                    row_number += 1;
                    let size = rows.push_row(names, values);
                    if size > row_budget {
                        return Err(SnapshotFailure::RowTooLarge {
                            table: format!("{schema}.{table}"),
                            row: row_number,
                            key: first_column(names, values),
                            size,
                            max,
                        });
                    }
                    if rows.encoded_len() > row_budget {
                        // The rows before fit; this one starts the next chunk.
                        rows.move_last_row(&mut carried);
                        flush(&mut rows, &mut chunk, &mut out, *lsn)?;
                        std::mem::swap(&mut rows, &mut carried);
                    }
                    // A chunk also ends before it could outgrow the server's max_payload.
                    if rows.len() >= self.chunk_rows || rows.encoded_len() >= max_chunk_bytes {
                        flush(&mut rows, &mut chunk, &mut out, *lsn)?;
                    }
                    Ok(())
                };
                step().map_err(|e| {
                    let text = e.to_string();
                    stopped = Some(e);
                    text
                })
            },
        );
        let outcome = match (outcome, stopped) {
            (Ok(outcome), _) => outcome,
            (Err(SnapshotError::Stopped(..)), Some(reason)) => return Err(reason),
            (Err(e), _) => return Err(e.into()),
        };
        if !rows.is_empty() || chunk == 0 {
            flush(&mut rows, &mut chunk, &mut out, outcome.lsn)?;
        }
        // The meta says the snapshot is complete: only once every chunk is stored.
        for pending in in_flight.drain(..) {
            self.wait_ack(pending, CHUNK_ACK_TIMEOUT)?;
        }
        let meta = serde_json::json!({
            "snapshot_id": id,
            "lsn": outcome.lsn.to_string(),
            "timestamp": super::encode::now_timestamp(),
            "batch_count": chunk,
            "row_count": outcome.rows,
            "table": table,
            "schema": schema,
            "cdc_stream_seq": cdc_stream_seq,
        });
        encode_document(self.format, &meta, &mut out);
        self.publish(
            format!("{INIT_SUBJECT_PREFIX}.meta.{token}"),
            format!("meta-{id}"),
            out,
            CHUNK_ACK_TIMEOUT,
        )?;
        Ok(Published {
            lsn: outcome.lsn,
            rows: outcome.rows,
            chunks: chunk,
            row_filter: outcome.row_filter,
        })
    }
}

/// The document published on `init.meta.{table}` when an accepted snapshot fails: like a
/// meta, but with `error` in place of the position fields, so no consumer can mistake it for
/// a snapshot to load.
fn failure_document(
    id: &str,
    schema: &str,
    table: &str,
    timestamp: &str,
    error: &str,
) -> serde_json::Value {
    serde_json::json!({
        "snapshot_id": id,
        "table": table,
        "schema": schema,
        "timestamp": timestamp,
        "error": error,
    })
}

/// Whether an `init.meta.{table}` payload is a failure document: a map with an `error` key,
/// in either format (the format may have changed since it was written).
fn is_failure_document(payload: &[u8]) -> bool {
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(payload) {
        return m.contains_key("error");
    }
    match rmpv::decode::read_value(&mut &payload[..]) {
        Ok(rmpv::Value::Map(m)) => m.iter().any(|(k, _)| k.as_str() == Some("error")),
        _ => false,
    }
}

/// ` (first column name = value)` to help find an oversized row, when the value is a number
/// or a short text; empty otherwise.
fn first_column(names: &[Arc<str>], values: &[Value]) -> String {
    let value = match values.first() {
        Some(Value::Int(i)) => i.to_string(),
        Some(Value::Text(t)) if t.len() <= 64 && !t.contains(char::is_control) => format!("'{t}'"),
        _ => return String::new(),
    };
    match names.first() {
        Some(name) => format!(" (first column {name} = {value})"),
        None => String::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::conn::{DbError, PgError};

    #[test]
    fn failure_documents_carry_the_error_and_no_position() {
        let doc = failure_document("id1", "public", "users", "2025-01-01T00:00:00Z", "boom");
        let keys: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys.iter().copied().collect::<HashSet<_>>(),
            HashSet::from(["snapshot_id", "table", "schema", "timestamp", "error"])
        );
        assert_eq!(doc["error"], "boom");
        for format in [Format::Msgpack, Format::Json] {
            let mut out = Vec::new();
            encode_document(format, &doc, &mut out);
            assert!(is_failure_document(&out), "{format:?}");
            let meta = serde_json::json!({"snapshot_id": "id1", "lsn": "0/1", "batch_count": 1,
                "row_count": 0, "table": "users", "schema": "public", "cdc_stream_seq": 0,
                "timestamp": "2025-01-01T00:00:00Z"});
            encode_document(format, &meta, &mut out);
            assert!(!is_failure_document(&out), "{format:?}");
        }
        assert!(!is_failure_document(b""));
        assert!(!is_failure_document(b"\xc1"));
    }

    #[test]
    fn failures_say_what_to_do() {
        let e = SnapshotFailure::RowTooLarge {
            table: "public.docs".into(),
            row: 51,
            key: first_column(&[Arc::from("id")], &[Value::Int(51)]),
            size: 10034,
            max: 4096,
        };
        let text = e.to_string();
        assert!(
            text.contains("row 51 of public.docs (first column id = 51)"),
            "{text}"
        );
        assert!(text.contains("10034 bytes"), "{text}");
        assert!(text.contains("max_payload of 4096 bytes"), "{text}");
        assert!(text.contains("raise max_payload"), "{text}");

        let down = SnapshotFailure::from(SnapshotError::Pg(PgError::Connect(
            "connection refused".into(),
        )));
        assert!(
            down.to_string().contains("PostgreSQL is unreachable"),
            "{down}"
        );
        let slots = SnapshotFailure::from(SnapshotError::Pg(PgError::Db(DbError {
            sqlstate: "53400".into(),
            severity: "ERROR".into(),
            message: "all replication slots are in use".into(),
            detail: None,
            hint: None,
        })));
        assert!(
            slots.to_string().contains("max_replication_slots"),
            "{slots}"
        );
        assert!(SnapshotFailure::ShuttingDown
            .to_string()
            .contains("request it again"));
    }

    #[test]
    fn only_short_first_columns_are_shown() {
        let names = [Arc::from("k")];
        assert_eq!(
            first_column(&names, &[Value::Text("abc".into())]),
            " (first column k = 'abc')"
        );
        assert_eq!(first_column(&names, &[Value::Text("x".repeat(65))]), "");
        assert_eq!(first_column(&names, &[Value::Bytes(vec![1])]), "");
        assert_eq!(first_column(&[], &[]), "");
    }
}
