//! The snapshot service: answers `snapshot.request.{table}` (core NATS request/reply) and
//! `POST /snapshots/{table}`, takes a consistent snapshot of the table (see
//! [`super::slot`]) and publishes it to the INIT stream as chunks
//! `init.snap.{table}.{snapshot_id}.{chunk}`, followed by `init.meta.{table}` with the
//! consistent point and the CDC stream sequence to continue from.
//!
//! A snapshot that fails after it was accepted publishes a failure document on the same
//! `init.meta.{table}` subject instead (`{snapshot_id, table, schema, timestamp, error}`), so a
//! consumer waiting for the meta learns why rather than waiting forever. With
//! `snapshot.on_start`, tables without any meta in the INIT stream are snapshotted at start,
//! one after the other, through the same path as requests.
//!
//! Replies are JSON whatever the message format, so they can be read with `nats req`:
//! `{"status":"accepted","snapshot_id":...,"table":...}` or
//! `{"status":"error","reason":...,"error":...}`. The bridge publishes with its own
//! credentials, so a reply goes only to a subject under `snapshot.reply_prefix` (the clients'
//! inbox prefix): a request asking for any other reply subject (a stream subject, a KV key,
//! the JetStream API) is neither answered nor served. A request without a reply subject
//! (`nats pub`) is served without a reply, as NATS services do.
//!
//! Only the bridge that streams from the replication slot serves requests; a standby does
//! not subscribe until it holds the slot, and a bridge that loses it unsubscribes. At most
//! `snapshot.max_concurrent` snapshots run at once, and a table is not snapshotted again
//! within `snapshot.cooldown_secs` of its last start. Snapshots run on their own threads:
//! change streaming never waits for them, and a request never takes the bridge down.

use std::collections::{HashMap, HashSet, VecDeque};
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
use crate::pg::conn::{ConnectionKind, PgConnection};
use crate::pg::setup::{published_tables, PublishedTable};
use super::slot::{take_snapshot, SnapshotColumns, SnapshotError};
use crate::pg::value::Value;
use crate::pg::Lsn;
use crate::shutdown::Shutdown;
use crate::telemetry::Telemetry;

use crate::sink::encode::{encode_chunk, encode_document, ChunkHeader, ChunkRows};
use crate::sink::nats::{max_payload, stream_last_sequence, NatsError, INIT_SUBJECT_PREFIX};
use crate::sink::subject::{parse_table_token, push_table_token};

/// Subject prefix of snapshot requests.
pub const REQUEST_PREFIX: &str = "snapshot.request";
/// Least time between two reads of the publication's tables for requests naming a table the
/// bridge does not know (tables added to the publication while it runs).
const PUBLICATION_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Least time between two warnings about requests with a reply subject outside the prefix;
/// the ones in between are counted and reported with the next warning.
const IGNORED_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// How often the request loop checks for shutdown and for the slot.
const SERVE_POLL: Duration = Duration::from_millis(200);
/// Longest subject shown in a log line (subjects come from clients).
const SHOWN_SUBJECT_CHARS: usize = 120;

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

/// Why a request was refused. The text is the reply's `error`; it names the requested table
/// only, never the tables the bridge streams.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The subject or path does not name a table.
    #[error(
        "malformed table {token:?}: {reason} (expected {REQUEST_PREFIX}.{{table}} or \
         {REQUEST_PREFIX}.{{schema}}.{{table}}, with the table token of change subjects)"
    )]
    Malformed {
        /// The table part as received.
        token: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The table is not one this bridge streams.
    #[error(
        "unknown table {0}: this bridge does not stream it (not in the publication, or not \
         selected with --table); check the name and the publication"
    )]
    UnknownTable(String),
    /// A snapshot of the table is running.
    #[error("a snapshot of {0} is already in progress; wait for its init.meta message")]
    InProgress(String),
    /// The table was snapshotted moments ago.
    #[error(
        "a snapshot of {table} started less than {cooldown_secs} s ago (snapshot.cooldown_secs); \
         try again in {retry_after_secs} s"
    )]
    Cooldown {
        /// `schema.table`.
        table: String,
        /// The configured cooldown.
        cooldown_secs: u64,
        /// Seconds until a request is accepted.
        retry_after_secs: u64,
    },
    /// As many snapshots as allowed are running.
    #[error(
        "busy: {0} snapshot(s) are running, the most this bridge runs at once \
         (snapshot.max_concurrent); try again in a moment"
    )]
    Busy(usize),
    /// This process does not stream from the slot.
    #[error(
        "this bridge does not stream from the replication slot (standby, or reconnecting to \
         PostgreSQL); the bridge that holds the slot serves snapshots"
    )]
    NotActive,
    /// The bridge is stopping.
    #[error("the bridge is shutting down; request the snapshot again once a bridge runs")]
    ShuttingDown,
    /// The snapshot thread could not start.
    #[error("cannot start the snapshot: {0}")]
    Internal(String),
}

impl Refusal {
    /// A short machine-readable reason, the reply's `reason`.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Malformed { .. } => "malformed",
            Refusal::UnknownTable(_) => "unknown_table",
            Refusal::InProgress(_) => "in_progress",
            Refusal::Cooldown { .. } => "cooldown",
            Refusal::Busy(_) => "busy",
            Refusal::NotActive => "standby",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::Internal(_) => "internal",
        }
    }

    /// The HTTP status of `POST /snapshots/{table}` for this refusal.
    pub fn http_status(&self) -> u16 {
        match self {
            Refusal::Malformed { .. } => 400,
            Refusal::UnknownTable(_) => 404,
            Refusal::InProgress(_) => 409,
            Refusal::Cooldown { .. } | Refusal::Busy(_) => 429,
            Refusal::NotActive | Refusal::ShuttingDown => 503,
            Refusal::Internal(_) => 500,
        }
    }

    /// Seconds after which the same request may be accepted, when that is known.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Refusal::Cooldown {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Refusal::Busy(_) => Some(1),
            _ => None,
        }
    }

    /// The reply document.
    pub fn to_json(&self) -> serde_json::Value {
        let mut doc = serde_json::json!({
            "status": "error",
            "reason": self.code(),
            "error": self.to_string(),
        });
        if let Some(s) = self.retry_after_secs() {
            doc["retry_after_secs"] = s.into();
        }
        doc
    }
}

/// A started snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The id on its chunks and meta.
    pub snapshot_id: String,
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// PostgreSQL's estimate of the table's rows (`pg_class.reltuples`), when it has one (not
    /// before the table was first vacuumed or analysed).
    pub estimated_rows: Option<u64>,
}

impl Accepted {
    /// The reply document.
    pub fn to_json(&self) -> serde_json::Value {
        let mut doc = serde_json::json!({"status": "accepted", "snapshot_id": self.snapshot_id,
            "table": self.table, "schema": self.schema});
        if let Some(n) = self.estimated_rows {
            doc["estimated_rows"] = n.into();
        }
        doc
    }
}

/// Which snapshots run, and when each table's last one started.
#[derive(Debug, Default)]
struct Admission {
    running: HashSet<(String, String)>,
    started: HashMap<(String, String), Instant>,
}

impl Admission {
    /// Marks `key` running at `now` when the rules allow: not running already (today's
    /// answer to a duplicate), not started within `cooldown`, fewer than `max` running.
    fn admit(
        &mut self,
        key: &(String, String),
        cooldown: Duration,
        max: usize,
        now: Instant,
    ) -> Result<(), Refusal> {
        let qualified = || format!("{}.{}", key.0, key.1);
        if self.running.contains(key) {
            return Err(Refusal::InProgress(qualified()));
        }
        self.started
            .retain(|_, t| now.saturating_duration_since(*t) < cooldown);
        if let Some(t) = self.started.get(key) {
            let left = cooldown.saturating_sub(now.saturating_duration_since(*t));
            return Err(Refusal::Cooldown {
                table: qualified(),
                cooldown_secs: cooldown.as_secs(),
                // Rounded up: a retry after this many seconds is accepted.
                retry_after_secs: left.as_secs() + u64::from(left.subsec_nanos() > 0),
            });
        }
        if self.running.len() >= max {
            return Err(Refusal::Busy(self.running.len()));
        }
        self.running.insert(key.clone());
        if !cooldown.is_zero() {
            self.started.insert(key.clone(), now);
        }
        Ok(())
    }
}

/// The tables requests may name, and when the publication was last read for new ones.
#[derive(Debug)]
struct KnownTables {
    tables: Vec<PublishedTable>,
    refreshed: Option<Instant>,
}

/// Everything a snapshot needs, shared by the request handlers and snapshot threads.
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
    reply_prefix: String,
    max_concurrent: usize,
    cooldown: Duration,
    /// The tables streamed at start; on-start snapshots cover these.
    initial_tables: Vec<PublishedTable>,
    /// True when every table of the publication is streamed (no `--table`): tables added to
    /// the publication later are streamed too, so requests may name them.
    follows_publication: bool,
    known: Mutex<KnownTables>,
    admission: Mutex<Admission>,
    /// Snapshot threads, so shutdown can wait for them: they publish through this thread's
    /// runtime, which must keep running until they are done.
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Requests with a reply subject outside the prefix since the last warning, and when it was.
    ignored: Mutex<(u64, Option<Instant>)>,
    /// Rows copied and estimated rows of each running snapshot, by id, for the progress gauge.
    progress: Mutex<HashMap<String, (u64, Option<u64>)>>,
    telemetry: Arc<Telemetry>,
    shutdown: Shutdown,
}

/// The progress gauge's value for the running snapshots: rows copied over rows estimated,
/// summed over those with an estimate, and kept below 1 until they end (the estimate may be
/// low). `None` when none runs.
fn progress_ratio(running: &HashMap<String, (u64, Option<u64>)>) -> Option<f64> {
    if running.is_empty() {
        return None;
    }
    let (copied, estimated) = running
        .values()
        .filter_map(|(c, e)| e.map(|e| (*c, e)))
        .fold((0u64, 0u64), |(c, e), (c2, e2)| (c + c2, e + e2));
    Some(if estimated == 0 {
        0.0
    } else {
        (copied as f64 / estimated as f64).min(PROGRESS_BELOW_DONE)
    })
}

/// The most the progress gauge shows before a snapshot is complete.
const PROGRESS_BELOW_DONE: f64 = 0.99;
/// Rows between two updates of the progress gauge.
const PROGRESS_EVERY_ROWS: u64 = 1000;

impl std::fmt::Debug for SnapshotService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotService")
            .field("publication", &self.publication)
            .field("init_stream", &self.init_stream)
            .finish_non_exhaustive()
    }
}

/// A running snapshot of one table; dropping it frees the table and a place under the cap.
struct Claim {
    service: Arc<SnapshotService>,
    key: (String, String),
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.service
            .admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .running
            .remove(&self.key);
    }
}

/// `s` shortened for a log line, quoted and escaped (it comes from a client).
fn shown(s: &str) -> String {
    if s.chars().count() > SHOWN_SUBJECT_CHARS {
        let cut: String = s.chars().take(SHOWN_SUBJECT_CHARS).collect();
        format!("{cut:?}...")
    } else {
        format!("{s:?}")
    }
}

/// True when `reply` may receive a reply: under `prefix`, and a plain subject (no
/// wildcards, whitespace or empty tokens) the server would deliver to one inbox.
fn reply_allowed(reply: &str, prefix: &str) -> bool {
    reply.len() > prefix.len()
        && reply.starts_with(prefix)
        && reply
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        && !reply.split('.').any(str::is_empty)
}

impl SnapshotService {
    /// A service for `tables` (the tables the bridge streams at start).
    pub fn new(
        config: &Config,
        js: Context,
        rt: tokio::runtime::Handle,
        tables: Vec<PublishedTable>,
        telemetry: Arc<Telemetry>,
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
            reply_prefix: config.snapshot.reply_prefix.clone(),
            max_concurrent: config.snapshot.max_concurrent,
            cooldown: config.snapshot.cooldown(),
            follows_publication: config.replication.tables.is_empty(),
            known: Mutex::new(KnownTables {
                tables: tables.clone(),
                refreshed: None,
            }),
            initial_tables: tables,
            admission: Mutex::new(Admission::default()),
            workers: Mutex::new(Vec::new()),
            ignored: Mutex::new((0, None)),
            progress: Mutex::new(HashMap::new()),
            telemetry,
            shutdown,
        })
    }

    /// Serves requests until shutdown, while this process streams from the slot: it
    /// subscribes once the slot is held and unsubscribes when it is lost. Then waits (bounded)
    /// for running snapshots to stop. Runs on the runtime of `self.rt`.
    pub async fn serve(self: Arc<Self>, client: async_nats::Client) {
        let mut on_start_pending = self.on_start;
        let mut subscribe_failed = false;
        while !self.shutdown.is_triggered() {
            if !self.telemetry.holds_slot() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let mut sub = match client.subscribe(format!("{REQUEST_PREFIX}.>")).await {
                Ok(s) => s,
                Err(e) => {
                    if !subscribe_failed {
                        log::warn!("cannot subscribe to {REQUEST_PREFIX}.>: {e}; retrying");
                        subscribe_failed = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            subscribe_failed = false;
            // Once the server has the subscription (a flush round-trips a PING after it), a
            // request finds a responder: only then say that requests are served.
            if let Err(e) = client.flush().await {
                log::debug!("flush after subscribing to snapshot requests: {e}");
            }
            log::info!(
                "snapshot requests served on {REQUEST_PREFIX}.{{table}} (replies to {}*)",
                self.reply_prefix
            );
            if std::mem::take(&mut on_start_pending) {
                let me = Arc::clone(&self);
                if let Err(e) =
                    self.spawn_worker("snapshot-on-start", move || me.snapshot_on_start())
                {
                    log::error!("snapshot on start: cannot start the thread: {e}");
                }
            }
            while !self.shutdown.is_triggered() {
                tokio::select! {
                    m = sub.next() => match m {
                        Some(m) => Arc::clone(&self).dispatch(&client, m).await,
                        None => break,
                    },
                    _ = tokio::time::sleep(SERVE_POLL) => {}
                }
                if !self.telemetry.holds_slot() {
                    log::info!(
                        "snapshot requests no longer served: this bridge does not stream from \
                         the replication slot; served again once it does"
                    );
                    break;
                }
            }
            let _ = sub.unsubscribe().await;
        }
        self.wait_for_workers().await;
    }

    /// Checks a request's reply subject, serves it and sends the reply.
    async fn dispatch(self: Arc<Self>, client: &async_nats::Client, msg: async_nats::Message) {
        let subject = msg.subject.to_string();
        let reply_to = match msg.reply {
            Some(r) if reply_allowed(r.as_str(), &self.reply_prefix) => Some(r),
            Some(r) => {
                self.ignored_request(&subject, r.as_str());
                return;
            }
            None => None,
        };
        // Reading the publication may wait for PostgreSQL: not on the runtime's thread.
        let me = Arc::clone(&self);
        let subject_for_request = subject.clone();
        let outcome =
            tokio::task::spawn_blocking(move || me.request_subject(&subject_for_request)).await;
        let outcome = outcome.unwrap_or_else(|e| Err(Refusal::Internal(e.to_string())));
        let body = match &outcome {
            Ok(a) => a.to_json(),
            Err(r) => r.to_json(),
        };
        match reply_to {
            Some(to) => {
                let body = serde_json::to_vec(&body).unwrap_or_default();
                if let Err(e) = client.publish(to, Bytes::from(body)).await {
                    log::warn!("snapshot reply not sent: {e}");
                }
            }
            None => match outcome {
                Ok(a) => log::info!(
                    "snapshot {} of {}.{} requested on {} without a reply subject; started",
                    a.snapshot_id,
                    a.schema,
                    a.table,
                    shown(&subject)
                ),
                Err(r) => log::info!(
                    "snapshot request on {} without a reply subject refused: {r}",
                    shown(&subject)
                ),
            },
        }
    }

    /// Counts a request whose reply subject is not an inbox, and warns (rate-limited).
    fn ignored_request(&self, subject: &str, reply: &str) {
        self.telemetry
            .snapshot_requests_ignored
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut ignored = self.ignored.lock().unwrap_or_else(|p| p.into_inner());
        let (suppressed, last) = &mut *ignored;
        if last.is_some_and(|t| t.elapsed() < IGNORED_WARN_INTERVAL) {
            *suppressed += 1;
            return;
        }
        let more = if *suppressed > 0 {
            format!(" ({suppressed} more such requests since the last warning)")
        } else {
            String::new()
        };
        log::warn!(
            "snapshot request on {} ignored: its reply subject {} does not start with {:?} \
             (snapshot.reply_prefix), so it is neither answered nor served{more}; send it as a \
             request (nats req, client.request), whose reply goes to an inbox, or set \
             --snapshot-reply-prefix to the clients' inbox prefix",
            shown(subject),
            shown(reply),
            self.reply_prefix
        );
        *suppressed = 0;
        *last = Some(Instant::now());
    }

    /// A request on `snapshot.request.{table}`.
    pub fn request_subject(self: &Arc<Self>, subject: &str) -> Result<Accepted, Refusal> {
        let token = subject
            .strip_prefix(REQUEST_PREFIX)
            .and_then(|t| t.strip_prefix('.'))
            .unwrap_or(subject);
        self.request(token)
    }

    /// Starts a snapshot of the table named by `token` (the table token of change subjects:
    /// `users`, `sales.invoices`), when the rules allow: this bridge holds the slot, the table
    /// is streamed, no snapshot of it runs, its cooldown is over, and the cap leaves room.
    pub fn request(self: &Arc<Self>, token: &str) -> Result<Accepted, Refusal> {
        let (schema, table) = parse_table_token(token).map_err(|e| Refusal::Malformed {
            token: token.to_string(),
            reason: e.to_string(),
        })?;
        if self.shutdown.is_triggered() {
            return Err(Refusal::ShuttingDown);
        }
        if !self.telemetry.holds_slot() {
            return Err(Refusal::NotActive);
        }
        if !self.is_known(&schema, &table) {
            return Err(Refusal::UnknownTable(format!("{schema}.{table}")));
        }
        let claim = self.admit(&schema, &table)?;
        let snapshot_id = new_snapshot_id();
        let id = snapshot_id.clone();
        let estimated_rows = self.estimate_rows(&schema, &table);
        // The claim moves into the thread and frees the table when the snapshot ends; if
        // the thread cannot start, it is dropped with the closure and frees it at once.
        self.spawn_worker("snapshot", move || {
            claim
                .service
                .execute(&claim.key.0, &claim.key.1, &id, estimated_rows);
            drop(claim);
        })
        .map_err(|e| Refusal::Internal(e.to_string()))?;
        Ok(Accepted {
            snapshot_id,
            schema,
            table,
            estimated_rows,
        })
    }

    /// True when the table is streamed. A table not seen yet may have been added to the
    /// publication since start: the publication is read again (at most every
    /// [`PUBLICATION_REFRESH_INTERVAL`]) before the answer is no.
    fn is_known(&self, schema: &str, table: &str) -> bool {
        let matches = |t: &PublishedTable| t.schema == schema && t.name == table;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.tables.iter().any(matches) {
            return true;
        }
        if !self.follows_publication
            || known
                .refreshed
                .is_some_and(|t| t.elapsed() < PUBLICATION_REFRESH_INTERVAL)
        {
            return false;
        }
        // Held while reading: concurrent requests wait for this read instead of starting
        // their own.
        known.refreshed = Some(Instant::now());
        match self.read_publication() {
            Ok(tables) => {
                for t in &tables {
                    if !known.tables.contains(t) {
                        log::info!(
                            "{} was added to publication '{}': snapshots of it can be requested",
                            t.qualified(),
                            self.publication
                        );
                    }
                }
                known.tables = tables;
            }
            Err(e) => log::warn!(
                "cannot read the tables of publication '{}' for a snapshot request of \
                 {schema}.{table}: {e}",
                self.publication
            ),
        }
        known.tables.iter().any(matches)
    }

    /// PostgreSQL's row estimate of the table (`pg_class.reltuples`), for the progress of its
    /// snapshot; `None` when it has none (never vacuumed or analysed) or cannot be read.
    fn estimate_rows(&self, schema: &str, table: &str) -> Option<u64> {
        let refs: Vec<(&str, &str)> = self
            .pg_params
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let sql = format!(
            "SELECT reltuples::float8 FROM pg_class WHERE oid = {}::regclass",
            crate::pg::conn::quote_literal(&format!(
                "{}.{}",
                crate::pg::conn::quote_ident(schema),
                crate::pg::conn::quote_ident(table)
            ))
        );
        let read = PgConnection::connect(&refs, ConnectionKind::Normal)
            .and_then(|mut conn| conn.query(&sql));
        match read {
            Ok(result) => result
                .get(0, "reltuples")
                .and_then(|t| t.parse::<f64>().ok())
                .filter(|n| *n >= 0.0)
                .map(|n| n.round() as u64),
            Err(e) => {
                log::debug!("cannot read the row estimate of {schema}.{table}: {e}");
                None
            }
        }
    }

    /// Records the rows a running snapshot has copied and updates the progress gauge.
    fn progress_update(&self, id: &str, copied: u64, estimated: Option<u64>) {
        let mut running = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        running.insert(id.to_owned(), (copied, estimated));
        if let Some(ratio) = progress_ratio(&running) {
            self.telemetry.set_snapshot_progress(ratio);
        }
    }

    /// Removes an ended snapshot from the gauge: 1 when the last running one completed, 0
    /// when it failed, the others' progress while some still run.
    fn progress_end(&self, id: &str, completed: bool) {
        let mut running = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(id);
        let ratio = progress_ratio(&running).unwrap_or(if completed { 1.0 } else { 0.0 });
        self.telemetry.set_snapshot_progress(ratio);
    }

    /// The publication's tables, over a normal connection.
    fn read_publication(&self) -> Result<Vec<PublishedTable>, crate::pg::conn::PgError> {
        let refs: Vec<(&str, &str)> = self
            .pg_params
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let mut conn = PgConnection::connect(&refs, ConnectionKind::Normal)?;
        published_tables(&mut conn, &self.publication)
    }

    /// Admits a snapshot of the table under the rules; the claim holds its place.
    fn admit(self: &Arc<Self>, schema: &str, table: &str) -> Result<Claim, Refusal> {
        let key = (schema.to_string(), table.to_string());
        self.admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(&key, self.cooldown, self.max_concurrent, Instant::now())?;
        Ok(Claim {
            service: Arc::clone(self),
            key,
        })
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

    /// `snapshot.on_start`: snapshots, one after the other, every streamed table whose INIT
    /// stream holds no `init.meta.{table}`, or whose last one reports a failure. One at a
    /// time, because each snapshot holds a replication slot and a walsender.
    fn snapshot_on_start(self: &Arc<Self>) {
        for t in &self.initial_tables {
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
            // Under the same cap as requests: wait for a free place.
            let claim = loop {
                if self.shutdown.is_triggered() {
                    return;
                }
                match self.admit(&t.schema, &t.name) {
                    Ok(claim) => break Some(claim),
                    Err(Refusal::Busy(_)) => std::thread::sleep(Duration::from_millis(200)),
                    Err(Refusal::Cooldown { .. }) => {
                        // Started by a request moments ago: that snapshot is the one.
                        break None;
                    }
                    Err(_) => break None,
                }
            };
            let Some(claim) = claim else {
                log::info!(
                    "snapshot on start: a requested snapshot of {qualified} is running or just started; none taken"
                );
                continue;
            };
            let estimated = self.estimate_rows(&t.schema, &t.name);
            self.execute(&t.schema, &t.name, &new_snapshot_id(), estimated);
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
    fn execute(&self, schema: &str, table: &str, id: &str, estimated_rows: Option<u64>) {
        self.progress_update(id, 0, estimated_rows);
        let result = self.run_snapshot(schema, table, id, estimated_rows);
        self.progress_end(id, result.is_ok());
        match result {
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
            &crate::sink::encode::now_timestamp(),
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
        estimated_rows: Option<u64>,
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
                    if row_number.is_multiple_of(PROGRESS_EVERY_ROWS) {
                        self.progress_update(id, row_number, estimated_rows);
                    }
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
            "timestamp": crate::sink::encode::now_timestamp(),
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
    fn progress_is_copied_over_estimated_and_below_one_until_done() {
        let mut running = HashMap::new();
        assert_eq!(progress_ratio(&running), None);
        running.insert("a".to_string(), (0, None));
        assert_eq!(progress_ratio(&running), Some(0.0));
        running.insert("a".to_string(), (250, Some(1000)));
        assert_eq!(progress_ratio(&running), Some(0.25));
        // Two at once: summed; a snapshot without an estimate does not count.
        running.insert("b".to_string(), (750, Some(1000)));
        running.insert("c".to_string(), (5, None));
        assert_eq!(progress_ratio(&running), Some(0.5));
        // An estimate that is too low never shows done before the end.
        running.insert("a".to_string(), (5000, Some(1000)));
        assert_eq!(progress_ratio(&running), Some(PROGRESS_BELOW_DONE));
    }

    #[test]
    fn accepted_reply_has_the_estimate_when_known() {
        let mut a = Accepted {
            snapshot_id: "s1".into(),
            schema: "public".into(),
            table: "t".into(),
            estimated_rows: Some(42),
        };
        assert_eq!(a.to_json()["estimated_rows"], 42);
        a.estimated_rows = None;
        assert!(a.to_json().get("estimated_rows").is_none());
    }

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
    fn replies_go_only_to_subjects_under_the_prefix() {
        let p = "_INBOX.";
        assert!(reply_allowed("_INBOX.abc.1", p));
        assert!(reply_allowed("_INBOX.x", p));
        for bad in [
            "_INBOX.",
            "_INBOX",
            "cdc.users.insert",
            "$KV.schemas.x",
            "$JS.API.STREAM.PURGE.CDC",
            "_INBOX.*",
            "_INBOX.a.>",
            "_INBOX..a",
            "_INBOX.a b",
            "x_INBOX.a",
        ] {
            assert!(!reply_allowed(bad, p), "{bad} allowed");
        }
        assert!(reply_allowed("replies.bridge.1", "replies.bridge."));
        assert!(!reply_allowed("_INBOX.1", "replies.bridge."));
    }

    #[test]
    fn admission_keeps_the_cap_the_cooldown_and_one_snapshot_per_table() {
        let key = |t: &str| ("public".to_string(), t.to_string());
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(10);
        let mut a = Admission::default();
        assert_eq!(a.admit(&key("a"), cooldown, 2, t0), Ok(()));
        assert_eq!(
            a.admit(&key("a"), cooldown, 2, t0),
            Err(Refusal::InProgress("public.a".into()))
        );
        assert_eq!(a.admit(&key("b"), cooldown, 2, t0), Ok(()));
        let busy = a.admit(&key("c"), cooldown, 2, t0).unwrap_err();
        assert_eq!(busy, Refusal::Busy(2));
        assert_eq!(busy.http_status(), 429);
        // a finishes: c fits, a is in its cooldown.
        a.running.remove(&key("a"));
        assert_eq!(a.admit(&key("c"), cooldown, 3, t0), Ok(()));
        let cool = a
            .admit(&key("a"), cooldown, 3, t0 + Duration::from_millis(2500))
            .unwrap_err();
        assert_eq!(cool.code(), "cooldown");
        assert_eq!(cool.retry_after_secs(), Some(8));
        assert!(cool.to_string().contains("try again in 8 s"), "{cool}");
        assert_eq!(
            a.admit(&key("a"), cooldown, 3, t0 + Duration::from_secs(10)),
            Ok(())
        );
        // No cooldown: a new snapshot as soon as the last one ended.
        let mut a = Admission::default();
        assert_eq!(a.admit(&key("a"), Duration::ZERO, 1, t0), Ok(()));
        a.running.remove(&key("a"));
        assert_eq!(a.admit(&key("a"), Duration::ZERO, 1, t0), Ok(()));
    }

    #[test]
    fn refusals_say_why_and_name_only_the_requested_table() {
        let refusals = [
            Refusal::Malformed {
                token: "a.b.c".into(),
                reason: "too many tokens".into(),
            },
            Refusal::UnknownTable("public.nosuch".into()),
            Refusal::InProgress("public.users".into()),
            Refusal::Cooldown {
                table: "public.users".into(),
                cooldown_secs: 10,
                retry_after_secs: 3,
            },
            Refusal::Busy(2),
            Refusal::NotActive,
        ];
        for r in refusals {
            let doc = r.to_json();
            assert_eq!(doc["status"], "error");
            assert_eq!(doc["reason"], r.code());
            let text = doc["error"].as_str().unwrap();
            assert!(
                !text.contains("orders") && !text.contains("streams public"),
                "{text}"
            );
            assert!(r.http_status() >= 400);
        }
        let unknown = Refusal::UnknownTable("public.nosuch".into()).to_string();
        assert!(unknown.contains("unknown table public.nosuch"), "{unknown}");
        assert_eq!(Refusal::Busy(2).to_json()["retry_after_secs"], 1);
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
