//! `bridge mirror`: a consumer that keeps a local SQLite database equal to chosen PostgreSQL
//! tables, from what the bridge publishes (DESIGN §5's bootstrap rule):
//!
//! 1. read each table's schema from the KV bucket `schemas` and create the SQLite table (new
//!    columns are added when a later schema revision has them);
//! 2. when the table has no stored position, or the CDC stream no longer holds the change after
//!    it, request a snapshot (`snapshot.request.{table}`), and load its chunks
//!    `init.snap.{table}.{id}.*` as they arrive, in one SQLite transaction with the position
//!    (`lsn`, `cdc_stream_seq`) of its meta message;
//! 3. follow the CDC stream with a durable pull consumer from the lowest stored sequence + 1,
//!    applying to each table only the changes after its own stored sequence whose
//!    `commit_lsn >= lsn`.
//!
//! Changes are applied in SQLite transactions that end only between source transactions
//! (several small source transactions may share one); the stored sequence moves in the same
//! transaction, so a restart, even after `kill -9`, neither loses nor repeats a change. The
//! end of a source transaction is its change marked `last_in_tx`, or a change of a later
//! transaction; when the marked change is of a table not mirrored, the stream's next messages
//! are looked at ([`Mirror::transaction_ended`]). Changes from a bridge that does not mark
//! them are committed after [`IDLE_COMMIT`] without a change, as before.
//!
//! Each row keeps the version (`commit_lsn`, `seq`) of its last change, and deleted rows a
//! tombstone (see [`store`]): a change that comes again, or out of order, and is not newer
//! than the row is skipped.
//!
//! Schema changes are followed from the changes themselves: a column a change has and the
//! table lacks is added, a column neither the change nor the newest schema revision has is
//! dropped, and a column whose values no longer fit its SQLite type is retyped to the type of
//! the newest revision.

pub(crate) mod doc;
mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, Context, Message};
use bytes::Bytes;
use futures_util::StreamExt;
use rmpv::Value;

use crate::config::Config;
use crate::pg::Lsn;
use crate::pipeline::event::parse_message_id;
use crate::shutdown::Shutdown;
use crate::sink::nats::{connect, NatsError, CDC_SUBJECT_PREFIX, INIT_SUBJECT_PREFIX};
use crate::sink::subject::{parse_table_token, table_token, DEFAULT_SCHEMA};
use crate::snapshot::schemas::{schema_key, SCHEMAS_BUCKET};
use crate::snapshot::REQUEST_PREFIX;

pub use doc::ColumnKind;
pub use store::{Position, StoreError, STATE_TABLE, TOMBSTONE_TTL, VERSIONS_TABLE};
use store::{Store, Version};

/// Prefix of the default durable consumer name, see [`default_durable`].
pub const DEFAULT_DURABLE_PREFIX: &str = "pgbridge-mirror-";
/// NATS connection name.
const CONNECTION_NAME: &str = "pgbridge-mirror";
/// How long to wait for a table's schema to appear in the KV bucket (the bridge writes it at
/// start).
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one snapshot request may wait for the bridge's reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to keep asking when no bridge answers snapshot requests (it may be restarting).
const BRIDGE_WAIT: Duration = Duration::from_secs(300);
/// Default of [`MirrorOptions::snapshot_stall`].
pub const DEFAULT_SNAPSHOT_STALL: Duration = Duration::from_secs(60);
/// An open SQLite transaction is committed when no change arrived for this long.
pub const IDLE_COMMIT: Duration = Duration::from_millis(100);
/// Changes per SQLite transaction before it is committed at the next source-transaction
/// boundary.
const COMMIT_EVERY: u64 = 2000;
/// Unacknowledged messages the consumer may have outstanding: above [`COMMIT_EVERY`] plus one
/// large source transaction's worth, so delivery never waits for a commit that waits for it.
const MAX_ACK_PENDING: i64 = 100_000;
/// Inside one source transaction, messages are acknowledged every this many before the
/// commit, so a transaction larger than [`MAX_ACK_PENDING`] does not stop delivery. That is
/// safe: the consumer is made anew from the positions in the SQLite file at every start.
const ACK_INSIDE_TRANSACTION_EVERY: u64 = 10_000;
/// At most this many messages of the stream are looked at, per idle pause, to find where a
/// transaction whose last change is of another table ends.
const PROBE_MESSAGES: u64 = 1_000;
/// A table's schema is read again at most this often because of a change that suggests a
/// dropped or retyped column.
const SCHEMA_RECHECK: Duration = Duration::from_secs(1);
/// How often tombstones older than [`TOMBSTONE_TTL`] are dropped (with a commit).
const TOMBSTONE_PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How long the server waits for an acknowledgement before delivering again.
const ACK_WAIT: Duration = Duration::from_secs(120);
/// Pause before following again after the consumer's message stream failed.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// The durable consumer name of the mirror into `db` unless `--durable` says otherwise:
/// [`DEFAULT_DURABLE_PREFIX`] and a hash of the host name and the file's absolute path
/// (symbolic links resolved), so two mirrors never share (and delete) each other's consumer.
pub fn default_durable(db: &std::path::Path) -> String {
    let absolute = std::path::absolute(db).unwrap_or_else(|_| db.to_path_buf());
    // The file may not exist yet: resolve its directory.
    let canonical = match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or_else(|_| absolute.clone()),
        _ => absolute.clone(),
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    // FNV-1a: stable across builds and Rust versions, unlike the std hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let path = canonical.to_string_lossy();
    for byte in host.trim().bytes().chain([0]).chain(path.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{DEFAULT_DURABLE_PREFIX}{hash:016x}")
}

/// What `bridge mirror` does, besides the NATS connection and stream names of the
/// configuration.
#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// The SQLite file (created when missing).
    pub db: PathBuf,
    /// Tables as `table` or `schema.table`; empty mirrors every table in the `schemas` bucket.
    pub tables: Vec<String>,
    /// Durable consumer name on the CDC stream; one per mirror file ([`default_durable`]).
    pub durable: String,
    /// Stop after this long without a new change (`None`: run until shutdown).
    pub until_idle: Option<Duration>,
    /// A snapshot that sends neither a chunk nor its meta for this long is given up and
    /// requested again (the bridge serving it was stopped).
    pub snapshot_stall: Duration,
}

/// Why the mirror stopped.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// NATS unreachable, credentials refused, JetStream disabled.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// The SQLite file.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A JetStream stream the mirror reads does not exist.
    #[error(
        "JetStream stream '{0}' does not exist: start the bridge first (it creates its streams), \
         or fix --stream"
    )]
    StreamMissing(String),
    /// Nothing to mirror.
    #[error("{0}")]
    NoTables(String),
    /// A table has no schema in the KV bucket.
    #[error(
        "no schema for {0} in KV bucket '{SCHEMAS_BUCKET}' after {SCHEMA_TIMEOUT:?}: is the table \
         streamed by a running bridge (check its --table and publication)?"
    )]
    NoSchema(String),
    /// The bridge refused a snapshot request.
    #[error("snapshot of {table} refused by the bridge: {reason}")]
    SnapshotRefused {
        /// The table.
        table: String,
        /// The bridge's reply.
        reason: String,
    },
    /// The bridge reported the snapshot failed.
    #[error("snapshot {snapshot_id} of {table} failed in the bridge: {reason}")]
    SnapshotFailed {
        /// The table.
        table: String,
        /// The snapshot.
        snapshot_id: String,
        /// The bridge's error.
        reason: String,
    },
    /// No bridge answered snapshot requests.
    #[error(
        "no bridge answered snapshot requests on {subject} for {BRIDGE_WAIT:?}: start the \
         bridge (it serves snapshot requests for the tables it streams)"
    )]
    NoBridge {
        /// The request subject.
        subject: String,
    },
    /// A message that is not what the bridge publishes.
    #[error("message {stream} #{seq}: {reason}")]
    BadMessage {
        /// The stream.
        stream: String,
        /// Its sequence.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// A JetStream request failed.
    #[error("JetStream: {0}")]
    JetStream(String),
}

impl MirrorError {
    /// The process exit code: 2 for what the operator must fix in the configuration or the
    /// source tables, 1 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            MirrorError::Nats(e) if e.is_configuration() => 2,
            MirrorError::NoTables(_)
            | MirrorError::StreamMissing(_)
            | MirrorError::Store(StoreError::Unsupported { .. }) => 2,
            _ => 1,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorSummary {
    /// Snapshots loaded.
    pub snapshots: u64,
    /// Rows loaded from snapshots.
    pub snapshot_rows: u64,
    /// Changes applied.
    pub applied: u64,
    /// Changes skipped: committed before their table's snapshot, or already applied.
    pub skipped: u64,
}

/// One mirrored table.
#[derive(Clone, Debug)]
struct MirrorTable {
    schema: String,
    name: String,
    /// Subject token: `users`, `sales.invoices`.
    token: String,
    /// Table name in SQLite: `users`, `sales.invoices`.
    local: String,
}

impl MirrorTable {
    fn new(schema: String, name: String) -> Self {
        MirrorTable {
            token: table_token(&schema, &name),
            local: if schema == DEFAULT_SCHEMA {
                name.clone()
            } else {
                format!("{schema}.{name}")
            },
            schema,
            name,
        }
    }
}

/// What became of one change.
enum Applied {
    /// Applied.
    Yes,
    /// Not newer than the row (or the table's last TRUNCATE): left out.
    Stale,
    /// Nothing changed: the table needs a new snapshot first (a column with a default was
    /// added).
    NeedsSnapshot,
}

/// How following the stream ended.
enum FollowEnd {
    /// Shutdown requested, or idle for `until_idle`.
    Done,
    /// These tables need a new snapshot first.
    Snapshot(Vec<String>),
    /// The consumer failed; follow again from the stored positions.
    Restart,
}

/// Runs the mirror until `shutdown` (or `until_idle`), on a runtime of its own.
pub fn run(
    config: &Config,
    options: &MirrorOptions,
    shutdown: &Shutdown,
) -> Result<MirrorSummary, MirrorError> {
    let rt = crate::runtime::current_thread()
        .map_err(|e| MirrorError::JetStream(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async {
        let (client, _) = connect(&config.nats, CONNECTION_NAME).await?;
        let store = Store::open(&options.db)?;
        let mut mirror = Mirror {
            schema_checked: HashMap::new(),
            tombstones_pruned: Instant::now(),
            js: jetstream::new(client.clone()),
            client,
            store,
            tables: Vec::new(),
            cdc: config.streams.cdc.clone(),
            init: config.streams.init.clone(),
            options: options.clone(),
            shutdown: shutdown.clone(),
            summary: MirrorSummary::default(),
        };
        mirror.run().await?;
        Ok(mirror.summary)
    })
}

/// Opens a stream: [`MirrorError::StreamMissing`] when the server says it does not exist,
/// [`MirrorError::JetStream`] (worth retrying) for anything else.
pub(crate) async fn open_stream(
    js: &Context,
    name: &str,
) -> Result<jetstream::stream::Stream, MirrorError> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    js.get_stream(name).await.map_err(|e| match e.kind() {
        GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            MirrorError::StreamMissing(name.to_owned())
        }
        _ => MirrorError::JetStream(format!("reading stream '{name}': {e}")),
    })
}

/// The messages of `stream` on `filter`, in order, through an ordered consumer.
async fn ordered(
    stream: &jetstream::stream::Stream,
    filter: String,
    deliver_policy: DeliverPolicy,
) -> Result<pull::Ordered, MirrorError> {
    let js_err = |e: &dyn std::fmt::Display| MirrorError::JetStream(format!("{filter}: {e}"));
    stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.clone(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| js_err(&e))?
        .messages()
        .await
        .map_err(|e| js_err(&e))
}

struct Mirror {
    /// When each table's schema was last read because a change suggested a dropped or
    /// retyped column.
    schema_checked: HashMap<String, Instant>,
    /// When old tombstones were last dropped.
    tombstones_pruned: Instant,
    js: Context,
    client: async_nats::Client,
    store: Store,
    tables: Vec<MirrorTable>,
    cdc: String,
    init: String,
    options: MirrorOptions,
    shutdown: Shutdown,
    summary: MirrorSummary,
}

impl Mirror {
    async fn run(&mut self) -> Result<(), MirrorError> {
        for stream in [self.cdc.clone(), self.init.clone()] {
            open_stream(&self.js, &stream).await?;
        }
        self.tables = self.resolve_tables().await?;
        let names: Vec<&str> = self.tables.iter().map(|t| t.local.as_str()).collect();
        log::info!(
            "mirroring {} into {}",
            names.join(", "),
            self.options.db.display()
        );
        let mut pending: Vec<String> = Vec::new();
        for t in self.tables.clone() {
            let schema = self.schema(&t).await?;
            let defaults_added = self.store.apply_schema(&t.token, &t.local, &schema, None)?;
            if self.store.position(&t.token)?.is_none() {
                pending.push(t.token.clone());
            } else if defaults_added {
                log::info!(
                    "{}: a column with a default was added; taking a new snapshot",
                    t.local
                );
                pending.push(t.token.clone());
            }
        }
        // JetStream failures (NATS restarting, a request timing out) are waited out: the
        // client reconnects by itself, and the SQLite file says where to go on.
        loop {
            while let Some(token) = pending.first().cloned() {
                match self.snapshot(&token).await {
                    Ok(true) => {
                        pending.remove(0);
                    }
                    Ok(false) => return Ok(()),
                    Err(MirrorError::JetStream(e)) => {
                        self.store.rollback()?;
                        log::warn!("snapshot of {token}: {e}; trying again");
                        if !self.pause().await {
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        self.store.rollback()?;
                        return Err(e);
                    }
                }
            }
            match self.follow().await {
                Ok(FollowEnd::Done) => return Ok(()),
                Ok(FollowEnd::Snapshot(tokens)) => pending = tokens,
                Ok(FollowEnd::Restart) => {
                    if !self.pause().await {
                        return Ok(());
                    }
                }
                Err(MirrorError::JetStream(e)) => {
                    self.store.rollback()?;
                    log::warn!("following stream {}: {e}; trying again", self.cdc);
                    if !self.pause().await {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits [`RESTART_DELAY`]; false when shutdown was asked for.
    async fn pause(&self) -> bool {
        if self.shutdown.is_triggered() {
            return false;
        }
        tokio::time::sleep(RESTART_DELAY).await;
        !self.shutdown.is_triggered()
    }

    /// The tables named by `--table`, or those with a schema in the bucket.
    async fn resolve_tables(&self) -> Result<Vec<MirrorTable>, MirrorError> {
        if !self.options.tables.is_empty() {
            return Ok(self
                .options
                .tables
                .iter()
                .map(|t| match t.split_once('.') {
                    Some((s, n)) => MirrorTable::new(s.to_owned(), n.to_owned()),
                    None => MirrorTable::new(DEFAULT_SCHEMA.to_owned(), t.clone()),
                })
                .collect());
        }
        let deadline = Instant::now() + SCHEMA_TIMEOUT;
        loop {
            let mut tables = Vec::new();
            if let Ok(kv) = self.js.get_key_value(SCHEMAS_BUCKET).await {
                if let Ok(mut keys) = kv.keys().await {
                    while let Some(Ok(key)) = keys.next().await {
                        if let Ok((s, n)) = parse_table_token(&key.replace('=', "%")) {
                            tables.push(MirrorTable::new(s, n));
                        }
                    }
                }
            }
            if !tables.is_empty() {
                tables.sort_by(|a, b| a.token.cmp(&b.token));
                return Ok(tables);
            }
            if Instant::now() > deadline || self.shutdown.is_triggered() {
                return Err(MirrorError::NoTables(format!(
                    "nothing to mirror: KV bucket '{SCHEMAS_BUCKET}' holds no table schema; start \
                     the bridge (it writes the schemas of the tables it streams) or name tables \
                     with --table"
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The table's current schema document, waiting for it to appear.
    async fn schema(&self, t: &MirrorTable) -> Result<Value, MirrorError> {
        let key = schema_key(&t.schema, &t.name);
        let deadline = Instant::now() + SCHEMA_TIMEOUT;
        loop {
            if let Ok(kv) = self.js.get_key_value(SCHEMAS_BUCKET).await {
                if let Ok(Some(bytes)) = kv.get(key.as_str()).await {
                    return doc::decode(&bytes).map_err(|e| MirrorError::BadMessage {
                        stream: format!("KV_{SCHEMAS_BUCKET}"),
                        seq: 0,
                        reason: format!("schema of {}: {e}", t.local),
                    });
                }
            }
            if Instant::now() > deadline || self.shutdown.is_triggered() {
                return Err(MirrorError::NoSchema(format!("{}.{}", t.schema, t.name)));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn table(&self, token: &str) -> Option<&MirrorTable> {
        self.tables.iter().find(|t| t.token == token)
    }

    /// Makes sure the SQLite table has `names` as columns, reading the schema again when not
    /// (the source table was altered; the bridge writes the new revision as it sees it).
    /// Returns true when a column with a default was added: the table's older rows then need
    /// a new snapshot (see [`Store::apply_schema`]).
    async fn ensure_columns(&mut self, token: &str, names: &[&str]) -> Result<bool, MirrorError> {
        if self.store.has_columns(token, names.iter().copied()) {
            return Ok(false);
        }
        let t = self
            .table(token)
            .cloned()
            .ok_or_else(|| MirrorError::BadMessage {
                stream: self.cdc.clone(),
                seq: 0,
                reason: format!("change for {token}, which is not mirrored"),
            })?;
        let deadline = Instant::now() + SCHEMA_TIMEOUT;
        let mut defaults_added = false;
        loop {
            let schema = self.schema(&t).await?;
            defaults_added |= self.store.apply_schema(&t.token, &t.local, &schema, None)?;
            if self.store.has_columns(token, names.iter().copied()) {
                return Ok(defaults_added);
            }
            if Instant::now() > deadline {
                return Err(MirrorError::NoSchema(format!(
                    "{}.{} with columns {}",
                    t.schema,
                    t.name,
                    names.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Requests a snapshot of the table and loads it with its position, replacing the table's
    /// rows. Returns false when stopped by shutdown (nothing changed then).
    async fn snapshot(&mut self, token: &str) -> Result<bool, MirrorError> {
        let js_err = |e: &dyn std::fmt::Display| MirrorError::JetStream(e.to_string());
        let init = open_stream(&self.js, &self.init).await?;
        loop {
            // Subscribed before the request, so the meta cannot be missed.
            let meta_subject = format!("{INIT_SUBJECT_PREFIX}.meta.{token}");
            let mut metas = ordered(&init, meta_subject, DeliverPolicy::New).await?;
            let Some(id) = self.request_snapshot(token).await? else {
                return Ok(false);
            };
            log::info!("snapshot {id} of {token} requested");
            let chunk_subjects = format!("{INIT_SUBJECT_PREFIX}.snap.{token}.{id}.*");
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
                        let n = doc::u64_field(&chunk, "chunk").map_err(|e| self.bad(&msg, e))?;
                        if n != loaded {
                            self.store.rollback()?;
                            return Err(self.bad(&msg, format!("chunk {n} came where {loaded} was due")));
                        }
                        let data = match doc::field(&chunk, "data") {
                            Some(Value::Array(d)) => d,
                            _ => return Err(self.bad(&msg, "chunk without a data list")),
                        };
                        for row in data {
                            let pairs = doc::row_pairs(row).map_err(|e| self.bad(&msg, e))?;
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
                        if doc::str_field(&doc, "snapshot_id").ok() != Some(id.as_str()) {
                            continue; // another consumer's snapshot of the same table
                        }
                        if let Some(err) = doc::field(&doc, "error") {
                            self.store.rollback()?;
                            return Err(MirrorError::SnapshotFailed {
                                table: token.to_owned(),
                                snapshot_id: id,
                                reason: err.as_str().map_or_else(|| err.to_string(), str::to_owned),
                            });
                        }
                        let position = Position {
                            snapshot_id: id.clone(),
                            lsn: doc::lsn_field(&doc, "lsn").map_err(|e| self.bad(&msg, e))?,
                            last_seq: doc::u64_field(&doc, "cdc_stream_seq").map_err(|e| self.bad(&msg, e))?,
                        };
                        let batches = doc::u64_field(&doc, "batch_count").map_err(|e| self.bad(&msg, e))?;
                        meta = Some((position, batches));
                        progress = Instant::now();
                    }
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
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
        let subject = format!("{REQUEST_PREFIX}.{token}");
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
                    if answer["status"] == "accepted" {
                        if let Some(id) = answer["snapshot_id"].as_str() {
                            return Ok(Some(id.to_owned()));
                        }
                    }
                    let reason = answer["error"].as_str().map_or_else(
                        || String::from_utf8_lossy(&msg.payload).into_owned(),
                        str::to_owned,
                    );
                    // Passing refusals: a snapshot of this table runs or just started (another
                    // consumer's), or the bridge runs as many as it allows.
                    let passing = matches!(
                        answer["reason"].as_str(),
                        Some("in_progress" | "cooldown" | "busy")
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
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn decode(&self, msg: &Message) -> Result<Value, MirrorError> {
        doc::decode(&msg.payload).map_err(|e| self.bad(msg, e))
    }

    fn bad(&self, msg: &Message, reason: impl std::fmt::Display) -> MirrorError {
        let (stream, seq) = msg
            .info()
            .map(|i| (i.stream.to_owned(), i.stream_sequence))
            .unwrap_or_default();
        MirrorError::BadMessage {
            stream,
            seq,
            reason: format!("{} ({})", reason, msg.subject),
        }
    }

    /// Follows the CDC stream from the stored positions.
    async fn follow(&mut self) -> Result<FollowEnd, MirrorError> {
        let mut positions: HashMap<String, Position> = HashMap::new();
        for t in &self.tables {
            if let Some(p) = self.store.position(&t.token)? {
                positions.insert(t.token.clone(), p);
            }
        }
        let mut cdc = open_stream(&self.js, &self.cdc).await?;
        let first = cdc
            .info()
            .await
            .map_err(|e| MirrorError::JetStream(e.to_string()))?
            .state
            .first_sequence;
        let stale: Vec<String> = positions
            .iter()
            .filter(|(_, p)| p.last_seq + 1 < first)
            .map(|(t, p)| {
                log::info!(
                    "the CDC stream no longer holds sequence {} of {t} (it starts at {first}): \
                     taking a new snapshot",
                    p.last_seq + 1
                );
                t.clone()
            })
            .collect();
        if !stale.is_empty() {
            return Ok(FollowEnd::Snapshot(stale));
        }
        let start = positions.values().map(|p| p.last_seq).min().unwrap_or(0) + 1;
        let durable = self.options.durable.clone();
        // The SQLite file holds the position: the consumer is made anew from it each time.
        let _ = cdc.delete_consumer(&durable).await;
        let consumer = cdc
            .create_consumer(pull::Config {
                durable_name: Some(durable.clone()),
                description: Some(format!(
                    "pgbridge mirror into {}",
                    self.options.db.display()
                )),
                filter_subjects: self
                    .tables
                    .iter()
                    .map(|t| format!("{CDC_SUBJECT_PREFIX}.{}.*", t.token))
                    .collect(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ack_policy: AckPolicy::All,
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
                ..Default::default()
            })
            .await
            .map_err(|e| MirrorError::JetStream(format!("creating consumer {durable}: {e}")))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| MirrorError::JetStream(e.to_string()))?;
        log::info!(
            "following stream {} from sequence {start} (consumer {durable})",
            self.cdc
        );

        let mut idle_since = Instant::now();
        let mut last: Option<Message> = None;
        // The source transaction of the last message, whether its end is still to come, and
        // whether any of its changes was applied (changes that come again are all skipped:
        // committing among them splits nothing).
        let mut txn: Option<Lsn> = None;
        let mut open = false;
        let mut txn_applied = false;
        let mut last_stream_seq = start.saturating_sub(1);
        let mut probe_from = 0u64;
        let mut in_batch = 0u64;
        let mut in_txn = 0u64;
        loop {
            let wait = if self.store.in_transaction() {
                IDLE_COMMIT
            } else {
                Duration::from_millis(250)
            };
            let next = tokio::time::timeout(wait, messages.next()).await;
            let msg = match next {
                Err(_) => {
                    open &= txn_applied;
                    if open {
                        if let Some(t) = txn {
                            if self
                                .transaction_ended(&cdc, t, last_stream_seq, &mut probe_from)
                                .await
                            {
                                open = false;
                            }
                        }
                    }
                    if open {
                        if self.shutdown.is_triggered() {
                            // The rest of the transaction is in the stream: the next run
                            // applies it with the part seen here.
                            self.store.rollback()?;
                            return Ok(FollowEnd::Done);
                        }
                        continue;
                    }
                    self.commit(&mut positions, &mut last, &mut in_batch)
                        .await?;
                    if self.shutdown.is_triggered() {
                        return Ok(FollowEnd::Done);
                    }
                    if let Some(idle) = self.options.until_idle {
                        if idle_since.elapsed() >= idle {
                            log::info!("no change for {idle:?}: stopping");
                            return Ok(FollowEnd::Done);
                        }
                    }
                    continue;
                }
                Ok(None) => {
                    self.end_early(
                        open && txn_applied,
                        &mut positions,
                        &mut last,
                        &mut in_batch,
                    )
                    .await?;
                    log::warn!("the consumer's message stream ended; following again");
                    return Ok(FollowEnd::Restart);
                }
                Ok(Some(Err(e))) => {
                    self.end_early(
                        open && txn_applied,
                        &mut positions,
                        &mut last,
                        &mut in_batch,
                    )
                    .await?;
                    log::warn!("consumer {durable}: {e}; following again");
                    return Ok(FollowEnd::Restart);
                }
                Ok(Some(Ok(msg))) => msg,
            };
            idle_since = Instant::now();
            let seq = msg
                .info()
                .map(|i| i.stream_sequence)
                .map_err(|e| self.bad(&msg, e))?;
            last_stream_seq = seq;
            probe_from = 0;
            let event = self.decode(&msg)?;
            let schema = doc::str_field(&event, "schema").map_err(|e| self.bad(&msg, e))?;
            let table = doc::str_field(&event, "table").map_err(|e| self.bad(&msg, e))?;
            let token = table_token(schema, table);
            let commit_lsn = doc::lsn_field(&event, "commit_lsn").map_err(|e| self.bad(&msg, e))?;
            let last_in_tx = doc::field(&event, "last_in_tx").and_then(Value::as_bool);
            // A change of another transaction: the one before has ended (its last change may
            // be of a table not mirrored). Commit a full batch, or stop when asked to.
            if txn != Some(commit_lsn) {
                in_txn = 0;
                txn_applied = false;
                if self.shutdown.is_triggered() {
                    self.commit(&mut positions, &mut last, &mut in_batch)
                        .await?;
                    return Ok(FollowEnd::Done);
                }
                if in_batch >= COMMIT_EVERY {
                    self.commit(&mut positions, &mut last, &mut in_batch)
                        .await?;
                }
                txn = Some(commit_lsn);
            }
            // Without the marker (an older bridge) the end shows only as a later transaction
            // or a pause.
            open = last_in_tx == Some(false);
            in_txn += 1;
            if in_txn.is_multiple_of(ACK_INSIDE_TRANSACTION_EVERY) {
                if let Err(e) = msg.ack().await {
                    log::debug!("acknowledgement not sent: {e}");
                }
            }
            let Some(position) = positions.get_mut(&token) else {
                last = Some(msg);
                continue;
            };
            if seq <= position.last_seq {
                self.summary.skipped += 1;
                last = Some(msg);
                continue;
            }
            self.store.begin()?;
            if commit_lsn >= position.lsn {
                let applied = self.apply(&token, &event).await.map_err(|e| match e {
                    MirrorError::BadMessage { reason, .. } => self.bad(&msg, reason),
                    e => e,
                })?;
                match applied {
                    Applied::Yes => {
                        self.summary.applied += 1;
                        txn_applied = true;
                    }
                    Applied::Stale => self.summary.skipped += 1,
                    Applied::NeedsSnapshot => {
                        // This change stays unapplied and unacknowledged: the snapshot replaces
                        // the table and its position.
                        self.end_early(true, &mut positions, &mut last, &mut in_batch)
                            .await?;
                        log::info!(
                            "{token}: a column with a default was added; taking a new snapshot"
                        );
                        return Ok(FollowEnd::Snapshot(vec![token]));
                    }
                }
            } else {
                self.summary.skipped += 1;
            }
            let position = positions.get_mut(&token).expect("looked up above");
            position.last_seq = seq;
            self.store.set_last_seq(&token, seq)?;
            in_batch += 1;
            last = Some(msg);
            if last_in_tx == Some(true) && self.shutdown.is_triggered() {
                self.commit(&mut positions, &mut last, &mut in_batch)
                    .await?;
                return Ok(FollowEnd::Done);
            }
        }
    }

    /// Whether the transaction at `commit_lsn`, whose last change seen so far (at stream
    /// sequence `after`) is not marked last, has ended: the stream's following messages, of any
    /// table, show either its marked last change or a change of a later transaction. Reads
    /// at most [`PROBE_MESSAGES`] from `probe_from` on (0: from `after + 1`), and remembers
    /// where it stopped.
    async fn transaction_ended(
        &self,
        cdc: &jetstream::stream::Stream,
        commit_lsn: Lsn,
        after: u64,
        probe_from: &mut u64,
    ) -> bool {
        let Ok(info) = cdc.get_info().await else {
            return false;
        };
        let end = info.state.last_sequence;
        let mut seq = (*probe_from).max(after + 1);
        let stop = end.min(seq + PROBE_MESSAGES - 1);
        while seq <= stop {
            // A message gone from the stream (limits) says nothing.
            if let Ok(m) = cdc.get_raw_message(seq).await {
                let id_lsn = m
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .and_then(|v| id_commit_lsn(v.as_str()));
                let marked = m
                    .headers
                    .get(crate::sink::encode::LAST_IN_TX_HEADER)
                    .is_some_and(|v| v.as_str() == "true");
                match id_lsn {
                    Some(l) if l != commit_lsn => return true,
                    Some(_) if marked => return true,
                    _ => {}
                }
            }
            seq += 1;
        }
        *probe_from = seq;
        false
    }

    /// Ends following before the stream did: commits what was applied when it stopped between
    /// source transactions (`open` false), rolls it back otherwise (the next run applies the
    /// whole transaction again, from the positions in the file).
    async fn end_early(
        &mut self,
        open: bool,
        positions: &mut HashMap<String, Position>,
        last: &mut Option<Message>,
        in_batch: &mut u64,
    ) -> Result<(), MirrorError> {
        if open {
            self.store.rollback()?;
            *last = None;
            *in_batch = 0;
            Ok(())
        } else {
            self.commit(positions, last, in_batch).await
        }
    }

    /// Commits the open transaction and acknowledges every message up to the last one.
    ///
    /// The consumer delivers every change of every mirrored table in stream order, so once the
    /// message at sequence `s` is handled, no table has an unseen change before `s`: each
    /// table's stored sequence moves up to `s` with the commit. A table that rarely changes
    /// then does not fall behind the stream's limits and need a snapshot it does not need.
    async fn commit(
        &mut self,
        positions: &mut HashMap<String, Position>,
        last: &mut Option<Message>,
        in_batch: &mut u64,
    ) -> Result<(), MirrorError> {
        if let Some(seq) = last
            .as_ref()
            .and_then(|m| m.info().ok())
            .map(|i| i.stream_sequence)
        {
            for (token, p) in positions.iter_mut() {
                if p.last_seq < seq {
                    self.store.begin()?;
                    p.last_seq = seq;
                    self.store.set_last_seq(token, seq)?;
                }
            }
        }
        if self.tombstones_pruned.elapsed() >= TOMBSTONE_PRUNE_EVERY {
            self.store.begin()?;
            let n = self.store.prune_tombstones()?;
            log::debug!("{n} tombstones older than {TOMBSTONE_TTL:?} dropped");
            self.tombstones_pruned = Instant::now();
        }
        self.store.commit()?;
        *in_batch = 0;
        if let Some(msg) = last.take() {
            // AckAll: one acknowledgement covers every earlier message. A lost one only
            // means a redelivery, which the stored sequences skip.
            if let Err(e) = msg.ack().await {
                log::debug!("acknowledgement not sent: {e}");
            }
        }
        Ok(())
    }

    /// Applies one change event to the table, unless it is not newer than the row it changes.
    async fn apply(&mut self, token: &str, event: &Value) -> Result<Applied, MirrorError> {
        let bad = |e: doc::DocError| MirrorError::BadMessage {
            stream: String::new(),
            seq: 0,
            reason: e.0,
        };
        let op = doc::str_field(event, "operation").map_err(bad)?;
        let version: Version = (
            doc::lsn_field(event, "commit_lsn").map_err(bad)?.0,
            u32::try_from(doc::u64_field(event, "seq").map_err(bad)?).unwrap_or(u32::MAX),
        );
        if op == "TRUNCATE" {
            if !self.store.is_newer(token, &[], version)? {
                return Ok(Applied::Stale);
            }
            self.store.truncate(token, version)?;
            return Ok(Applied::Yes);
        }
        let columns = doc::column_pairs(event, "columns").map_err(bad)?;
        let key = self.store.key_of(token, &columns)?;
        let key_text = store::key_text(&key);
        match op {
            "INSERT" | "UPDATE" => {
                let old = doc::column_pairs(event, "old_columns").map_err(bad)?;
                let old_key = if old.is_empty() {
                    None
                } else {
                    Some(self.store.key_of(token, &old)?).filter(|k| *k != key)
                };
                let old_text = old_key.as_deref().map(store::key_text);
                let mut keys = vec![key_text.as_str()];
                keys.extend(old_text.as_deref());
                if !self.store.is_newer(token, &keys, version)? {
                    return Ok(Applied::Stale);
                }
                if self.follow_schema(token, event, &columns).await? {
                    return Ok(Applied::NeedsSnapshot);
                }
                if let (Some(old_key), Some(old_text)) = (&old_key, &old_text) {
                    self.store.move_key(token, old_key, &key)?;
                    self.store.set_version(token, old_text, version, true)?;
                }
                // Columns in `unchanged_toast` are not in `columns`: the row keeps them.
                self.store.upsert(token, &columns)?;
                self.store.set_version(token, &key_text, version, false)?;
            }
            "DELETE" => {
                if !self.store.is_newer(token, &[key_text.as_str()], version)? {
                    return Ok(Applied::Stale);
                }
                self.store.delete(token, &key)?;
                self.store.set_version(token, &key_text, version, true)?;
            }
            other => return Err(bad(doc::DocError(format!("unknown operation {other:?}")))),
        }
        Ok(Applied::Yes)
    }

    /// Brings the table's columns in line with what an INSERT or UPDATE shows: adds the
    /// columns it lacks, and when a column is missing from the change (not an unchanged TOAST
    /// value) or a value does not fit its column's type, reads the newest schema (at most every
    /// [`SCHEMA_RECHECK`]) to drop or retype. Returns true when the table needs a new snapshot
    /// (a column with a default was added).
    async fn follow_schema(
        &mut self,
        token: &str,
        event: &Value,
        columns: &[(&str, &Value)],
    ) -> Result<bool, MirrorError> {
        let names: Vec<&str> = columns.iter().map(|c| c.0).collect();
        if self.ensure_columns(token, &names).await? {
            return Ok(true);
        }
        let Some(kinds) = self.store.column_kinds(token) else {
            return Ok(false);
        };
        let toast: Vec<&str> = match doc::field(event, "unchanged_toast") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let missing = kinds
            .keys()
            .any(|k| !names.contains(&k.as_str()) && !toast.contains(&k.as_str()));
        let misfits: Vec<&str> = columns
            .iter()
            .filter(|(n, v)| kinds.get(*n).is_some_and(|k| !doc::fits(*k, v)))
            .map(|c| c.0)
            .collect();
        if !missing && misfits.is_empty() {
            return Ok(false);
        }
        if self
            .schema_checked
            .get(token)
            .is_some_and(|t| t.elapsed() < SCHEMA_RECHECK)
        {
            return Ok(false);
        }
        self.schema_checked.insert(token.to_owned(), Instant::now());
        let Some(t) = self.table(token).cloned() else {
            return Ok(false);
        };
        let schema = self.schema(&t).await?;
        let mut present = names.clone();
        present.extend(&toast);
        Ok(self
            .store
            .apply_schema(&t.token, &t.local, &schema, Some((&present, &misfits)))?)
    }
}

/// The commit LSN in a change's message id `{namespace}:{timeline}:{commit_lsn}-{seq}`, or in
/// the bare `{commit_lsn}-{seq}` of a stream written by an older bridge; `None` for any other
/// id.
fn id_commit_lsn(id: &str) -> Option<Lsn> {
    if let Some(parts) = parse_message_id(id) {
        return Some(parts.commit_lsn);
    }
    let (lsn, seq) = id.rsplit_once('-')?;
    seq.parse::<u32>().ok()?;
    lsn.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_durable_names_differ_by_file_and_are_stable() {
        let dir = std::env::temp_dir();
        let a = default_durable(&dir.join("a.sqlite"));
        let b = default_durable(&dir.join("b.sqlite"));
        assert_ne!(a, b);
        assert_eq!(a, default_durable(&dir.join("a.sqlite")));
        // The same file named through `..` is the same mirror.
        let name = dir.file_name().unwrap();
        let roundabout = dir.join("..").join(name).join("a.sqlite");
        assert_eq!(a, default_durable(&roundabout));
        assert!(a.starts_with(DEFAULT_DURABLE_PREFIX));
        assert!(a.len() <= 64);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }

    #[test]
    fn commit_lsn_of_a_message_id() {
        let lsn: Lsn = "0/25CB5E8".parse().unwrap();
        assert_eq!(id_commit_lsn("3f9a1c2e:1:0/25CB5E8-0"), Some(lsn));
        assert_eq!(id_commit_lsn("ns-with-dashes:12:0/25CB5E8-417"), Some(lsn));
        assert_eq!(id_commit_lsn("0/25CB5E8-3"), Some(lsn));
        assert_eq!(id_commit_lsn("replay-7"), None);
        assert_eq!(id_commit_lsn("3f9a1c2e:1:0/25CB5E8"), None);
    }
}
