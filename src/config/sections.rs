//! `[http]`, `[monitor]`, `[snapshot]` and `[streams]`: what the bridge serves and creates.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

use super::Secret;

/// Address the HTTP endpoints listen on. Loopback, so that nothing is exposed by accident;
/// containers and remote Prometheus scrapers need `--http-bind 0.0.0.0`.
pub(crate) const DEFAULT_HTTP_BIND: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Port of the HTTP endpoints.
pub(crate) const DEFAULT_HTTP_PORT: u16 = 9090;

/// Interval between two reads of the slot's lag, in seconds.
pub(crate) const DEFAULT_MONITOR_INTERVAL_SECS: u64 = 30;
/// Slot lag that logs a warning, in bytes (512 MiB).
pub(crate) const DEFAULT_LAG_WARN_BYTES: u64 = 512 * 1024 * 1024;
/// Slot lag that logs an error, in bytes (1 GiB).
pub(crate) const DEFAULT_LAG_CRITICAL_BYTES: u64 = 1024 * 1024 * 1024;
/// Interval between two logfmt `METRICS` log lines, in seconds; 0 turns the line off.
pub(crate) const DEFAULT_METRICS_LOG_INTERVAL_SECS: u64 = 15;

/// Rows per snapshot chunk message.
pub(crate) const DEFAULT_SNAPSHOT_CHUNK_ROWS: usize = 10_000;
/// Largest accepted chunk; a chunk is held in memory while it is encoded.
pub(crate) const MAX_SNAPSHOT_CHUNK_ROWS: usize = 1_000_000;
/// Whether streamed tables without a snapshot in the INIT stream are snapshotted at start.
pub(crate) const DEFAULT_SNAPSHOT_ON_START: bool = false;
/// Subject prefix a snapshot request's reply subject must start with: the inbox prefix of
/// the NATS clients, so the bridge never publishes a reply into a stream or the JetStream API.
pub(crate) const DEFAULT_SNAPSHOT_REPLY_PREFIX: &str = "_INBOX.";
/// Snapshots that may run at once; each holds a temporary replication slot and a walsender.
pub(crate) const DEFAULT_SNAPSHOT_MAX_CONCURRENT: usize = 2;
/// Largest accepted `snapshot.max_concurrent`.
pub(crate) const MAX_SNAPSHOT_MAX_CONCURRENT: usize = 64;
/// Seconds after a snapshot of a table started during which a new request for it is refused.
pub(crate) const DEFAULT_SNAPSHOT_COOLDOWN_SECS: u64 = 10;

/// Name of the JetStream stream holding change events (`cdc.>`).
pub(crate) const DEFAULT_CDC_STREAM: &str = "CDC";
/// Name of the JetStream stream holding snapshots (`init.>`).
pub(crate) const DEFAULT_INIT_STREAM: &str = "INIT";
/// Retention of the CDC stream, in seconds (7 days). A consumer bootstrapping from a snapshot
/// needs the CDC stream to still hold the snapshot's `cdc_stream_seq + 1`, so this should not be
/// shorter than the INIT stream's retention.
pub(crate) const DEFAULT_CDC_MAX_AGE_SECS: u64 = 7 * 24 * 3600;
/// Duplicate window of the CDC stream, in seconds (JetStream's own default). A republish after a
/// crash is de-duplicated only within this window.
pub(crate) const DEFAULT_CDC_DUPLICATE_WINDOW_SECS: u64 = 120;
/// Retention of the INIT stream, in seconds (7 days).
pub(crate) const DEFAULT_INIT_MAX_AGE_SECS: u64 = 7 * 24 * 3600;
/// Replicas of the streams and the schemas bucket the bridge creates (1: a single server).
pub(crate) const DEFAULT_STREAM_REPLICAS: usize = 1;
/// JetStream's own limit on stream replicas.
pub(crate) const MAX_STREAM_REPLICAS: usize = 5;

/// HTTP endpoints (`/metrics`, `/status`, `/health`, admin endpoints).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpConfig {
    /// Listen address.
    pub bind: IpAddr,
    /// Listen port.
    pub port: u16,
    /// Bearer token required by the endpoints that change state; without one they are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<Secret>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            bind: DEFAULT_HTTP_BIND,
            port: DEFAULT_HTTP_PORT,
            admin_token: None,
        }
    }
}

impl HttpConfig {
    /// The address to listen on.
    pub(crate) fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }
}

/// Slot-lag monitor and the periodic metrics log line.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MonitorConfig {
    /// Interval between two slot reads, in seconds.
    pub interval_secs: u64,
    /// Lag above which a warning is logged, in bytes.
    pub lag_warn_bytes: u64,
    /// Lag above which an error is logged, in bytes.
    pub lag_critical_bytes: u64,
    /// Interval between two `METRICS` log lines, in seconds; 0 turns them off.
    pub metrics_log_interval_secs: u64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            interval_secs: DEFAULT_MONITOR_INTERVAL_SECS,
            lag_warn_bytes: DEFAULT_LAG_WARN_BYTES,
            lag_critical_bytes: DEFAULT_LAG_CRITICAL_BYTES,
            metrics_log_interval_secs: DEFAULT_METRICS_LOG_INTERVAL_SECS,
        }
    }
}

impl MonitorConfig {
    /// [`MonitorConfig::interval_secs`] as a `Duration`.
    pub(crate) fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs)
    }

    /// [`MonitorConfig::metrics_log_interval_secs`] as a `Duration`, `None` when turned off.
    pub(crate) fn metrics_log_interval(&self) -> Option<Duration> {
        (self.metrics_log_interval_secs > 0)
            .then(|| Duration::from_secs(self.metrics_log_interval_secs))
    }
}

/// Snapshots into the INIT stream.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SnapshotConfig {
    /// Rows per chunk message.
    pub chunk_rows: usize,
    /// Snapshot, at start, every streamed table whose INIT stream holds no `init.meta.{table}`,
    /// or only a failed one.
    pub on_start: bool,
    /// Requests are answered only when their reply subject starts with this prefix.
    pub reply_prefix: String,
    /// Snapshots that may run at once.
    pub max_concurrent: usize,
    /// Seconds after a snapshot of a table started during which requests for it are refused;
    /// 0 turns the cooldown off.
    pub cooldown_secs: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            chunk_rows: DEFAULT_SNAPSHOT_CHUNK_ROWS,
            on_start: DEFAULT_SNAPSHOT_ON_START,
            reply_prefix: DEFAULT_SNAPSHOT_REPLY_PREFIX.to_owned(),
            max_concurrent: DEFAULT_SNAPSHOT_MAX_CONCURRENT,
            cooldown_secs: DEFAULT_SNAPSHOT_COOLDOWN_SECS,
        }
    }
}

impl SnapshotConfig {
    /// The cooldown between two snapshots of one table.
    pub(crate) fn cooldown(&self) -> Duration {
        Duration::from_secs(self.cooldown_secs)
    }
}

/// JetStream streams. Subjects are fixed (`cdc.>`, `init.>`); only names and retention vary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StreamsConfig {
    /// Name of the CDC stream.
    pub cdc: String,
    /// Name of the INIT stream.
    pub init: String,
    /// CDC retention, in seconds; 0 keeps messages forever.
    pub cdc_max_age_secs: u64,
    /// CDC duplicate window, in seconds.
    pub cdc_duplicate_window_secs: u64,
    /// INIT retention, in seconds; 0 keeps messages forever.
    pub init_max_age_secs: u64,
    /// Replicas of the CDC and INIT streams and the schemas bucket when the bridge creates
    /// them (existing ones keep theirs).
    pub replicas: usize,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            cdc: DEFAULT_CDC_STREAM.to_owned(),
            init: DEFAULT_INIT_STREAM.to_owned(),
            cdc_max_age_secs: DEFAULT_CDC_MAX_AGE_SECS,
            cdc_duplicate_window_secs: DEFAULT_CDC_DUPLICATE_WINDOW_SECS,
            init_max_age_secs: DEFAULT_INIT_MAX_AGE_SECS,
            replicas: DEFAULT_STREAM_REPLICAS,
        }
    }
}

impl StreamsConfig {
    /// CDC retention; `Duration::ZERO` means unlimited, as in JetStream.
    pub(crate) fn cdc_max_age(&self) -> Duration {
        Duration::from_secs(self.cdc_max_age_secs)
    }

    /// CDC duplicate window.
    pub(crate) fn cdc_duplicate_window(&self) -> Duration {
        Duration::from_secs(self.cdc_duplicate_window_secs)
    }

    /// INIT retention; `Duration::ZERO` means unlimited, as in JetStream.
    pub(crate) fn init_max_age(&self) -> Duration {
        Duration::from_secs(self.init_max_age_secs)
    }
}
