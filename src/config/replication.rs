//! `[replication]`: slot, publication, tables, encoding and the pipeline's tuning.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Logical replication slot.
pub(crate) const DEFAULT_SLOT: &str = "cdc_slot";
/// Publication the slot streams.
pub(crate) const DEFAULT_PUBLICATION: &str = "cdc_pub";
/// Message encoding.
pub(crate) const DEFAULT_FORMAT: Format = Format::Msgpack;
/// Shape of change event bodies.
pub(crate) const DEFAULT_ENVELOPE: Envelope = Envelope::Native;
/// Whether Debezium bodies carry the `schema` part (Debezium's JSON converter's
/// `schemas.enable`); off, as most Debezium consumers run.
pub(crate) const DEFAULT_DEBEZIUM_SCHEMAS: bool = false;
/// Slots of the ring between the wal thread and the publisher thread: four PubAck windows
/// ([`DEFAULT_MAX_IN_FLIGHT`]). Each slot keeps a recycled event of about 500 bytes; 8 192
/// slots cost 2 MB more peak memory for no measurable gain in rate or CPU.
pub(crate) const DEFAULT_RING_CAPACITY: usize = 4096;
/// Smallest accepted ring capacity; below this the threads hand over too often to keep up.
pub(crate) const MIN_RING_CAPACITY: usize = 16;
/// Largest accepted ring capacity; bounds the memory a full ring can hold.
pub(crate) const MAX_RING_CAPACITY: usize = 1 << 20;
/// Messages published to JetStream whose PubAck is still outstanding.
pub(crate) const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// Largest accepted in-flight window.
pub(crate) const MAX_IN_FLIGHT_LIMIT: usize = 65_536;
/// Bytes the changes waiting on the ring may hold (16 MiB): with wide rows the ring fills by
/// bytes long before it fills by count, and PostgreSQL keeps the WAL meanwhile.
pub(crate) const DEFAULT_RING_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Payload bytes awaiting a PubAck at once (8 MiB); at least one message is always sent.
pub(crate) const DEFAULT_MAX_IN_FLIGHT_BYTES: u64 = 8 * 1024 * 1024;
/// Smallest accepted byte budget for the ring and the in-flight window.
pub(crate) const MIN_BYTE_BUDGET: u64 = 64 * 1024;
/// Wait before reconnecting to PostgreSQL after the connection was lost, in seconds.
pub(crate) const DEFAULT_RECONNECT_BACKOFF_SECS: u64 = 5;
/// Longest interval between two standby status updates to PostgreSQL, in seconds.
pub(crate) const DEFAULT_STANDBY_STATUS_INTERVAL_SECS: u64 = 10;
/// After a read that emptied the replication socket, how long the wal thread lets more
/// transactions gather before reading again, in milliseconds: at a steady rate one wake-up of
/// the wal thread and of the publisher then serves several transactions instead of each
/// transaction waking both. A transaction after a quiet spell is read at once; at most this
/// much is added to the latency of the others. Each wake-up costs far more CPU than the
/// changes it serves at a few thousand a second, whatever wakes the thread; 3 ms (rather
/// than 2) cuts a fifth to a quarter of the CPU at 5 000 changes/s for 0.5–0.8 ms of median
/// latency (docs/benchmark.md, *What a wake-up costs*).
pub(crate) const DEFAULT_BATCH_WAIT_MS: u64 = 3;
/// Largest accepted batch wait: the commit → PubAck target is 10 ms.
pub(crate) const MAX_BATCH_WAIT_MS: u64 = 100;
/// Prefix of the default state file name, which is `{prefix}{slot}{suffix}` in the working
/// directory, so that two bridges with different slots never share one.
pub(crate) const DEFAULT_STATE_FILE_PREFIX: &str = "pgbridge-";
/// Suffix of the default state file name (see [`DEFAULT_STATE_FILE_PREFIX`]).
pub(crate) const DEFAULT_STATE_FILE_SUFFIX: &str = ".lsn";
/// Prefix of the default spool directory, `{prefix}{slot}` beside the state file: private to
/// the bridge, never a predictable path in a shared directory such as /tmp.
pub(crate) const DEFAULT_SPOOL_DIR_PREFIX: &str = "pgbridge-spool-";
/// How long the replication connection may stay silent before it is given up and reconnected,
/// in seconds; 0 means automatic: the server's `wal_sender_timeout` plus
/// [`WAL_RECEIVE_TIMEOUT_MARGIN_SECS`] (or [`WAL_RECEIVE_TIMEOUT_NO_SENDER_TIMEOUT_SECS`] when
/// the server has none).
pub(crate) const DEFAULT_WAL_RECEIVE_TIMEOUT_SECS: u64 = 0;
/// Added to the server's `wal_sender_timeout` for the automatic receive timeout.
pub(crate) const WAL_RECEIVE_TIMEOUT_MARGIN_SECS: u64 = 30;
/// The automatic receive timeout when the server's `wal_sender_timeout` is 0 (disabled).
pub(crate) const WAL_RECEIVE_TIMEOUT_NO_SENDER_TIMEOUT_SECS: u64 = 120;
/// Whether a start may skip changes when the state file's position does not belong to the
/// server (another cluster, timeline, database or slot); off, so nothing is skipped silently.
pub(crate) const DEFAULT_ACCEPT_POSITION_GAP: bool = false;
/// Whether the slot is created as a failover slot (PostgreSQL 17+), which standbys with
/// `sync_replication_slots` keep in step so that streaming goes on after a promotion.
pub(crate) const DEFAULT_FAILOVER_SLOT: bool = true;
/// Whether backlogs go to NATS as fast-ingest batches (nats-server 2.14 and later, on a stream
/// that allows them): one flow acknowledgement per few hundred changes instead of a PubAck each.
pub(crate) const DEFAULT_BATCH_PUBLISH: bool = true;

/// Encoding of the messages published to JetStream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// MessagePack (the default).
    #[default]
    Msgpack,
    /// JSON with the same structure; binary values as base64 strings.
    Json,
}

impl Format {
    /// The name used in the configuration and on the command line.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Format::Msgpack => "msgpack",
            Format::Json => "json",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Shape of the change event bodies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Envelope {
    /// The bridge's own change event, in `--format` (the default).
    #[default]
    Native,
    /// Debezium's change-event envelope (`before`, `after`, `source`, `op`, `ts_ms`) as
    /// Debezium's JSON converter writes it; always JSON.
    Debezium,
}

impl Envelope {
    /// The name used in the configuration and on the command line.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Envelope::Native => "native",
            Envelope::Debezium => "debezium",
        }
    }
}

impl fmt::Display for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to replicate and how the pipeline is tuned.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicationConfig {
    /// Logical replication slot (created if missing): `[a-z0-9_]{1,63}`.
    pub slot: String,
    /// Publication the slot streams; it must exist.
    pub publication: String,
    /// Tables to stream, as `table` or `schema.table`; empty streams every table of the
    /// publication.
    pub tables: Vec<String>,
    /// Message encoding.
    pub format: Format,
    /// Shape of change event bodies; `Envelope::Debezium` requires [`Format::Json`].
    pub envelope: Envelope,
    /// With the Debezium envelope: wrap bodies as `{"schema": …, "payload": …}`.
    pub debezium_schemas: bool,
    /// Capacity of the ring between the wal and publisher threads; a power of two.
    pub ring_capacity: usize,
    /// Most messages awaiting a PubAck at once.
    pub max_in_flight: usize,
    /// Most bytes the changes on the ring may hold.
    pub ring_max_bytes: u64,
    /// Most payload bytes awaiting a PubAck at once.
    pub max_in_flight_bytes: u64,
    /// Wait before reconnecting to PostgreSQL, in seconds.
    pub reconnect_backoff_secs: u64,
    /// Longest interval between standby status updates, in seconds.
    pub standby_status_interval_secs: u64,
    /// How long more transactions may gather after a read that emptied the socket, in
    /// milliseconds; 0 reads each as soon as it arrives.
    pub batch_wait_ms: u64,
    /// File holding the last durable LSN; `None` means `ReplicationConfig::state_file_path`'s
    /// default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
    /// Private directory (mode 0700) for the spool files of large streamed transactions; `None`
    /// means `ReplicationConfig::spool_dir_path`'s default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool_dir: Option<PathBuf>,
    /// Silence on the replication connection after which it is reconnected, in seconds
    /// (0: automatic, see `DEFAULT_WAL_RECEIVE_TIMEOUT_SECS`).
    pub wal_receive_timeout_secs: u64,
    /// Start even when the state file's position does not belong to the server, from the
    /// slot, logging the skipped range.
    pub accept_position_gap: bool,
    /// Create the slot as a failover slot, and make an existing one so (PostgreSQL 17+).
    pub failover_slot: bool,
    /// Publish backlogs to NATS as fast-ingest batches where the server and stream allow it.
    pub batch_publish: bool,
    /// Namespace of the message ids; `None` derives it from the system identifier, database
    /// and publication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_namespace: Option<String>,
    /// Where changes are delivered: NATS JetStream or Kafka (`[kafka]`).
    pub sink: super::kafka::SinkKind,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            slot: DEFAULT_SLOT.to_owned(),
            publication: DEFAULT_PUBLICATION.to_owned(),
            tables: Vec::new(),
            format: DEFAULT_FORMAT,
            envelope: DEFAULT_ENVELOPE,
            debezium_schemas: DEFAULT_DEBEZIUM_SCHEMAS,
            ring_capacity: DEFAULT_RING_CAPACITY,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            ring_max_bytes: DEFAULT_RING_MAX_BYTES,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            reconnect_backoff_secs: DEFAULT_RECONNECT_BACKOFF_SECS,
            standby_status_interval_secs: DEFAULT_STANDBY_STATUS_INTERVAL_SECS,
            batch_wait_ms: DEFAULT_BATCH_WAIT_MS,
            state_file: None,
            spool_dir: None,
            wal_receive_timeout_secs: DEFAULT_WAL_RECEIVE_TIMEOUT_SECS,
            accept_position_gap: DEFAULT_ACCEPT_POSITION_GAP,
            failover_slot: DEFAULT_FAILOVER_SLOT,
            batch_publish: DEFAULT_BATCH_PUBLISH,
            id_namespace: None,
            sink: super::kafka::DEFAULT_SINK,
        }
    }
}

impl ReplicationConfig {
    /// The state file: the configured one, or `pgbridge-{slot}.lsn` in the working directory.
    pub(crate) fn state_file_path(&self) -> PathBuf {
        self.state_file.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "{DEFAULT_STATE_FILE_PREFIX}{}{DEFAULT_STATE_FILE_SUFFIX}",
                self.slot
            ))
        })
    }

    /// The spool directory: the configured one, or `pgbridge-spool-{slot}` in the state
    /// file's directory.
    pub(crate) fn spool_dir_path(&self) -> PathBuf {
        self.spool_dir.clone().unwrap_or_else(|| {
            let name = format!("{DEFAULT_SPOOL_DIR_PREFIX}{}", self.slot);
            match self.state_file_path().parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
                _ => PathBuf::from(name),
            }
        })
    }

    /// The receive timeout for a server whose `wal_sender_timeout` is `sender_timeout`
    /// (zero: none): the configured one, or the automatic one.
    pub(crate) fn wal_receive_timeout(&self, sender_timeout: Duration) -> Duration {
        if self.wal_receive_timeout_secs > 0 {
            Duration::from_secs(self.wal_receive_timeout_secs)
        } else if sender_timeout.is_zero() {
            Duration::from_secs(WAL_RECEIVE_TIMEOUT_NO_SENDER_TIMEOUT_SECS)
        } else {
            sender_timeout + Duration::from_secs(WAL_RECEIVE_TIMEOUT_MARGIN_SECS)
        }
    }

    /// [`ReplicationConfig::reconnect_backoff_secs`] as a `Duration`.
    pub(crate) fn reconnect_backoff(&self) -> Duration {
        Duration::from_secs(self.reconnect_backoff_secs)
    }

    /// [`ReplicationConfig::batch_wait_ms`] as a `Duration`.
    pub(crate) fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
    }

    /// [`ReplicationConfig::standby_status_interval_secs`] as a `Duration`.
    pub(crate) fn standby_status_interval(&self) -> Duration {
        Duration::from_secs(self.standby_status_interval_secs)
    }
}
