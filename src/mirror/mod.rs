//! `bridge mirror`: a consumer that keeps a local SQLite database equal to chosen PostgreSQL
//! tables, from what the bridge publishes (the bootstrap rule of the protocol):
//!
//! 1. read each table's schema from the KV bucket `schemas` and create the SQLite table (new
//!    columns are added when a later schema revision has them); without `--table`, a table
//!    whose schema appears later is taken up between two source transactions;
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
//! are looked at (`Mirror::transaction_ended`). Changes from a bridge that does not mark
//! them are committed after [`IDLE_COMMIT`] without a change, as before.
//!
//! Each row keeps the version (`commit_lsn`, `seq`) of its last change, and deleted rows a
//! tombstone (see `store`): a change that comes again, or out of order, and is not newer
//! than the row is skipped.
//!
//! Schema changes are followed from the changes themselves: a column a change has and the
//! table lacks is added, a column neither the change nor the newest schema revision has is
//! dropped, and a column whose values no longer fit its SQLite type is retyped to the type of
//! the newest revision.

pub(crate) mod doc;
mod follow;
mod snapshot;
mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, Context, Message};
use futures_util::StreamExt;
use rmpv::Value;

use crate::config::Config;
use crate::shutdown::Shutdown;
// Connecting is the sink's (one place for TLS, credentials and reconnect settings).
use crate::sink::nats::{check_jetstream, connect, unless_refused, NatsError};
use crate::wire::decode;
use crate::wire::names::SCHEMAS_BUCKET;
use crate::wire::subject::{
    parse_table_token, schema_key, schema_key_token, table_token, DEFAULT_SCHEMA,
};

pub use doc::ColumnKind;
use store::Store;
pub use store::{Position, StoreError, STATE_TABLE, TOMBSTONE_TTL, VERSIONS_TABLE};

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
/// Pause between two reads of the schemas bucket while a schema is awaited.
const KV_RETRY: Duration = Duration::from_millis(500);
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

/// A change's columns where they disagree with the mirrored table: a column it lacks (not an
/// unchanged TOAST value), or a value that does not fit its column's type.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ColumnEvidence {
    /// The columns the change carried, unchanged TOAST values included.
    present: Vec<String>,
    /// Those of them whose value did not fit the mirrored column's type.
    misfits: Vec<String>,
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
        let (client, stats) = connect(&config.nats, CONNECTION_NAME).await?;
        let store = Store::open(&options.db)?;
        let mut mirror = Mirror {
            schema_checked: HashMap::new(),
            schema_evidence: HashMap::new(),
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
        // A permission the server refuses is not waited out: without it the mirror gets no
        // further (what it loaded is committed with its position, or rolled back).
        unless_refused(&stats, mirror.run()).await?;
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
    /// Per table, the shape of the last change that the mirrored columns did not explain:
    /// applied again with the schema the bridge stores next, which may come after the change.
    schema_evidence: HashMap<String, ColumnEvidence>,
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
        // A server that says it runs without JetStream, and whose JetStream API nobody
        // answers, will not get it by waiting (a restarting one says it has it): stop at once,
        // as the bridge does.
        if !self.client.server_info().jetstream {
            if let Err(e @ NatsError::JetStreamDisabled { .. }) = check_jetstream(&self.js).await {
                return Err(e.into());
            }
        }
        // A JetStream failure here (NATS restarting, a request timing out) is waited out as
        // later ones are; a stream that does not exist stops the mirror at once.
        for stream in [self.cdc.clone(), self.init.clone()] {
            let mut warned = false;
            loop {
                match open_stream(&self.js, &stream).await {
                    Ok(_) => break,
                    Err(MirrorError::JetStream(e)) => {
                        if !std::mem::replace(&mut warned, true) {
                            log::warn!("{e}; trying again every {RESTART_DELAY:?}");
                        }
                        if !self.pause().await {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
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
        !self.shutdown.sleep(RESTART_DELAY).await
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
                        if let Ok((s, n)) = parse_table_token(&schema_key_token(&key)) {
                            tables.push(MirrorTable::new(s, n));
                        }
                    }
                }
            }
            if !tables.is_empty() {
                tables.sort_by(|a, b| a.token.cmp(&b.token));
                return Ok(tables);
            }
            if Instant::now() > deadline || self.shutdown.sleep(KV_RETRY).await {
                return Err(MirrorError::NoTables(format!(
                    "nothing to mirror: KV bucket '{SCHEMAS_BUCKET}' holds no table schema; start \
                     the bridge (it writes the schemas of the tables it streams) or name tables \
                     with --table"
                )));
            }
        }
    }

    /// The table's current schema document, waiting for it to appear.
    async fn schema(&self, t: &MirrorTable) -> Result<Value, MirrorError> {
        let key = schema_key(&t.schema, &t.name);
        let deadline = Instant::now() + SCHEMA_TIMEOUT;
        loop {
            if let Ok(kv) = self.js.get_key_value(SCHEMAS_BUCKET).await {
                if let Ok(Some(bytes)) = kv.get(key.as_str()).await {
                    return decode::decode(&bytes).map_err(|e| MirrorError::BadMessage {
                        stream: format!("KV_{SCHEMAS_BUCKET}"),
                        seq: 0,
                        reason: format!("schema of {}: {e}", t.local),
                    });
                }
            }
            if Instant::now() > deadline || self.shutdown.sleep(KV_RETRY).await {
                return Err(MirrorError::NoSchema(format!("{}.{}", t.schema, t.name)));
            }
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

    fn decode(&self, msg: &Message) -> Result<Value, MirrorError> {
        decode::decode(&msg.payload).map_err(|e| self.bad(msg, e))
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
}
