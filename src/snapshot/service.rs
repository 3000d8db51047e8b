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

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;

use crate::config::Config;
use crate::pg::conn::{ConnectionKind, PgConnection};
use crate::pg::setup::{published_tables, PublishedTable};
use crate::shutdown::Shutdown;
use crate::telemetry::Telemetry;
use crate::wire::names::SNAPSHOT_REQUEST_PREFIX;
use crate::wire::subject::parse_table_token;

use super::chunks::Chunks;
use super::request::{new_snapshot_id, reply_allowed, shown, Accepted, Admission, Refusal};
use super::target::{InitTarget, LastMeta};

/// Least time between two reads of the publication's tables for requests naming a table the
/// bridge does not know (tables added to the publication while it runs).
const PUBLICATION_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Least time between two warnings about requests with a reply subject outside the prefix;
/// the ones in between are counted and reported with the next warning.
const IGNORED_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// How often the on-start snapshots look for a free place under the cap.
const ADMIT_RETRY: Duration = Duration::from_millis(200);
/// How long shutdown waits for running snapshots to stop and publish their failure document.
/// A snapshot checks for shutdown at every row, so this is only reached when PostgreSQL or
/// NATS hangs.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long the reply to a request waits for the table's row estimate, which the snapshot
/// reads once its connection is up. Below the usual requesters' timeouts (the `nats` tool's
/// 5 s, `bridge snapshot`'s 10 s): a slower login costs the reply its estimate, not the reply.
const ESTIMATE_WAIT: Duration = Duration::from_secs(3);

/// The tables requests may name, and when the publication was last read for new ones.
#[derive(Debug)]
struct KnownTables {
    tables: Vec<PublishedTable>,
    refreshed: Option<Instant>,
}

/// Everything a snapshot needs, shared by the request handlers and snapshot threads.
pub struct SnapshotService {
    /// What publishing a snapshot needs (the broker, PostgreSQL, the settings).
    chunks: Chunks,
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

impl std::fmt::Debug for SnapshotService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotService")
            .field("publication", &self.chunks.publication)
            .field("target", &self.chunks.target.name())
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
            .release(&self.key);
    }
}

impl SnapshotService {
    /// A service for `tables` (the tables the bridge streams at start), publishing to
    /// `target`.
    pub(super) fn new(
        config: &Config,
        target: Box<dyn InitTarget>,
        tables: Vec<PublishedTable>,
        telemetry: Arc<Telemetry>,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        Arc::new(SnapshotService {
            chunks: Chunks {
                target,
                pg_params: config.postgres.libpq_params(),
                publication: config.replication.publication.clone(),
                format: config.replication.format,
                chunk_rows: config.snapshot.chunk_rows,
                shutdown: shutdown.clone(),
            },
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

    /// Without NATS (`--sink kafka`): snapshots are requested over HTTP only. Once this process
    /// streams from the slot, takes the on-start snapshots; then waits for shutdown and
    /// (bounded) for running snapshots to stop.
    pub async fn serve_without_requests(self: Arc<Self>) {
        tokio::select! {
            _ = self.shutdown.triggered() => {}
            _ = self.telemetry.slot_held(true) => {
                log::info!(
                    "snapshots into {} served on POST /snapshots/{{table}}",
                    self.chunks.target.name()
                );
                if self.on_start {
                    let me = Arc::clone(&self);
                    if let Err(e) =
                        self.spawn_worker("snapshot-on-start", move || me.snapshot_on_start())
                    {
                        log::error!("snapshot on start: cannot start the thread: {e}");
                    }
                }
                self.shutdown.triggered().await;
            }
        }
        self.wait_for_workers().await;
    }

    /// Serves requests until shutdown, while this process streams from the slot: it
    /// subscribes once the slot is held and unsubscribes when it is lost. Then waits (bounded)
    /// for running snapshots to stop.
    pub async fn serve(self: Arc<Self>, client: async_nats::Client) {
        let mut on_start_pending = self.on_start;
        let mut subscribe_failed = false;
        loop {
            tokio::select! {
                _ = self.shutdown.triggered() => break,
                _ = self.telemetry.slot_held(true) => {}
            }
            let mut sub = match client
                .subscribe(format!("{SNAPSHOT_REQUEST_PREFIX}.>"))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    if !subscribe_failed {
                        log::warn!(
                            "cannot subscribe to {SNAPSHOT_REQUEST_PREFIX}.>: {e}; retrying"
                        );
                        subscribe_failed = true;
                    }
                    if self.shutdown.sleep(Duration::from_secs(1)).await {
                        break;
                    }
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
                "snapshot requests served on {SNAPSHOT_REQUEST_PREFIX}.{{table}} (replies to {}*)",
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
            loop {
                // Shutdown first: a request queued behind it is not started.
                tokio::select! {
                    biased;
                    _ = self.shutdown.triggered() => break,
                    m = sub.next() => match m {
                        Some(m) => Arc::clone(&self).dispatch(&client, m).await,
                        None => break,
                    },
                    _ = self.telemetry.slot_held(false) => {}
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
                // The requester learns why from the reply; the operator from this line.
                if let Err(r) = &outcome {
                    log::info!("snapshot request on {} refused: {r}", shown(&subject));
                }
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
                            self.chunks.publication
                        );
                    }
                }
                known.tables = tables;
            }
            Err(e) => log::warn!(
                "cannot read the tables of publication '{}' for a snapshot request of \
                 {schema}.{table}: {e}",
                self.chunks.publication
            ),
        }
        known.tables.iter().any(matches)
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
        let mut conn = PgConnection::connect(&self.chunks.pg_params, ConnectionKind::Normal)?;
        published_tables(&mut conn, &self.chunks.publication)
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

    /// `snapshot.on_start`: snapshots, one after the other, every streamed table whose target
    /// holds no meta (`init.meta.{table}` in the INIT stream, a meta record in its Kafka init
    /// topic), or whose last one reports a failure. One at a
    /// time, because each snapshot holds a replication slot and a walsender.
    fn snapshot_on_start(self: &Arc<Self>) {
        for t in &self.initial_tables {
            if self.shutdown.is_triggered() {
                return;
            }
            let qualified = t.qualified();
            let (place, subject) = self.chunks.target.meta_location(&t.schema, &t.name);
            match self.chunks.target.last_meta(&t.schema, &t.name) {
                Ok(LastMeta::Finished) => {
                    log::info!(
                        "snapshot on start: {place} already holds a snapshot of {qualified} ({subject}); none taken"
                    );
                    continue;
                }
                Ok(LastMeta::Missing) => log::info!(
                    "snapshot on start: {place} holds no snapshot of {qualified} ({subject}); taking one"
                ),
                Ok(LastMeta::Failed) => log::info!(
                    "snapshot on start: the last snapshot of {qualified} in {place} failed; taking a new one"
                ),
                Err(e) => {
                    log::warn!(
                        "snapshot on start: cannot read {subject} from {place}: {e}; {qualified} not snapshotted"
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
                    Err(Refusal::Busy(_)) => {
                        if self.shutdown.wait_timeout(ADMIT_RETRY) {
                            return;
                        }
                    }
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
            self.execute(&t.schema, &t.name, &new_snapshot_id(), None);
            drop(claim);
        }
    }

    /// Takes and publishes one snapshot; a failure is logged and published as a failure
    /// document in the meta's place. `estimate_to` is sent the table's row estimate once the
    /// snapshot's connection has read it, and dropped unsent when the snapshot fails before.
    fn execute(
        &self,
        schema: &str,
        table: &str,
        id: &str,
        estimate_to: Option<SyncSender<Option<u64>>>,
    ) {
        let estimated_rows = Cell::new(None);
        self.progress_update(id, 0, None);
        let on_connected = |estimate: Option<u64>| {
            estimated_rows.set(estimate);
            self.progress_update(id, 0, estimate);
            if let Some(to) = estimate_to {
                // The requester may have stopped waiting.
                let _ = to.send(estimate);
            }
        };
        let result = self
            .chunks
            .run_snapshot(schema, table, id, on_connected, &|rows| {
                self.progress_update(id, rows, estimated_rows.get())
            });
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
                self.chunks.publish_failure(schema, table, id, &e);
            }
        }
    }

    /// A request on `snapshot.request.{table}`.
    pub fn request_subject(self: &Arc<Self>, subject: &str) -> Result<Accepted, Refusal> {
        let token = subject
            .strip_prefix(SNAPSHOT_REQUEST_PREFIX)
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
        let (estimate_to, estimate) = std::sync::mpsc::sync_channel(1);
        // The claim moves into the thread and frees the table when the snapshot ends; if
        // the thread cannot start, it is dropped with the closure and frees it at once.
        self.spawn_worker("snapshot", move || {
            claim
                .service
                .execute(&claim.key.0, &claim.key.1, &id, Some(estimate_to));
            drop(claim);
        })
        .map_err(|e| Refusal::Internal(e.to_string()))?;
        // Read on the snapshot's own connection (one login per snapshot): the reply waits
        // for it, at most ESTIMATE_WAIT, and goes without it when the snapshot failed first.
        let estimated_rows = estimate.recv_timeout(ESTIMATE_WAIT).ok().flatten();
        Ok(Accepted {
            snapshot_id,
            schema,
            table,
            estimated_rows,
        })
    }

    /// Admits a snapshot of the table under the rules; the claim holds its place.
    fn admit(self: &Arc<Self>, schema: &str, table: &str) -> Result<Claim, Refusal> {
        let key = (schema.to_string(), table.to_string());
        self.admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(
                &key,
                self.cooldown,
                self.max_concurrent,
                Instant::now(),
                || self.chunks.target.awaited_meta(schema, table),
            )?;
        Ok(Claim {
            service: Arc::clone(self),
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
