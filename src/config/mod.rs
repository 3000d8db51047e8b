//! The bridge configuration: built-in defaults, the TOML file, the environment and the command line.
//!
//! # Precedence
//!
//! Highest first: command-line flags, environment variables, the TOML file (`--config` /
//! `BRIDGE_CONFIG`), the built-in defaults (the `DEFAULT_*` constants below). clap already combines
//! a flag with its environment variable; [`Config::load`] reads the file over the defaults and then
//! lays clap's values over it, field by field, only where a value was given.
//!
//! # PostgreSQL URL
//!
//! `postgres.url` (`--pg-url`, `PG_URL`) accepts
//! `postgres[ql]://[user[:password]@][host][:port][/dbname][?param=value&...]`, with `sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`, `connect_timeout`, `host`, `port`, `user`, `password` and
//! `dbname` as query parameters (a query parameter wins over the same part earlier in the URL, as
//! in libpq). User, password, host, database name and query values are percent-decoded.
//!
//! The user info ends at the *last* `@` of the URL (see [`split_userinfo`]): a password may hold
//! `/`, `?`, `#`, `:` or `@` as they are or percent-encoded, but an `@` after the host (in the
//! database name or a query value) must be written `%40`. NATS URLs follow the same rule.
//!
//! The URL only fills the parts that are not given on their
//! own: a part set explicitly (`postgres.host`, `PG_HOST`, `--pg-host`, ...) at *any* level wins
//! over the same part of the URL, wherever the URL comes from. Parts given nowhere take the
//! defaults.
//!
//! # Secrets
//!
//! Passwords, tokens and the PostgreSQL URL are held in [`Secret`], whose `Debug`, `Display` and
//! `Serialize` print `***`. Credentials embedded in NATS URLs are hidden the same way. Nothing in
//! this module ever formats a secret into an error message.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::cli::ConfigArgs;

// ---------------------------------------------------------------------------------------------
// Defaults and limits
// ---------------------------------------------------------------------------------------------

/// PostgreSQL host when neither a host nor a URL gives one.
pub const DEFAULT_PG_HOST: &str = "localhost";
/// PostgreSQL port.
pub const DEFAULT_PG_PORT: u16 = 5432;
/// PostgreSQL user.
pub const DEFAULT_PG_USER: &str = "postgres";
/// PostgreSQL database.
pub const DEFAULT_PG_DBNAME: &str = "postgres";
/// What `sslmode` means when none is configured: nothing is passed, so libpq applies its own
/// default, `PGSSLMODE` from the environment or else `prefer`.
pub const DEFAULT_PG_SSLMODE_TEXT: &str = "libpq's own: PGSSLMODE, else prefer";
/// libpq `connect_timeout`, in seconds.
pub const DEFAULT_PG_CONNECT_TIMEOUT_SECS: u64 = 10;
/// `application_name` sent to PostgreSQL, visible in `pg_stat_activity` and `pg_stat_replication`.
pub const PG_APPLICATION_NAME: &str = "pgbridge";

/// NATS server list.
pub const DEFAULT_NATS_URL: &str = "nats://localhost:4222";

/// Logical replication slot.
pub const DEFAULT_SLOT: &str = "cdc_slot";
/// Publication the slot streams.
pub const DEFAULT_PUBLICATION: &str = "cdc_pub";
/// Message encoding.
pub const DEFAULT_FORMAT: Format = Format::Msgpack;
/// Slots of the ring between the wal thread and the publisher thread.
pub const DEFAULT_RING_CAPACITY: usize = 8192;
/// Smallest accepted ring capacity; below this the threads hand over too often to keep up.
pub const MIN_RING_CAPACITY: usize = 16;
/// Largest accepted ring capacity; bounds the memory a full ring can hold.
pub const MAX_RING_CAPACITY: usize = 1 << 20;
/// Messages published to JetStream whose PubAck is still outstanding.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// Largest accepted in-flight window.
pub const MAX_IN_FLIGHT_LIMIT: usize = 65_536;
/// Bytes the changes waiting on the ring may hold (16 MiB): with wide rows the ring fills by
/// bytes long before it fills by count, and PostgreSQL keeps the WAL meanwhile.
pub const DEFAULT_RING_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Payload bytes awaiting a PubAck at once (8 MiB); at least one message is always sent.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: u64 = 8 * 1024 * 1024;
/// Smallest accepted byte budget for the ring and the in-flight window.
pub const MIN_BYTE_BUDGET: u64 = 64 * 1024;
/// Wait before reconnecting to PostgreSQL after the connection was lost, in seconds.
pub const DEFAULT_RECONNECT_BACKOFF_SECS: u64 = 5;
/// Longest interval between two standby status updates to PostgreSQL, in seconds.
pub const DEFAULT_STANDBY_STATUS_INTERVAL_SECS: u64 = 10;
/// Prefix of the default state file name, which is `{prefix}{slot}{suffix}` in the working
/// directory, so that two bridges with different slots never share one.
pub const DEFAULT_STATE_FILE_PREFIX: &str = "pgbridge-";
/// Suffix of the default state file name (see [`DEFAULT_STATE_FILE_PREFIX`]).
pub const DEFAULT_STATE_FILE_SUFFIX: &str = ".lsn";
/// Prefix of the default spool directory, `{prefix}{slot}` beside the state file: private to
/// the bridge, never a predictable path in a shared directory such as /tmp.
pub const DEFAULT_SPOOL_DIR_PREFIX: &str = "pgbridge-spool-";
/// How long the replication connection may stay silent before it is given up and reconnected,
/// in seconds; 0 means automatic: the server's `wal_sender_timeout` plus
/// [`WAL_RECEIVE_TIMEOUT_MARGIN_SECS`] (or [`WAL_RECEIVE_TIMEOUT_NO_SENDER_TIMEOUT_SECS`] when
/// the server has none).
pub const DEFAULT_WAL_RECEIVE_TIMEOUT_SECS: u64 = 0;
/// Added to the server's `wal_sender_timeout` for the automatic receive timeout.
pub const WAL_RECEIVE_TIMEOUT_MARGIN_SECS: u64 = 30;
/// The automatic receive timeout when the server's `wal_sender_timeout` is 0 (disabled).
pub const WAL_RECEIVE_TIMEOUT_NO_SENDER_TIMEOUT_SECS: u64 = 120;
/// Whether a start may skip changes when the state file's position does not belong to the
/// server (another cluster, timeline, database or slot); off, so nothing is skipped silently.
pub const DEFAULT_ACCEPT_POSITION_GAP: bool = false;
/// Longest message-id namespace, in characters.
pub const MAX_ID_NAMESPACE_LEN: usize = 64;

/// Address the HTTP endpoints listen on. Loopback, so that nothing is exposed by accident;
/// containers and remote Prometheus scrapers need `--http-bind 0.0.0.0`.
pub const DEFAULT_HTTP_BIND: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Port of the HTTP endpoints.
pub const DEFAULT_HTTP_PORT: u16 = 9090;

/// Interval between two reads of the slot's lag, in seconds.
pub const DEFAULT_MONITOR_INTERVAL_SECS: u64 = 30;
/// Slot lag that logs a warning, in bytes (512 MiB).
pub const DEFAULT_LAG_WARN_BYTES: u64 = 512 * 1024 * 1024;
/// Slot lag that logs an error, in bytes (1 GiB).
pub const DEFAULT_LAG_CRITICAL_BYTES: u64 = 1024 * 1024 * 1024;
/// Interval between two logfmt `METRICS` log lines, in seconds; 0 turns the line off.
pub const DEFAULT_METRICS_LOG_INTERVAL_SECS: u64 = 15;

/// Rows per snapshot chunk message.
pub const DEFAULT_SNAPSHOT_CHUNK_ROWS: usize = 10_000;
/// Largest accepted chunk; a chunk is held in memory while it is encoded.
pub const MAX_SNAPSHOT_CHUNK_ROWS: usize = 1_000_000;
/// Whether streamed tables without a snapshot in the INIT stream are snapshotted at start.
pub const DEFAULT_SNAPSHOT_ON_START: bool = false;
/// Subject prefix a snapshot request's reply subject must start with: the inbox prefix of
/// the NATS clients, so the bridge never publishes a reply into a stream or the JetStream API.
pub const DEFAULT_SNAPSHOT_REPLY_PREFIX: &str = "_INBOX.";
/// Snapshots that may run at once; each holds a temporary replication slot and a walsender.
pub const DEFAULT_SNAPSHOT_MAX_CONCURRENT: usize = 2;
/// Largest accepted `snapshot.max_concurrent`.
pub const MAX_SNAPSHOT_MAX_CONCURRENT: usize = 64;
/// Seconds after a snapshot of a table started during which a new request for it is refused.
pub const DEFAULT_SNAPSHOT_COOLDOWN_SECS: u64 = 10;

/// Name of the JetStream stream holding change events (`cdc.>`).
pub const DEFAULT_CDC_STREAM: &str = "CDC";
/// Name of the JetStream stream holding snapshots (`init.>`).
pub const DEFAULT_INIT_STREAM: &str = "INIT";
/// Retention of the CDC stream, in seconds (7 days). A consumer bootstrapping from a snapshot
/// needs the CDC stream to still hold the snapshot's `cdc_stream_seq + 1`, so this should not be
/// shorter than the INIT stream's retention.
pub const DEFAULT_CDC_MAX_AGE_SECS: u64 = 7 * 24 * 3600;
/// Duplicate window of the CDC stream, in seconds (JetStream's own default). A republish after a
/// crash is de-duplicated only within this window.
pub const DEFAULT_CDC_DUPLICATE_WINDOW_SECS: u64 = 120;
/// Retention of the INIT stream, in seconds (7 days).
pub const DEFAULT_INIT_MAX_AGE_SECS: u64 = 7 * 24 * 3600;
/// Replicas of the streams and the schemas bucket the bridge creates (1: a single server).
pub const DEFAULT_STREAM_REPLICAS: usize = 1;
/// JetStream's own limit on stream replicas.
pub const MAX_STREAM_REPLICAS: usize = 5;

/// PostgreSQL's identifier length limit (NAMEDATALEN - 1), in bytes.
pub const MAX_PG_IDENTIFIER_BYTES: usize = 63;
/// JetStream's stream name length limit, in bytes.
pub const MAX_STREAM_NAME_BYTES: usize = 255;

/// What every secret prints as.
pub const REDACTED: &str = "***";

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why the configuration could not be loaded or is not usable. Every message is one line that
/// names the file or the field, and never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    Io {
        /// The file named by `--config` / `BRIDGE_CONFIG`.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML, or has an unknown key or a wrongly typed value.
    #[error("{}: {message}", path.display())]
    Toml {
        /// The file named by `--config` / `BRIDGE_CONFIG`.
        path: PathBuf,
        /// The parser's message, prefixed with the line and column.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid {field}{}: {reason}", sources_hint(.field))]
    Invalid {
        /// The field as a TOML key, e.g. `replication.slot`.
        field: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// A connection URL cannot be parsed.
    #[error("invalid {field}{}: {reason}", sources_hint(.field))]
    Url {
        /// The field as a TOML key: `postgres.url` or `nats.urls`.
        field: &'static str,
        /// What is wrong; never the URL itself, which may hold a password.
        reason: String,
    },
}

/// Where each configuration field can be set: TOML key, flag, environment variable.
///
/// Used to point error messages at the knob to turn; a unit test checks it against the CLI.
pub const FIELD_SOURCES: &[(&str, &str, &str)] = &[
    ("postgres.url", "--pg-url", "PG_URL"),
    ("postgres.host", "--pg-host", "PG_HOST"),
    ("postgres.port", "--pg-port", "PG_PORT"),
    ("postgres.user", "--pg-user", "PG_USER"),
    ("postgres.password", "--pg-password", "PG_PASSWORD"),
    ("postgres.dbname", "--pg-db", "PG_DB"),
    ("postgres.sslmode", "--pg-sslmode", "PG_SSLMODE"),
    ("postgres.sslrootcert", "--pg-sslrootcert", "PG_SSLROOTCERT"),
    ("postgres.sslcert", "--pg-sslcert", "PG_SSLCERT"),
    ("postgres.sslkey", "--pg-sslkey", "PG_SSLKEY"),
    (
        "postgres.connect_timeout_secs",
        "--pg-connect-timeout-secs",
        "PG_CONNECT_TIMEOUT_SECS",
    ),
    ("nats.urls", "--nats-url", "NATS_URL"),
    ("nats.user", "--nats-user", "NATS_BRIDGE_USER"),
    ("nats.password", "--nats-password", "NATS_BRIDGE_PASSWORD"),
    ("nats.token", "--nats-token", "NATS_BRIDGE_TOKEN"),
    ("nats.creds_file", "--nats-creds", "NATS_BRIDGE_CREDS"),
    ("nats.nkey_seed", "--nats-nkey-seed", "NATS_NKEY_SEED"),
    ("nats.nkey_file", "--nats-nkey-file", "NATS_NKEY_FILE"),
    (
        "nats.tls_required",
        "--nats-tls-required",
        "NATS_TLS_REQUIRED",
    ),
    ("nats.tls_ca_file", "--nats-tls-ca-file", "NATS_TLS_CA_FILE"),
    (
        "nats.tls_cert_file",
        "--nats-tls-cert-file",
        "NATS_TLS_CERT_FILE",
    ),
    (
        "nats.tls_key_file",
        "--nats-tls-key-file",
        "NATS_TLS_KEY_FILE",
    ),
    ("replication.slot", "--slot", "BRIDGE_SLOT"),
    (
        "replication.publication",
        "--publication",
        "BRIDGE_PUBLICATION",
    ),
    ("replication.tables", "--table", "BRIDGE_TABLES"),
    ("replication.format", "--format", "BRIDGE_FORMAT"),
    (
        "replication.ring_capacity",
        "--ring-capacity",
        "BRIDGE_RING_CAPACITY",
    ),
    (
        "replication.max_in_flight",
        "--max-in-flight",
        "BRIDGE_MAX_IN_FLIGHT",
    ),
    (
        "replication.ring_max_bytes",
        "--ring-max-bytes",
        "BRIDGE_RING_MAX_BYTES",
    ),
    (
        "replication.max_in_flight_bytes",
        "--max-in-flight-bytes",
        "BRIDGE_MAX_IN_FLIGHT_BYTES",
    ),
    (
        "replication.reconnect_backoff_secs",
        "--reconnect-backoff-secs",
        "BRIDGE_RECONNECT_BACKOFF_SECS",
    ),
    (
        "replication.standby_status_interval_secs",
        "--standby-status-interval-secs",
        "BRIDGE_STANDBY_STATUS_INTERVAL_SECS",
    ),
    (
        "replication.state_file",
        "--state-file",
        "BRIDGE_STATE_FILE",
    ),
    ("replication.spool_dir", "--spool-dir", "BRIDGE_SPOOL_DIR"),
    (
        "replication.wal_receive_timeout_secs",
        "--wal-receive-timeout-secs",
        "BRIDGE_WAL_RECEIVE_TIMEOUT_SECS",
    ),
    (
        "replication.accept_position_gap",
        "--accept-position-gap",
        "BRIDGE_ACCEPT_POSITION_GAP",
    ),
    (
        "replication.id_namespace",
        "--id-namespace",
        "BRIDGE_ID_NAMESPACE",
    ),
    ("http.bind", "--http-bind", "BRIDGE_HTTP_BIND"),
    ("http.port", "--port", "BRIDGE_PORT"),
    ("http.admin_token", "--admin-token", "BRIDGE_ADMIN_TOKEN"),
    (
        "monitor.interval_secs",
        "--monitor-interval-secs",
        "BRIDGE_MONITOR_INTERVAL_SECS",
    ),
    (
        "monitor.lag_warn_bytes",
        "--lag-warn-bytes",
        "BRIDGE_LAG_WARN_BYTES",
    ),
    (
        "monitor.lag_critical_bytes",
        "--lag-critical-bytes",
        "BRIDGE_LAG_CRITICAL_BYTES",
    ),
    (
        "monitor.metrics_log_interval_secs",
        "--metrics-log-interval-secs",
        "BRIDGE_METRICS_LOG_INTERVAL_SECS",
    ),
    (
        "snapshot.chunk_rows",
        "--snapshot-chunk-rows",
        "BRIDGE_SNAPSHOT_CHUNK_ROWS",
    ),
    (
        "snapshot.on_start",
        "--snapshot-on-start",
        "BRIDGE_SNAPSHOT_ON_START",
    ),
    (
        "snapshot.reply_prefix",
        "--snapshot-reply-prefix",
        "BRIDGE_SNAPSHOT_REPLY_PREFIX",
    ),
    (
        "snapshot.max_concurrent",
        "--snapshot-max-concurrent",
        "BRIDGE_SNAPSHOT_MAX_CONCURRENT",
    ),
    (
        "snapshot.cooldown_secs",
        "--snapshot-cooldown-secs",
        "BRIDGE_SNAPSHOT_COOLDOWN_SECS",
    ),
    ("streams.cdc", "--stream", "BRIDGE_STREAMS"),
    ("streams.init", "--stream", "BRIDGE_STREAMS"),
    (
        "streams.cdc_max_age_secs",
        "--cdc-max-age-secs",
        "BRIDGE_CDC_MAX_AGE_SECS",
    ),
    (
        "streams.cdc_duplicate_window_secs",
        "--cdc-duplicate-window-secs",
        "BRIDGE_CDC_DUPLICATE_WINDOW_SECS",
    ),
    (
        "streams.init_max_age_secs",
        "--init-max-age-secs",
        "BRIDGE_INIT_MAX_AGE_SECS",
    ),
    (
        "streams.replicas",
        "--stream-replicas",
        "BRIDGE_STREAM_REPLICAS",
    ),
];

/// " (--flag / ENV)" for a field, or nothing for a field without a flag.
fn sources_hint(field: &str) -> String {
    FIELD_SOURCES
        .iter()
        .find(|(key, _, _)| *key == field)
        .map(|(_, flag, env)| format!(" ({flag} / {env})"))
        .unwrap_or_default()
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Value types
// ---------------------------------------------------------------------------------------------

/// A password, token or credential-bearing URL. Prints, debugs and serializes as `***`; the
/// value is reachable only through [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it (libpq, the NATS client, the token
    /// comparison). Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True for an empty secret.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// Accepts only strings: serde's error for any other type would quote the value (an unquoted
/// numeric password, say) into the message.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;

        impl serde::de::Visitor<'_> for SecretVisitor {
            type Value = Secret;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a quoted string")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }

            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(E::custom(NOT_A_STRING))
            }

            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(E::custom(NOT_A_STRING))
            }

            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(E::custom(NOT_A_STRING))
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(E::custom(NOT_A_STRING))
            }
        }

        const NOT_A_STRING: &str = "a secret must be a quoted string";
        deserializer.deserialize_str(SecretVisitor)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Encoding of the messages published to JetStream (DESIGN.md §4).
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
    pub fn as_str(self) -> &'static str {
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

/// libpq `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS only if the server insists.
    Allow,
    /// Use TLS if the server supports it (libpq's default).
    #[default]
    Prefer,
    /// Always use TLS, without verifying the certificate.
    Require,
    /// Always use TLS and verify the certificate chain.
    VerifyCa,
    /// Always use TLS, verify the chain and the host name.
    VerifyFull,
}

impl SslMode {
    /// The libpq keyword value.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            SslMode::Disable,
            SslMode::Allow,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| {
            format!(
                "unknown sslmode '{s}' (expected disable, allow, prefer, require, verify-ca or verify-full)"
            )
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The effective configuration
// ---------------------------------------------------------------------------------------------

/// The whole, effective bridge configuration. Build it with [`Config::load`]; `Default` gives the
/// built-in defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Config {
    /// The PostgreSQL connection (`[postgres]`).
    pub postgres: PgConfig,
    /// The NATS connection (`[nats]`).
    pub nats: NatsConfig,
    /// Slot, publication, tables and the pipeline's tuning (`[replication]`).
    pub replication: ReplicationConfig,
    /// The HTTP endpoints (`[http]`).
    pub http: HttpConfig,
    /// The slot-lag monitor and periodic metrics log (`[monitor]`).
    pub monitor: MonitorConfig,
    /// Snapshots into the INIT stream (`[snapshot]`).
    pub snapshot: SnapshotConfig,
    /// JetStream stream names and retention (`[streams]`).
    pub streams: StreamsConfig,
}

/// PostgreSQL connection, fully resolved: the URL, if any, is already expanded into these parts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PgConfig {
    /// Host name, IP address, or directory of the Unix socket (starts with `/`).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Role to connect as; it needs REPLICATION and SELECT on the published tables.
    pub user: String,
    /// Password; `None` leaves it to libpq (`~/.pgpass`, trust, peer ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Database holding the publication.
    pub dbname: String,
    /// libpq `sslmode`; `None` passes nothing, so that libpq's own default (`PGSSLMODE`, else
    /// `prefer`) applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<SslMode>,
    /// libpq `sslrootcert`: CA certificates that sign the server's certificate (or `system`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
    /// libpq `sslcert`: the client certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslcert: Option<PathBuf>,
    /// libpq `sslkey`: the client certificate's private key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslkey: Option<PathBuf>,
    /// libpq `connect_timeout`, in seconds.
    pub connect_timeout_secs: u64,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            host: DEFAULT_PG_HOST.to_owned(),
            port: DEFAULT_PG_PORT,
            user: DEFAULT_PG_USER.to_owned(),
            password: None,
            dbname: DEFAULT_PG_DBNAME.to_owned(),
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            connect_timeout_secs: DEFAULT_PG_CONNECT_TIMEOUT_SECS,
        }
    }
}

impl PgConfig {
    /// Keyword/value pairs for `PQconnectdbParams`: host, port, user, password, dbname,
    /// connect_timeout and application_name, and sslmode, sslrootcert, sslcert and sslkey when
    /// configured: a keyword left out lets libpq read its `PG*` environment variable (`PGSSLMODE`,
    /// `PGSSLROOTCERT`, ...) and then its own default. The caller adds `replication`,
    /// `options` and the like, and must pass `expand_dbname = 0` so that a database name is never
    /// read as a connection string. The password is in clear text here: do not log the result.
    pub fn libpq_params(&self) -> Vec<(&'static str, String)> {
        let mut params = vec![
            ("host", self.host.clone()),
            ("port", self.port.to_string()),
            ("user", self.user.clone()),
        ];
        if let Some(password) = &self.password {
            params.push(("password", password.expose().to_owned()));
        }
        params.push(("dbname", self.dbname.clone()));
        if let Some(mode) = self.sslmode {
            params.push(("sslmode", mode.as_str().to_owned()));
        }
        for (key, path) in [
            ("sslrootcert", &self.sslrootcert),
            ("sslcert", &self.sslcert),
            ("sslkey", &self.sslkey),
        ] {
            if let Some(path) = path {
                params.push((key, path.to_string_lossy().into_owned()));
            }
        }
        params.extend([
            ("connect_timeout", self.connect_timeout_secs.to_string()),
            ("application_name", PG_APPLICATION_NAME.to_owned()),
        ]);
        params
    }

    /// Checks every field; see [`Config::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.host.trim().is_empty() {
            return Err(invalid("postgres.host", "is empty"));
        }
        if self.port == 0 {
            return Err(invalid("postgres.port", "must be 1-65535, not 0"));
        }
        if self.user.is_empty() {
            return Err(invalid("postgres.user", "is empty"));
        }
        if self.dbname.is_empty() {
            return Err(invalid("postgres.dbname", "is empty"));
        }
        if self.connect_timeout_secs == 0 {
            return Err(invalid(
                "postgres.connect_timeout_secs",
                "must be at least 1 (0 would wait forever)",
            ));
        }
        // libpq's own value for the system's CA store, not a file.
        let rootcert = self
            .sslrootcert
            .as_ref()
            .filter(|p| p.as_os_str() != "system");
        check_file("postgres.sslrootcert", rootcert)?;
        check_file("postgres.sslcert", self.sslcert.as_ref())?;
        check_file("postgres.sslkey", self.sslkey.as_ref())?;
        match (&self.sslcert, &self.sslkey) {
            (Some(_), None) => {
                return Err(invalid(
                    "postgres.sslkey",
                    "postgres.sslcert is set but not its key; give both",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "postgres.sslcert",
                    "postgres.sslkey is set but not the certificate; give both",
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

/// A configured file must exist, so that a typo shows at start (and in `check-config`) rather
/// than as a TLS failure later.
fn check_file(field: &'static str, path: Option<&PathBuf>) -> Result<(), ConfigError> {
    match path {
        Some(p) if p.as_os_str().is_empty() => Err(invalid(field, "is empty")),
        Some(p) if !p.is_file() => Err(invalid(
            field,
            format!("{} does not exist or is not a file", p.display()),
        )),
        _ => Ok(()),
    }
}

/// NATS connection.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Servers, as `nats://host:port`, `tls://host:port`, `host:port` or `host`; the client
    /// picks one and fails over to the others. Credentials in a URL (`user:password@` or
    /// `token@`) are taken out of it, used as the authentication, and redacted.
    #[serde(serialize_with = "serialize_redacted_urls")]
    pub urls: Vec<String>,
    /// User name (`NATS_BRIDGE_USER`); needs `password` too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password (`NATS_BRIDGE_PASSWORD`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Authentication token, instead of user and password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// A `.creds` file (JWT and NKey seed), instead of user/password or token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// A bare NKey user seed (`SU...`), for servers that list the user's public key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed: Option<Secret>,
    /// A file holding the NKey user seed, instead of `nkey_seed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS. Also on when a URL is `tls://` or a CA or client
    /// certificate is configured.
    pub tls_required: bool,
    /// PEM file of the CA certificates that sign the server's certificate (instead of the
    /// system's roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (`verify: true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec![DEFAULT_NATS_URL.to_owned()],
            user: None,
            password: None,
            token: None,
            creds_file: None,
            nkey_seed: None,
            nkey_file: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("urls", &self.redacted_urls())
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("creds_file", &self.creds_file)
            .field("nkey_seed", &self.nkey_seed)
            .field("nkey_file", &self.nkey_file)
            .field("tls_required", &self.tls_required)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

fn serialize_redacted_urls<S: Serializer>(
    urls: &[String],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(urls.iter().map(|u| redact_url_userinfo(u)))
}

/// How the bridge authenticates to NATS: exactly one of these (see [`NatsConfig::auth`]).
#[derive(Clone, Debug, PartialEq)]
pub enum NatsAuth {
    /// No credentials.
    None,
    /// `nats.user` and `nats.password`, or `user:password@` in the URLs.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: Secret,
    },
    /// `nats.token`, or `token@` in the URLs.
    Token(Secret),
    /// `nats.creds_file`.
    CredsFile(PathBuf),
    /// `nats.nkey_seed`.
    NkeySeed(Secret),
    /// `nats.nkey_file`.
    NkeyFile(PathBuf),
}

impl NatsAuth {
    /// A name for logs: `none`, `user`, `token`, `creds`, `nkey`.
    pub fn kind(&self) -> &'static str {
        match self {
            NatsAuth::None => "none",
            NatsAuth::UserPassword { .. } => "user",
            NatsAuth::Token(_) => "token",
            NatsAuth::CredsFile(_) => "creds",
            NatsAuth::NkeySeed(_) | NatsAuth::NkeyFile(_) => "nkey",
        }
    }
}

/// One entry of `nats.urls`, split into the address the client connects to and the credentials
/// the URL carried.
#[derive(Clone, Debug, PartialEq)]
pub struct NatsUrl {
    /// Lower-case scheme: `nats` (also when none was written), `tls`, `ws` or `wss`.
    pub scheme: String,
    /// Host name or IP address, without IPv6 brackets.
    pub host: String,
    /// `scheme://host[:port][/path]`, without user info: what the client is given.
    pub server: String,
    /// Credentials written in the URL.
    pub credentials: Option<UrlCredentials>,
}

/// Credentials written in a NATS URL.
#[derive(Clone, Debug, PartialEq)]
pub enum UrlCredentials {
    /// `user:password@`.
    UserPassword(String, Secret),
    /// `token@` (no `:`), NATS' convention for a token.
    Token(Secret),
}

impl NatsUrl {
    /// True for a loopback host (`localhost`, `127.0.0.0/8`, `::1`).
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl NatsConfig {
    /// The server list with credentials replaced by `***`, for logs.
    pub fn redacted_urls(&self) -> Vec<String> {
        self.urls.iter().map(|u| redact_url_userinfo(u)).collect()
    }

    /// Parses every server URL. Errors name the entry by position, never by its text, which
    /// may hold a password.
    pub fn servers(&self) -> Result<Vec<NatsUrl>, ConfigError> {
        let total = self.urls.len();
        self.urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                parse_nats_url(url).map_err(|reason| ConfigError::Url {
                    field: "nats.urls",
                    reason: format!("server {} of {total}: {reason}", i + 1),
                })
            })
            .collect()
    }

    /// True when every connection must use TLS: `tls_required`, a `tls://` URL (so that a
    /// fail-over never falls back to plain text), or a CA or client certificate.
    pub fn requires_tls(&self) -> bool {
        self.tls_required
            || self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self
                .urls
                .iter()
                .any(|u| u.trim_start().to_ascii_lowercase().starts_with("tls://"))
    }

    /// The one authentication method configured, from the settings or the URLs; an error
    /// when there are several.
    pub fn auth(&self) -> Result<NatsAuth, ConfigError> {
        let mut from_urls: Option<UrlCredentials> = None;
        for server in self.servers()? {
            if let Some(c) = server.credentials {
                if from_urls.as_ref().is_some_and(|seen| *seen != c) {
                    return Err(invalid(
                        "nats.urls",
                        "the server URLs carry different credentials; the client sends one set \
                         to every server",
                    ));
                }
                from_urls = Some(c);
            }
        }
        let mut methods = Vec::new();
        if let Some(c) = from_urls {
            methods.push(match c {
                UrlCredentials::UserPassword(user, password) => {
                    NatsAuth::UserPassword { user, password }
                }
                UrlCredentials::Token(token) => NatsAuth::Token(token),
            });
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            methods.push(NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            });
        }
        if let Some(token) = &self.token {
            methods.push(NatsAuth::Token(token.clone()));
        }
        if let Some(path) = &self.creds_file {
            methods.push(NatsAuth::CredsFile(path.clone()));
        }
        if let Some(seed) = &self.nkey_seed {
            methods.push(NatsAuth::NkeySeed(seed.clone()));
        }
        if let Some(path) = &self.nkey_file {
            methods.push(NatsAuth::NkeyFile(path.clone()));
        }
        if methods.len() > 1 {
            let field = if self.token.is_some() {
                "nats.token"
            } else if self.nkey_seed.is_some() {
                "nats.nkey_seed"
            } else if self.nkey_file.is_some() {
                "nats.nkey_file"
            } else if self.creds_file.is_some() {
                "nats.creds_file"
            } else {
                "nats.user"
            };
            let kinds: Vec<&str> = methods.iter().map(NatsAuth::kind).collect();
            return Err(invalid(
                field,
                format!(
                    "give only one NATS authentication: user and password, a token, a creds \
                     file or an nkey (found {}, counting credentials in nats.urls)",
                    kinds.join(" and ")
                ),
            ));
        }
        Ok(methods.pop().unwrap_or(NatsAuth::None))
    }

    /// A warning when credentials would cross the network in plain text: some authentication
    /// is configured, TLS is not required, and a server is neither loopback nor `wss://`. The
    /// server may still demand TLS itself, which the client then follows.
    pub fn plaintext_credentials_warning(&self) -> Option<String> {
        let auth = self.auth().ok()?;
        if auth == NatsAuth::None || self.requires_tls() {
            return None;
        }
        let exposed: Vec<String> = self
            .servers()
            .ok()?
            .into_iter()
            .filter(|s| s.scheme != "wss" && !s.is_loopback())
            .map(|s| s.server)
            .collect();
        if exposed.is_empty() {
            return None;
        }
        Some(format!(
            "NATS credentials ({}) would travel unencrypted to {} unless the server requires \
             TLS: use tls:// URLs or set nats.tls_required (--nats-tls-required / \
             NATS_TLS_REQUIRED)",
            auth.kind(),
            exposed.join(", ")
        ))
    }

    /// Checks every field; see [`Config::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.urls.is_empty() {
            return Err(invalid("nats.urls", "no NATS server given"));
        }
        self.servers()?;
        match (&self.user, &self.password) {
            (Some(user), _) if user.is_empty() => return Err(invalid("nats.user", "is empty")),
            (Some(_), None) => {
                return Err(invalid(
                    "nats.password",
                    "a NATS user is set but no password (set NATS_BRIDGE_PASSWORD)",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "nats.user",
                    "a NATS password is set but no user (set NATS_BRIDGE_USER)",
                ))
            }
            _ => {}
        }
        if self.token.as_ref().is_some_and(Secret::is_empty) {
            return Err(invalid("nats.token", "is empty"));
        }
        if let Some(seed) = &self.nkey_seed {
            check_nkey_seed(seed.expose()).map_err(|r| invalid("nats.nkey_seed", r))?;
        }
        self.auth()?;
        if self
            .creds_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("nats.creds_file", "is empty"));
        }
        check_file("nats.nkey_file", self.nkey_file.as_ref())?;
        check_file("nats.tls_ca_file", self.tls_ca_file.as_ref())?;
        check_file("nats.tls_cert_file", self.tls_cert_file.as_ref())?;
        check_file("nats.tls_key_file", self.tls_key_file.as_ref())?;
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => Err(invalid(
                "nats.tls_key_file",
                "nats.tls_cert_file is set but not its key; give both",
            )),
            (None, Some(_)) => Err(invalid(
                "nats.tls_cert_file",
                "nats.tls_key_file is set but not the certificate; give both",
            )),
            _ => Ok(()),
        }
    }
}

/// A usable NKey user seed. The reason never shows the seed.
pub fn check_nkey_seed(seed: &str) -> Result<(), String> {
    if !seed.starts_with("SU") {
        return Err("is not an NKey user seed (those start with SU)".into());
    }
    nkeys::KeyPair::from_seed(seed)
        .map(|_| ())
        .map_err(|_| "is not a valid NKey seed (bad length or checksum)".into())
}

/// What to replicate and how the pipeline is tuned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// File holding the last durable LSN; `None` means [`ReplicationConfig::state_file_path`]'s
    /// default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
    /// Private directory (mode 0700) for the spool files of large streamed transactions; `None`
    /// means [`ReplicationConfig::spool_dir_path`]'s default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool_dir: Option<PathBuf>,
    /// Silence on the replication connection after which it is reconnected, in seconds
    /// (0: automatic, see [`DEFAULT_WAL_RECEIVE_TIMEOUT_SECS`]).
    pub wal_receive_timeout_secs: u64,
    /// Start even when the state file's position does not belong to the server, from the
    /// slot, logging the skipped range.
    pub accept_position_gap: bool,
    /// Namespace of the message ids; `None` derives it from the system identifier, database
    /// and publication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_namespace: Option<String>,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            slot: DEFAULT_SLOT.to_owned(),
            publication: DEFAULT_PUBLICATION.to_owned(),
            tables: Vec::new(),
            format: DEFAULT_FORMAT,
            ring_capacity: DEFAULT_RING_CAPACITY,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            ring_max_bytes: DEFAULT_RING_MAX_BYTES,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            reconnect_backoff_secs: DEFAULT_RECONNECT_BACKOFF_SECS,
            standby_status_interval_secs: DEFAULT_STANDBY_STATUS_INTERVAL_SECS,
            state_file: None,
            spool_dir: None,
            wal_receive_timeout_secs: DEFAULT_WAL_RECEIVE_TIMEOUT_SECS,
            accept_position_gap: DEFAULT_ACCEPT_POSITION_GAP,
            id_namespace: None,
        }
    }
}

impl ReplicationConfig {
    /// The state file: the configured one, or `pgbridge-{slot}.lsn` in the working directory.
    pub fn state_file_path(&self) -> PathBuf {
        self.state_file.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "{DEFAULT_STATE_FILE_PREFIX}{}{DEFAULT_STATE_FILE_SUFFIX}",
                self.slot
            ))
        })
    }

    /// The spool directory: the configured one, or `pgbridge-spool-{slot}` in the state
    /// file's directory.
    pub fn spool_dir_path(&self) -> PathBuf {
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
    pub fn wal_receive_timeout(&self, sender_timeout: Duration) -> Duration {
        if self.wal_receive_timeout_secs > 0 {
            Duration::from_secs(self.wal_receive_timeout_secs)
        } else if sender_timeout.is_zero() {
            Duration::from_secs(WAL_RECEIVE_TIMEOUT_NO_SENDER_TIMEOUT_SECS)
        } else {
            sender_timeout + Duration::from_secs(WAL_RECEIVE_TIMEOUT_MARGIN_SECS)
        }
    }

    /// [`ReplicationConfig::reconnect_backoff_secs`] as a `Duration`.
    pub fn reconnect_backoff(&self) -> Duration {
        Duration::from_secs(self.reconnect_backoff_secs)
    }

    /// [`ReplicationConfig::standby_status_interval_secs`] as a `Duration`.
    pub fn standby_status_interval(&self) -> Duration {
        Duration::from_secs(self.standby_status_interval_secs)
    }

    /// Checks every field; see [`Config::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_slot_name(&self.slot).map_err(|r| invalid("replication.slot", r))?;
        check_identifier(&self.publication)
            .map_err(|r| invalid("replication.publication", format!("publication {r}")))?;
        let mut seen = HashSet::new();
        for table in &self.tables {
            check_table_name(table).map_err(|r| invalid("replication.tables", r))?;
            if !seen.insert(table.as_str()) {
                return Err(invalid(
                    "replication.tables",
                    format!("table '{table}' is listed twice"),
                ));
            }
        }
        if !self.ring_capacity.is_power_of_two()
            || !(MIN_RING_CAPACITY..=MAX_RING_CAPACITY).contains(&self.ring_capacity)
        {
            return Err(invalid(
                "replication.ring_capacity",
                format!(
                    "{} is not a power of two between {MIN_RING_CAPACITY} and {MAX_RING_CAPACITY}",
                    self.ring_capacity
                ),
            ));
        }
        if !(1..=MAX_IN_FLIGHT_LIMIT).contains(&self.max_in_flight) {
            return Err(invalid(
                "replication.max_in_flight",
                format!(
                    "{} is not between 1 and {MAX_IN_FLIGHT_LIMIT}",
                    self.max_in_flight
                ),
            ));
        }
        for (field, value) in [
            ("replication.ring_max_bytes", self.ring_max_bytes),
            ("replication.max_in_flight_bytes", self.max_in_flight_bytes),
        ] {
            if value < MIN_BYTE_BUDGET {
                return Err(invalid(
                    field,
                    format!("{value} bytes is less than the minimum of {MIN_BYTE_BUDGET}"),
                ));
            }
        }
        if self.reconnect_backoff_secs == 0 {
            return Err(invalid(
                "replication.reconnect_backoff_secs",
                "must be at least 1 second",
            ));
        }
        if self.standby_status_interval_secs == 0 {
            return Err(invalid(
                "replication.standby_status_interval_secs",
                "must be at least 1 second",
            ));
        }
        if self
            .state_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("replication.state_file", "is empty"));
        }
        if self
            .spool_dir
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("replication.spool_dir", "is empty"));
        }
        if self.wal_receive_timeout_secs > 0
            && self.wal_receive_timeout_secs <= 2 * self.standby_status_interval_secs
        {
            return Err(invalid(
                "replication.wal_receive_timeout_secs",
                format!(
                    "{} s is too short: it must be more than twice standby_status_interval_secs ({} s), or 0 for automatic",
                    self.wal_receive_timeout_secs, self.standby_status_interval_secs
                ),
            ));
        }
        if let Some(ns) = &self.id_namespace {
            check_id_namespace(ns).map_err(|r| invalid("replication.id_namespace", r))?;
        }
        Ok(())
    }
}

/// HTTP endpoints (`/metrics`, `/status`, `/health`, admin endpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    /// Checks every field; see [`Config::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.port == 0 {
            return Err(invalid("http.port", "must be 1-65535, not 0"));
        }
        if let Some(token) = &self.admin_token {
            if token.is_empty() {
                return Err(invalid(
                    "http.admin_token",
                    "is empty; leave it unset to refuse every admin request",
                ));
            }
            // An Authorization header cannot carry these, so such a token could never match.
            if token
                .expose()
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    "http.admin_token",
                    "contains whitespace or control characters",
                ));
            }
        }
        Ok(())
    }
}

/// Slot-lag monitor and the periodic metrics log line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs)
    }

    /// [`MonitorConfig::metrics_log_interval_secs`] as a `Duration`, `None` when turned off.
    pub fn metrics_log_interval(&self) -> Option<Duration> {
        (self.metrics_log_interval_secs > 0)
            .then(|| Duration::from_secs(self.metrics_log_interval_secs))
    }

    /// Checks every field; see [`Config::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interval_secs == 0 {
            return Err(invalid(
                "monitor.interval_secs",
                "must be at least 1 second",
            ));
        }
        if self.lag_warn_bytes == 0 {
            return Err(invalid("monitor.lag_warn_bytes", "must be above 0"));
        }
        if self.lag_warn_bytes >= self.lag_critical_bytes {
            return Err(invalid(
                "monitor.lag_warn_bytes",
                format!(
                    "{} must be below monitor.lag_critical_bytes ({})",
                    self.lag_warn_bytes, self.lag_critical_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// Snapshots into the INIT stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// Checks every field; see [`Config::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_SNAPSHOT_CHUNK_ROWS).contains(&self.chunk_rows) {
            return Err(invalid(
                "snapshot.chunk_rows",
                format!(
                    "{} is not between 1 and {MAX_SNAPSHOT_CHUNK_ROWS}",
                    self.chunk_rows
                ),
            ));
        }
        if !(1..=MAX_SNAPSHOT_MAX_CONCURRENT).contains(&self.max_concurrent) {
            return Err(invalid(
                "snapshot.max_concurrent",
                format!(
                    "{} is not between 1 and {MAX_SNAPSHOT_MAX_CONCURRENT}",
                    self.max_concurrent
                ),
            ));
        }
        if let Err(reason) = check_reply_prefix(&self.reply_prefix) {
            return Err(invalid("snapshot.reply_prefix", reason));
        }
        Ok(())
    }

    /// The cooldown between two snapshots of one table.
    pub fn cooldown(&self) -> Duration {
        Duration::from_secs(self.cooldown_secs)
    }
}

/// Subject prefixes of the bridge's own streams and of the NATS system subjects: a reply
/// prefix overlapping one would let a requester have replies stored or sent to an API.
const RESERVED_SUBJECT_PREFIXES: &[&str] = &["cdc.", "init.", "snapshot.", "outbox.", "dlq."];

/// Checks a snapshot reply prefix: printable, no wildcards, whole tokens ending in `.`, and
/// clear of the bridge's streams and of `$`-subjects (JetStream API, KV buckets, system).
fn check_reply_prefix(prefix: &str) -> Result<(), String> {
    let shown = format!("{prefix:?}");
    if prefix.is_empty() {
        return Err("is empty: use the NATS inbox prefix, e.g. _INBOX.".into());
    }
    if prefix.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "{shown} contains whitespace or non-ASCII characters"
        ));
    }
    if prefix.contains(['*', '>']) {
        return Err(format!("{shown} contains a wildcard (* or >)"));
    }
    let Some(body) = prefix.strip_suffix('.') else {
        return Err(format!(
            "{shown} must end with '.' so it matches whole tokens, e.g. \"{prefix}.\""
        ));
    };
    if body.is_empty() || body.split('.').any(str::is_empty) {
        return Err(format!("{shown} has an empty subject token"));
    }
    if prefix.starts_with('$') {
        return Err(format!(
            "{shown} reaches system subjects ($JS, $KV, $SYS): use an inbox prefix such as _INBOX."
        ));
    }
    let lower = prefix.to_ascii_lowercase();
    if let Some(r) = RESERVED_SUBJECT_PREFIXES
        .iter()
        .find(|r| lower.starts_with(*r) || r.starts_with(&lower))
    {
        return Err(format!(
            "{shown} overlaps the bridge's subjects {r}>: use an inbox prefix such as _INBOX."
        ));
    }
    Ok(())
}

#[cfg(test)]
mod reply_prefix_tests {
    use super::*;

    #[test]
    fn only_inbox_like_prefixes_are_accepted() {
        for ok in ["_INBOX.", "_INBOX_app.", "replies.bridge.", "a."] {
            assert_eq!(check_reply_prefix(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "_INBOX",
            ".",
            "a..b.",
            ".a.",
            "_IN BOX.",
            "_INBOX.*.",
            "_INBOX.>",
            "$JS.API.",
            "$KV.schemas.",
            "cdc.",
            "CDC.",
            "init.x.",
            "snapshot.",
            "c",
            "dlq.",
        ] {
            assert!(check_reply_prefix(bad).is_err(), "{bad:?} accepted");
        }
        let mut c = SnapshotConfig {
            reply_prefix: "cdc.".into(),
            ..SnapshotConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("snapshot.reply_prefix"), "{e}");
        c.reply_prefix = DEFAULT_SNAPSHOT_REPLY_PREFIX.into();
        c.max_concurrent = 0;
        assert!(c.validate().is_err());
        c.max_concurrent = 2;
        assert!(c.validate().is_ok());
    }
}

/// JetStream streams. Subjects are fixed (`cdc.>`, `init.>`); only names and retention vary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    pub fn cdc_max_age(&self) -> Duration {
        Duration::from_secs(self.cdc_max_age_secs)
    }

    /// CDC duplicate window.
    pub fn cdc_duplicate_window(&self) -> Duration {
        Duration::from_secs(self.cdc_duplicate_window_secs)
    }

    /// INIT retention; `Duration::ZERO` means unlimited, as in JetStream.
    pub fn init_max_age(&self) -> Duration {
        Duration::from_secs(self.init_max_age_secs)
    }

    /// Checks every field; see [`Config::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_stream_name(&self.cdc).map_err(|r| invalid("streams.cdc", r))?;
        check_stream_name(&self.init).map_err(|r| invalid("streams.init", r))?;
        if self.cdc == self.init {
            return Err(invalid(
                "streams.init",
                format!(
                    "the CDC and INIT streams must differ, both are '{}'",
                    self.cdc
                ),
            ));
        }
        if self.cdc_duplicate_window_secs == 0 {
            return Err(invalid(
                "streams.cdc_duplicate_window_secs",
                "must be at least 1 second; de-duplication of republished changes depends on it",
            ));
        }
        // JetStream itself refuses a duplicate window longer than the retention.
        if self.cdc_max_age_secs != 0 && self.cdc_duplicate_window_secs > self.cdc_max_age_secs {
            return Err(invalid(
                "streams.cdc_duplicate_window_secs",
                format!(
                    "{} is longer than streams.cdc_max_age_secs ({})",
                    self.cdc_duplicate_window_secs, self.cdc_max_age_secs
                ),
            ));
        }
        if !(1..=MAX_STREAM_REPLICAS).contains(&self.replicas) {
            return Err(invalid(
                "streams.replicas",
                format!(
                    "{} is not between 1 and {MAX_STREAM_REPLICAS}",
                    self.replicas
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Loads the effective configuration: defaults, then the TOML file named by
    /// `args.config` (if any), then every value given in `args` (flags and environment, already
    /// combined by clap); expands the PostgreSQL URL; validates the result.
    pub fn load(args: &ConfigArgs) -> Result<Self, ConfigError> {
        let mut raw = match &args.config {
            Some(path) => RawConfig::read(path)?,
            None => RawConfig::default(),
        };
        raw.apply_args(args);
        let config = raw.resolve()?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML configuration over the defaults and expands the PostgreSQL URL, without
    /// validating. `origin` names the text in error messages.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        RawConfig::parse(text, origin)?.resolve()
    }

    /// Checks every field and the relations between them. The first problem found is returned,
    /// naming the field, the flag and the environment variable that set it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.postgres.validate()?;
        self.nats.validate()?;
        self.replication.validate()?;
        self.http.validate()?;
        self.monitor.validate()?;
        self.snapshot.validate()?;
        self.streams.validate()?;
        Ok(())
    }

    /// One line for the startup log: what the bridge connects to and streams, with secrets
    /// shown only as set (`***`) or not (`none`).
    pub fn summary(&self) -> String {
        self.to_string()
    }

    /// The effective configuration as a TOML document (usable as a configuration file once the
    /// secrets are filled in), with every secret shown as `***`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.replication.state_file = Some(self.replication.state_file_path());
        shown.replication.spool_dir = Some(self.replication.spool_dir_path());
        match toml::to_string(&shown) {
            Ok(text) => text,
            // Not reachable with these types; say so rather than print half a document.
            Err(err) => format!("# cannot render the configuration: {err}\n"),
        }
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn set(s: &Option<Secret>) -> &'static str {
            if s.is_some() {
                REDACTED
            } else {
                "none"
            }
        }
        let pg = &self.postgres;
        let nats_auth = self.nats.auth().map_or("invalid", |a| a.kind());
        let sslmode = pg.sslmode.map_or("libpq-default", SslMode::as_str);
        let tables = if self.replication.tables.is_empty() {
            "all".to_owned()
        } else {
            self.replication.tables.join(",")
        };
        write!(
            f,
            "postgres={}@{}:{}/{} pg_password={} sslmode={} nats={} nats_auth={} \
             slot={} publication={} tables={} format={} streams={},{} http={} admin_token={} \
             state_file={} ring_capacity={} max_in_flight={} snapshot_chunk_rows={} \
             snapshot_on_start={} snapshot_reply_prefix={} snapshot_max_concurrent={} \
             snapshot_cooldown_secs={} nats_tls={}",
            pg.user,
            pg.host,
            pg.port,
            pg.dbname,
            set(&pg.password),
            sslmode,
            self.nats.redacted_urls().join(","),
            nats_auth,
            self.replication.slot,
            self.replication.publication,
            tables,
            self.replication.format,
            self.streams.cdc,
            self.streams.init,
            self.http.socket_addr(),
            set(&self.http.admin_token),
            self.replication.state_file_path().display(),
            self.replication.ring_capacity,
            self.replication.max_in_flight,
            self.snapshot.chunk_rows,
            self.snapshot.on_start,
            self.snapshot.reply_prefix,
            self.snapshot.max_concurrent,
            self.snapshot.cooldown_secs,
            if self.nats.requires_tls() {
                "required"
            } else {
                "if-offered"
            },
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Layering: file and command line, before the PostgreSQL URL is expanded
// ---------------------------------------------------------------------------------------------

/// The configuration as written in the file (over the defaults) and overridden by the command
/// line. Only `[postgres]` differs from [`Config`]: its parts stay optional until the URL is
/// expanded, because an explicit part must win over the URL's.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    postgres: RawPgConfig,
    nats: NatsConfig,
    replication: ReplicationConfig,
    http: HttpConfig,
    monitor: MonitorConfig,
    snapshot: SnapshotConfig,
    streams: StreamsConfig,
}

/// `[postgres]` as written: every part optional.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawPgConfig {
    url: Option<Secret>,
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<Secret>,
    dbname: Option<String>,
    sslmode: Option<SslMode>,
    sslrootcert: Option<PathBuf>,
    sslcert: Option<PathBuf>,
    sslkey: Option<PathBuf>,
    connect_timeout_secs: Option<u64>,
}

/// Replaces `target` when a value was given.
fn given<T: Clone>(target: &mut T, value: &Option<T>) {
    if let Some(value) = value {
        *target = value.clone();
    }
}

/// Replaces an optional `target` when a value was given.
fn given_opt<T: Clone>(target: &mut Option<T>, value: &Option<T>) {
    if value.is_some() {
        target.clone_from(value);
    }
}

/// A comma-separated command-line list, trimmed and without empty entries, so that `--table ''`
/// gives the empty list.
fn cli_list(values: &[String]) -> Vec<String> {
    values
        .iter()
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

impl RawConfig {
    fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|err| {
            let message = err.message().replace('\n', " ");
            let message = match err.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("line {line}, column {column}: {message}")
                }
                None => message,
            };
            ConfigError::Toml {
                path: origin.to_owned(),
                message,
            }
        })
    }

    /// Lays the command-line values (flag or environment) over the file's, where given.
    fn apply_args(&mut self, args: &ConfigArgs) {
        let a = &args.postgres;
        let pg = &mut self.postgres;
        given_opt(&mut pg.url, &a.pg_url);
        given_opt(&mut pg.host, &a.pg_host);
        given_opt(&mut pg.port, &a.pg_port);
        given_opt(&mut pg.user, &a.pg_user);
        given_opt(&mut pg.password, &a.pg_password);
        given_opt(&mut pg.dbname, &a.pg_db);
        given_opt(&mut pg.sslmode, &a.pg_sslmode);
        given_opt(&mut pg.sslrootcert, &a.pg_sslrootcert);
        given_opt(&mut pg.sslcert, &a.pg_sslcert);
        given_opt(&mut pg.sslkey, &a.pg_sslkey);
        given_opt(&mut pg.connect_timeout_secs, &a.pg_connect_timeout_secs);

        let a = &args.nats;
        let nats = &mut self.nats;
        // NATS_URL/--nats-url and NATS_HOST/--nats-host are two names for one setting.
        if let Some(urls) = a.nats_url.as_ref().or(a.nats_host.as_ref()) {
            nats.urls = cli_list(urls);
        }
        given_opt(&mut nats.user, &a.nats_user);
        given_opt(&mut nats.password, &a.nats_password);
        given_opt(&mut nats.token, &a.nats_token);
        given_opt(&mut nats.creds_file, &a.nats_creds);
        given_opt(&mut nats.nkey_seed, &a.nats_nkey_seed);
        given_opt(&mut nats.nkey_file, &a.nats_nkey_file);
        given(&mut nats.tls_required, &a.nats_tls_required);
        given_opt(&mut nats.tls_ca_file, &a.nats_tls_ca_file);
        given_opt(&mut nats.tls_cert_file, &a.nats_tls_cert_file);
        given_opt(&mut nats.tls_key_file, &a.nats_tls_key_file);

        let a = &args.replication;
        let r = &mut self.replication;
        given(&mut r.slot, &a.slot);
        given(&mut r.publication, &a.publication);
        if let Some(tables) = &a.table {
            r.tables = cli_list(tables);
        }
        given(&mut r.format, &a.format);
        given(&mut r.ring_capacity, &a.ring_capacity);
        given(&mut r.max_in_flight, &a.max_in_flight);
        given(&mut r.ring_max_bytes, &a.ring_max_bytes);
        given(&mut r.max_in_flight_bytes, &a.max_in_flight_bytes);
        given(&mut r.reconnect_backoff_secs, &a.reconnect_backoff_secs);
        given(
            &mut r.standby_status_interval_secs,
            &a.standby_status_interval_secs,
        );
        given_opt(&mut r.state_file, &a.state_file);
        given_opt(&mut r.spool_dir, &a.spool_dir);
        given(&mut r.wal_receive_timeout_secs, &a.wal_receive_timeout_secs);
        given(&mut r.accept_position_gap, &a.accept_position_gap);
        given_opt(&mut r.id_namespace, &a.id_namespace);

        let a = &args.http;
        given(&mut self.http.bind, &a.http_bind);
        given(&mut self.http.port, &a.port);
        given_opt(&mut self.http.admin_token, &a.admin_token);

        let a = &args.monitor;
        let m = &mut self.monitor;
        given(&mut m.interval_secs, &a.monitor_interval_secs);
        given(&mut m.lag_warn_bytes, &a.lag_warn_bytes);
        given(&mut m.lag_critical_bytes, &a.lag_critical_bytes);
        given(
            &mut m.metrics_log_interval_secs,
            &a.metrics_log_interval_secs,
        );

        let a = &args.snapshot;
        given(&mut self.snapshot.chunk_rows, &a.snapshot_chunk_rows);
        given(&mut self.snapshot.on_start, &a.snapshot_on_start);
        given(&mut self.snapshot.reply_prefix, &a.snapshot_reply_prefix);
        given(
            &mut self.snapshot.max_concurrent,
            &a.snapshot_max_concurrent,
        );
        given(&mut self.snapshot.cooldown_secs, &a.snapshot_cooldown_secs);

        let a = &args.streams;
        let s = &mut self.streams;
        if let Some(names) = &a.stream {
            s.cdc.clone_from(&names.cdc);
            given(&mut s.init, &names.init);
        }
        given(&mut s.cdc_max_age_secs, &a.cdc_max_age_secs);
        given(
            &mut s.cdc_duplicate_window_secs,
            &a.cdc_duplicate_window_secs,
        );
        given(&mut s.init_max_age_secs, &a.init_max_age_secs);
        given(&mut s.replicas, &a.stream_replicas);
    }

    /// Expands the PostgreSQL URL and fills the remaining defaults.
    fn resolve(self) -> Result<Config, ConfigError> {
        let mut nats = self.nats;
        nats.urls = nats
            .urls
            .iter()
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        Ok(Config {
            postgres: self.postgres.resolve()?,
            nats,
            replication: self.replication,
            http: self.http,
            monitor: self.monitor,
            snapshot: self.snapshot,
            streams: self.streams,
        })
    }
}

impl RawPgConfig {
    /// Explicit part, else the URL's part, else the default.
    fn resolve(self) -> Result<PgConfig, ConfigError> {
        let url = match &self.url {
            Some(url) => parse_pg_url(url.expose()).map_err(|reason| ConfigError::Url {
                field: "postgres.url",
                reason,
            })?,
            None => PgUrlParts::default(),
        };
        Ok(PgConfig {
            host: self
                .host
                .or(url.host)
                .unwrap_or_else(|| DEFAULT_PG_HOST.to_owned()),
            port: self.port.or(url.port).unwrap_or(DEFAULT_PG_PORT),
            user: self
                .user
                .or(url.user)
                .unwrap_or_else(|| DEFAULT_PG_USER.to_owned()),
            password: self.password.or(url.password),
            dbname: self
                .dbname
                .or(url.dbname)
                .unwrap_or_else(|| DEFAULT_PG_DBNAME.to_owned()),
            sslmode: self.sslmode.or(url.sslmode),
            sslrootcert: self.sslrootcert.or(url.sslrootcert),
            sslcert: self.sslcert.or(url.sslcert),
            sslkey: self.sslkey.or(url.sslkey),
            connect_timeout_secs: self
                .connect_timeout_secs
                .or(url.connect_timeout_secs)
                .unwrap_or(DEFAULT_PG_CONNECT_TIMEOUT_SECS),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL URL
// ---------------------------------------------------------------------------------------------

/// The parts a PostgreSQL URL gave; `None` where it gave nothing.
#[derive(Debug, Default, PartialEq)]
struct PgUrlParts {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<Secret>,
    dbname: Option<String>,
    sslmode: Option<SslMode>,
    sslrootcert: Option<PathBuf>,
    sslcert: Option<PathBuf>,
    sslkey: Option<PathBuf>,
    connect_timeout_secs: Option<u64>,
}

/// Splits what follows `scheme://` at the user info, which ends at the LAST `@`: user names
/// and passwords are where unescaped reserved characters turn up (`/`, `?`, `#`, `@`), while
/// host, port, path and query have no reason to hold an `@` (write it `%40` there). Returns
/// the user info, if any, and the rest.
fn split_userinfo(rest: &str) -> (Option<&str>, &str) {
    match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    }
}

/// Parses `postgres[ql]://[user[:password]@][host][:port][/dbname][?k=v&...]`.
///
/// Error messages describe the problem without echoing the URL, which may hold a password.
fn parse_pg_url(url: &str) -> Result<PgUrlParts, String> {
    let rest = ["postgresql://", "postgres://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))
        .ok_or("must start with postgres:// or postgresql://")?;
    let (userinfo, rest) = split_userinfo(rest);
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.split_once('/') {
        Some((authority, path)) => (authority, Some(path)),
        None => (before_query, None),
    };
    let mut parts = PgUrlParts::default();

    if let Some(userinfo) = userinfo {
        // The first ':' ends the user name; a password may hold more.
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        parts.user = non_empty(percent_decode(user, "user name")?);
        if let Some(password) = password {
            parts.password = non_empty(percent_decode(password, "password")?).map(Secret);
        }
    }
    let host_port = authority;
    if host_port.contains(',') {
        return Err("several hosts are not supported; give one host".into());
    }
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("IPv6 address without closing ']'")?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("unexpected text after the IPv6 address")?,
            ),
        };
        (host.to_owned(), port)
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (percent_decode(host, "host")?, Some(port)),
            None => (percent_decode(host_port, "host")?, None),
        }
    };
    parts.host = non_empty(host);
    if let Some(port) = port.filter(|p| !p.is_empty()) {
        parts.port = Some(parse_port(port)?);
    }
    if let Some(path) = path {
        parts.dbname = non_empty(percent_decode(path, "database name")?);
    }

    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair
            .split_once('=')
            // Not echoed: a mistyped pair may hold a secret.
            .ok_or("a query parameter has no '=value'")?;
        let key = percent_decode(key, "query parameter name")?;
        match key.as_str() {
            "password" => {
                parts.password = non_empty(percent_decode(value, "password")?).map(Secret)
            }
            "user" => parts.user = non_empty(percent_decode(value, "user name")?),
            "host" => parts.host = non_empty(percent_decode(value, "host")?),
            "port" => parts.port = Some(parse_port(&percent_decode(value, "port")?)?),
            "dbname" => parts.dbname = non_empty(percent_decode(value, "database name")?),
            "sslmode" => parts.sslmode = Some(percent_decode(value, "sslmode")?.parse()?),
            "sslrootcert" => parts.sslrootcert = non_empty_path(value, "sslrootcert")?,
            "sslcert" => parts.sslcert = non_empty_path(value, "sslcert")?,
            "sslkey" => parts.sslkey = non_empty_path(value, "sslkey")?,
            "connect_timeout" => {
                let value = percent_decode(value, "connect_timeout")?;
                parts.connect_timeout_secs = Some(value.parse().map_err(|_| {
                    format!("connect_timeout '{value}' is not a whole number of seconds")
                })?);
            }
            other => {
                return Err(format!(
                    "query parameter '{other}' is not supported (use sslmode, sslrootcert, \
                     sslcert, sslkey, connect_timeout, host, port, user, password or dbname)"
                ))
            }
        }
    }
    Ok(parts)
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn non_empty_path(value: &str, what: &str) -> Result<Option<PathBuf>, String> {
    Ok(non_empty(percent_decode(value, what)?).map(PathBuf::from))
}

fn parse_port(port: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        // The text is not echoed: in a mistyped URL it may be a password.
        _ => Err("the port is not a number from 1 to 65535".into()),
    }
}

/// Decodes `%XX` escapes. `what` names the part in the error, which never shows the text.
fn percent_decode(s: &str, what: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("the {what} has an invalid percent-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the {what} is not UTF-8 after percent-decoding"))
}

// ---------------------------------------------------------------------------------------------
// Name rules
// ---------------------------------------------------------------------------------------------

/// PostgreSQL's replication slot rule: lower-case letters, digits and underscore, 1-63 bytes.
fn check_slot_name(slot: &str) -> Result<(), String> {
    if slot.is_empty() {
        return Err("is empty".into());
    }
    if slot.len() > MAX_PG_IDENTIFIER_BYTES
        || !slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "'{slot}' must be 1-{MAX_PG_IDENTIFIER_BYTES} characters of a-z, 0-9 and _ \
             (PostgreSQL's rule for replication slot names)"
        ));
    }
    Ok(())
}

/// A message-id namespace: 1-64 characters of `[A-Za-z0-9_-]`, so an id stays one NATS header
/// value and is easy to match.
fn check_id_namespace(ns: &str) -> Result<(), String> {
    if ns.is_empty()
        || ns.len() > MAX_ID_NAMESPACE_LEN
        || !ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "{ns:?} must be 1-{MAX_ID_NAMESPACE_LEN} characters of A-Z, a-z, 0-9, _ and -"
        ));
    }
    Ok(())
}

/// An unquoted PostgreSQL identifier: a letter or `_`, then letters, digits, `_` or `$`, at
/// most 63 bytes. Names that need quoting are refused: they would also need escaping in
/// subjects and SQL.
fn check_identifier(name: &str) -> Result<(), String> {
    let Some(first) = name.chars().next() else {
        return Err("name is empty".into());
    };
    if name.len() > MAX_PG_IDENTIFIER_BYTES {
        return Err(format!(
            "name '{name}' is longer than {MAX_PG_IDENTIFIER_BYTES} bytes"
        ));
    }
    if !(first.is_alphabetic() || first == '_') {
        return Err(format!("name '{name}' must start with a letter or '_'"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || *c == '_' || *c == '$'))
    {
        return Err(format!(
            "name '{name}' contains {bad:?}; use letters, digits, '_' and '$' \
             (names that need quoting are not supported)"
        ));
    }
    Ok(())
}

/// `table` or `schema.table`, each part an unquoted identifier.
fn check_table_name(table: &str) -> Result<(), String> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2 {
        return Err(format!(
            "table '{table}' has more than one '.'; write table or schema.table"
        ));
    }
    for part in parts {
        check_identifier(part).map_err(|r| format!("table '{table}': {r}"))?;
    }
    Ok(())
}

/// JetStream's rule: no whitespace, `.`, `*`, `>`, path separators or control characters.
fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("stream name is empty".into());
    }
    if name.len() > MAX_STREAM_NAME_BYTES {
        return Err(format!(
            "stream name is longer than {MAX_STREAM_NAME_BYTES} bytes"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(format!(
            "stream name '{name}' contains {bad:?}; JetStream stream names cannot contain \
             whitespace, '.', '*', '>', '/' or '\\'"
        ));
    }
    Ok(())
}

/// Parses a NATS server, `[scheme://][user[:password]@ | token@]host[:port][/path]` with scheme
/// nats (the default), tls, ws or wss. The user info ends at the last `@` ([`split_userinfo`])
/// and is percent-decoded. The reason never shows the URL's text.
fn parse_nats_url(url: &str) -> Result<NatsUrl, String> {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => {
            let lower = scheme.to_ascii_lowercase();
            if !matches!(lower.as_str(), "nats" | "tls" | "ws" | "wss") {
                // Echoed only when it looks like a scheme, not a mangled user info.
                return Err(
                    if !scheme.is_empty()
                        && scheme.len() <= 10
                        && scheme.bytes().all(|b| b.is_ascii_alphanumeric())
                    {
                        format!("scheme '{scheme}' is not one of nats, tls, ws, wss")
                    } else {
                        "the scheme is not one of nats, tls, ws, wss".to_owned()
                    },
                );
            }
            (lower, rest)
        }
        None => ("nats".to_owned(), url),
    };
    let (userinfo, rest) = split_userinfo(rest);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("IPv6 address without closing ']'")?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("unexpected text after the IPv6 address")?,
            ),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if !authority.starts_with('[') && host.contains([':', '?', '#', ' ']) {
        return Err("the host is not a host name or IP address (IPv6 goes in [...])".into());
    }
    if let Some(port) = port {
        parse_port(port)?;
    }
    let credentials = match userinfo.filter(|u| !u.is_empty()) {
        None => None,
        Some(userinfo) => Some(match userinfo.split_once(':') {
            Some((user, password)) => {
                let user = percent_decode(user, "user name")?;
                if user.is_empty() {
                    return Err("the user info has a password but no user name".into());
                }
                UrlCredentials::UserPassword(user, Secret(percent_decode(password, "password")?))
            }
            None => UrlCredentials::Token(Secret(percent_decode(userinfo, "token")?)),
        }),
    };
    Ok(NatsUrl {
        server: format!("{scheme}://{authority}{path}"),
        scheme,
        host: host.to_owned(),
        credentials,
    })
}

/// Replaces the user info of a URL (`scheme://user:pass@host`, `user:pass@host`) with `***`,
/// by the same last-`@` rule the parsers use, so that whatever they took as user info is
/// hidden.
fn redact_url_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    match split_userinfo(rest) {
        (Some(_), tail) => match scheme {
            Some(scheme) => format!("{scheme}://{REDACTED}@{tail}"),
            None => format!("{REDACTED}@{tail}"),
        },
        (None, _) => url.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{test_env::with_env, Cli};
    use clap::{CommandFactory, Parser};

    fn toml_config(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("test.toml"))
    }

    fn invalid_field(config: &Config) -> &'static str {
        match config.validate() {
            Err(ConfigError::Invalid { field, .. }) | Err(ConfigError::Url { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    /// A configuration file in a directory of its own, removed on drop.
    struct TempConfig {
        path: PathBuf,
    }

    impl Drop for TempConfig {
        fn drop(&mut self) {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// Writes `text` to a file unique to this test.
    fn temp_file(name: &str, text: &str) -> TempConfig {
        let dir = std::env::temp_dir().join(format!(
            "pgbridge-config-test-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        TempConfig { path }
    }

    #[test]
    fn defaults_are_the_constants() {
        let c = Config::default();
        assert_eq!(c.postgres.host, DEFAULT_PG_HOST);
        assert_eq!(c.postgres.port, 5432);
        assert_eq!(c.postgres.sslmode, None);
        assert_eq!(c.nats.urls, vec![DEFAULT_NATS_URL.to_owned()]);
        assert_eq!(c.replication.slot, "cdc_slot");
        assert_eq!(c.replication.publication, "cdc_pub");
        assert!(c.replication.tables.is_empty());
        assert_eq!(c.replication.format, Format::Msgpack);
        assert_eq!(c.replication.reconnect_backoff(), Duration::from_secs(5));
        assert_eq!(
            c.replication.standby_status_interval(),
            Duration::from_secs(10)
        );
        assert_eq!(
            c.replication.state_file_path(),
            PathBuf::from("pgbridge-cdc_slot.lsn")
        );
        assert_eq!(c.http.socket_addr().to_string(), "127.0.0.1:9090");
        assert_eq!(c.http.admin_token, None);
        assert_eq!(c.monitor.interval(), Duration::from_secs(30));
        assert_eq!(c.monitor.lag_warn_bytes, 536_870_912);
        assert_eq!(c.monitor.lag_critical_bytes, 1_073_741_824);
        assert_eq!(
            c.monitor.metrics_log_interval(),
            Some(Duration::from_secs(15))
        );
        assert_eq!(c.snapshot.chunk_rows, 10_000);
        assert!(!c.snapshot.on_start);
        assert_eq!(
            (c.streams.cdc.as_str(), c.streams.init.as_str()),
            ("CDC", "INIT")
        );
        assert_eq!(c.streams.cdc_duplicate_window(), Duration::from_secs(120));
        assert_eq!(c.streams.init_max_age(), Duration::from_secs(7 * 24 * 3600));
        c.validate().expect("the defaults are valid");
        // An empty file and an empty command line change nothing.
        assert_eq!(toml_config("").unwrap(), c);
        assert_eq!(Config::load(&ConfigArgs::default()).unwrap(), c);
    }

    #[test]
    fn toml_sections_are_read() {
        let c = toml_config(
            r#"
            [postgres]
            host = "db.example"
            port = 6432
            user = "bridge_reader"
            password = "pw"
            dbname = "app"
            sslmode = "verify-full"
            connect_timeout_secs = 3

            [nats]
            urls = ["nats://n1:4222", "n2:4223"]
            user = "bridge"
            password = "npw"

            [replication]
            slot = "s1"
            publication = "p1"
            tables = ["users", "sales.orders"]
            format = "json"
            ring_capacity = 1024
            max_in_flight = 64
            reconnect_backoff_secs = 2
            standby_status_interval_secs = 5
            state_file = "/var/lib/pgbridge/s1.lsn"

            [http]
            bind = "0.0.0.0"
            port = 9191
            admin_token = "tok"

            [monitor]
            interval_secs = 10
            lag_warn_bytes = 100
            lag_critical_bytes = 200
            metrics_log_interval_secs = 0

            [snapshot]
            chunk_rows = 500
            on_start = true

            [streams]
            cdc = "CHANGES"
            init = "BOOT"
            cdc_max_age_secs = 3600
            cdc_duplicate_window_secs = 60
            init_max_age_secs = 0
            replicas = 3
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.postgres.host, "db.example");
        assert_eq!(c.postgres.port, 6432);
        assert_eq!(c.postgres.password, Some(Secret::new("pw")));
        assert_eq!(c.postgres.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(c.nats.urls, ["nats://n1:4222", "n2:4223"]);
        assert_eq!(c.replication.tables, ["users", "sales.orders"]);
        assert_eq!(c.replication.format, Format::Json);
        assert_eq!(
            c.replication.state_file_path(),
            PathBuf::from("/var/lib/pgbridge/s1.lsn")
        );
        assert_eq!(c.http.socket_addr().to_string(), "0.0.0.0:9191");
        assert_eq!(c.monitor.metrics_log_interval(), None);
        assert!(c.snapshot.on_start);
        assert_eq!(c.streams.init, "BOOT");
        assert_eq!(c.streams.replicas, 3);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_line() {
        let err = toml_config("[replication]\nslot = \"a\"\nslott = \"b\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Toml { .. }));
        assert!(msg.starts_with("test.toml: line 3, column 1:"), "{msg}");
        assert!(msg.contains("slott"), "{msg}");

        let msg = toml_config("[bogus]\nx = 1\n").unwrap_err().to_string();
        assert!(msg.contains("bogus"), "{msg}");

        let msg = toml_config("[replication]\nformat = \"xml\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("xml") && msg.contains("line 2"), "{msg}");

        let msg = toml_config("[http]\nport = 70000\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 2"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let args = ConfigArgs {
            config: Some(PathBuf::from("/nonexistent/pgbridge.toml")),
            ..ConfigArgs::default()
        };
        let err = Config::load(&args).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/pgbridge.toml"));
    }

    #[test]
    fn args_override_file_only_where_given() {
        let tmp = temp_file(
            "override.toml",
            "[replication]\nslot = \"file_slot\"\npublication = \"file_pub\"\ntables = [\"a\"]\n\
             [http]\nport = 9100\n[snapshot]\non_start = true\n",
        );
        let file = tmp.path.clone();
        let mut args = ConfigArgs {
            config: Some(file),
            ..ConfigArgs::default()
        };
        args.replication.slot = Some("flag_slot".into());
        args.snapshot.snapshot_on_start = Some(false);
        let c = Config::load(&args).unwrap();
        assert_eq!(c.replication.slot, "flag_slot"); // flag over file
        assert_eq!(c.replication.publication, "file_pub"); // file over default
        assert_eq!(c.replication.tables, ["a"]);
        assert_eq!(c.http.port, 9100);
        assert!(!c.snapshot.on_start); // a flag can turn a file's true off
        assert_eq!(c.monitor, MonitorConfig::default()); // default where nobody spoke

        // `--table ''` means every table, overriding the file's list.
        args.replication.table = Some(vec![String::new()]);
        assert!(Config::load(&args).unwrap().replication.tables.is_empty());
    }

    /// flags > environment > file > defaults, through clap's real environment handling. Every
    /// environment case lives under the crate's environment lock (see `cli::test_env`).
    #[test]
    fn precedence_flag_env_file_default() {
        let tmp = temp_file(
            "precedence.toml",
            "[postgres]\nhost = \"file-host\"\nuser = \"file-user\"\ndbname = \"file-db\"\n\
             [replication]\nslot = \"file_slot\"\npublication = \"file_pub\"\n\
             id_namespace = \"file-ns\"\n\
             [http]\nport = 9101\n",
        );
        let file = tmp.path.clone();
        let file = file.to_str().unwrap().to_owned();
        let load = |argv: &[&str]| {
            let cli = Cli::try_parse_from(argv).expect("valid command line");
            Config::load(&cli.config).expect("valid configuration")
        };

        // File over defaults.
        let c = with_env(&[("BRIDGE_CONFIG", &file)], || load(&["bridge"]));
        assert_eq!(c.postgres.host, "file-host");
        assert_eq!(c.postgres.port, DEFAULT_PG_PORT);
        assert_eq!(c.replication.slot, "file_slot");
        assert_eq!(c.replication.id_namespace.as_deref(), Some("file-ns"));
        assert!(!c.replication.accept_position_gap);
        assert_eq!(c.http.port, 9101);

        // Environment over file.
        let env = [
            ("BRIDGE_CONFIG", file.as_str()),
            ("PG_HOST", "env-host"),
            ("PG_PORT", "6000"),
            ("BRIDGE_SLOT", "env_slot"),
            ("BRIDGE_PORT", "9102"),
            ("BRIDGE_TABLES", "users, orders"),
            ("NATS_HOST", "nats-env:4222"),
            ("BRIDGE_SNAPSHOT_ON_START", "yes"),
            ("BRIDGE_STREAMS", "C1,I1"),
            ("BRIDGE_ID_NAMESPACE", "env_ns"),
            ("BRIDGE_ACCEPT_POSITION_GAP", "true"),
        ];
        let c = with_env(&env, || load(&["bridge"]));
        assert_eq!(c.postgres.host, "env-host");
        assert_eq!(c.postgres.port, 6000);
        assert_eq!(c.postgres.user, "file-user");
        assert_eq!(c.replication.slot, "env_slot");
        assert_eq!(c.replication.publication, "file_pub");
        assert_eq!(c.replication.tables, ["users", "orders"]);
        assert_eq!(c.http.port, 9102);
        assert_eq!(c.nats.urls, ["nats-env:4222"]);
        assert!(c.snapshot.on_start);
        assert_eq!(c.replication.id_namespace.as_deref(), Some("env_ns"));
        assert!(c.replication.accept_position_gap);
        assert_eq!(
            (c.streams.cdc.as_str(), c.streams.init.as_str()),
            ("C1", "I1")
        );

        // Flags over environment, also after the subcommand (the flags are global).
        let c = with_env(&env, || {
            load(&[
                "bridge",
                "check-config",
                "--pg-host",
                "flag-host",
                "--slot",
                "flag_slot",
                "--port",
                "9103",
                "--nats-url",
                "nats://flag:4222",
                "--snapshot-on-start=false",
                "--stream",
                "C2",
                "--id-namespace",
                "flag-ns",
                "--accept-position-gap=false",
            ])
        });
        assert_eq!(c.replication.id_namespace.as_deref(), Some("flag-ns"));
        assert!(!c.replication.accept_position_gap);
        assert_eq!(c.postgres.host, "flag-host");
        assert_eq!(c.postgres.port, 6000); // env, no flag given
        assert_eq!(c.replication.slot, "flag_slot");
        assert_eq!(c.http.port, 9103);
        assert_eq!(c.nats.urls, ["nats://flag:4222"]);
        assert!(!c.snapshot.on_start);
        assert_eq!(
            (c.streams.cdc.as_str(), c.streams.init.as_str()),
            ("C2", "INIT")
        );

        // NATS_URL is the same setting as NATS_HOST and wins over it.
        let c = with_env(
            &[
                ("NATS_HOST", "h1"),
                ("NATS_URL", "nats://u1:4222,nats://u2:4222"),
            ],
            || load(&["bridge"]),
        );
        assert_eq!(c.nats.urls, ["nats://u1:4222", "nats://u2:4222"]);

        // The environment is read through clap, so a malformed value is a usage error.
        with_env(&[("PG_PORT", "not-a-port")], || {
            assert!(Cli::try_parse_from(["bridge"]).is_err());
        });
        // Nothing set anywhere: the defaults.
        let c = with_env(&[], || load(&["bridge"]));
        assert_eq!(c, Config::default());
    }

    #[test]
    fn pg_url_is_expanded_and_parts_win() {
        let c = toml_config(
            "[postgres]\nurl = \"postgresql://us%40er:p%3Ass%2Fw@db.example:6543/my%20db?sslmode=require&connect_timeout=4\"\n",
        )
        .unwrap();
        assert_eq!(c.postgres.user, "us@er");
        assert_eq!(c.postgres.password.as_ref().unwrap().expose(), "p:ss/w");
        assert_eq!(c.postgres.host, "db.example");
        assert_eq!(c.postgres.port, 6543);
        assert_eq!(c.postgres.dbname, "my db");
        assert_eq!(c.postgres.sslmode, Some(SslMode::Require));
        assert_eq!(c.postgres.connect_timeout_secs, 4);

        // An explicit part wins over the URL's, whichever level each comes from.
        let tmp = temp_file(
            "url.toml",
            "[postgres]\nurl = \"postgres://u:p@urlhost:1111/urldb\"\nport = 2222\n",
        );
        let file = tmp.path.clone();
        let mut args = ConfigArgs {
            config: Some(file),
            ..ConfigArgs::default()
        };
        args.postgres.pg_host = Some("flaghost".into());
        let c = Config::load(&args).unwrap();
        assert_eq!(c.postgres.host, "flaghost");
        assert_eq!(c.postgres.port, 2222);
        assert_eq!(c.postgres.user, "u");
        assert_eq!(c.postgres.dbname, "urldb");

        // Missing parts fall back to the defaults.
        let p = parse_pg_url("postgres://").unwrap();
        assert_eq!(p, PgUrlParts::default());
        let c = toml_config("[postgres]\nurl = \"postgres:///appdb\"\n").unwrap();
        assert_eq!(c.postgres.host, DEFAULT_PG_HOST);
        assert_eq!(c.postgres.port, DEFAULT_PG_PORT);
        assert_eq!(c.postgres.user, DEFAULT_PG_USER);
        assert_eq!(c.postgres.password, None);
        assert_eq!(c.postgres.dbname, "appdb");

        let p = parse_pg_url("postgres://[::1]:5433/db").unwrap();
        assert_eq!((p.host.as_deref(), p.port), (Some("::1"), Some(5433)));
        let p = parse_pg_url("postgres://%2Fvar%2Frun%2Fpostgresql/db?user=me").unwrap();
        assert_eq!(p.host.as_deref(), Some("/var/run/postgresql"));
        assert_eq!(p.user.as_deref(), Some("me"));
        let p = parse_pg_url("postgres://user@host").unwrap();
        assert_eq!((p.user.as_deref(), p.password), (Some("user"), None));
    }

    #[test]
    fn bad_pg_urls_are_refused_without_echoing_secrets() {
        for (url, expect) in [
            ("mysql://u:s3cret@h/db", "postgres://"),
            ("postgres://u:s3cret@h:notaport/db", "port"),
            ("postgres://u:s3cret@h:0/db", "port"),
            ("postgres://u:s3cret%zz@h/db", "percent-escape"),
            ("postgres://u:s3cret@h1,h2/db", "several hosts"),
            ("postgres://u:s3cret@h/db?sslmode=sometimes", "sslmode"),
            (
                "postgres://u:s3cret@h/db?target_session_attrs=any",
                "target_session_attrs",
            ),
            ("postgres://u:s3cret@[::1/db", "IPv6"),
            ("postgres://u:s3cret@h/db?password", "no '=value'"),
            ("postgres://u:s3cret@h/db?sslcert=%zz", "percent-escape"),
            ("postgres://u:s3cret/db", "port"),
            (
                "postgres://u:s3cret@h/db?connect_timeout=soon",
                "connect_timeout",
            ),
        ] {
            let err = toml_config(&format!("[postgres]\nurl = \"{url}\"\n")).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(
                    err,
                    ConfigError::Url {
                        field: "postgres.url",
                        ..
                    }
                ),
                "{msg}"
            );
            assert!(msg.contains(expect), "{url}: {msg}");
            assert!(!msg.contains("s3cret"), "{url}: {msg}");
            assert!(msg.contains("--pg-url / PG_URL"), "{msg}");
        }
    }

    #[test]
    fn libpq_params() {
        let mut pg = PgConfig {
            password: Some(Secret::new("pw")),
            ..PgConfig::default()
        };
        let params = pg.libpq_params();
        let get = |p: &[(&str, String)], k: &str| {
            p.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone())
        };
        assert_eq!(get(&params, "host").as_deref(), Some("localhost"));
        assert_eq!(get(&params, "port").as_deref(), Some("5432"));
        assert_eq!(get(&params, "password").as_deref(), Some("pw"));
        // Nothing configured: no sslmode, so that libpq's PGSSLMODE applies.
        assert_eq!(get(&params, "sslmode"), None);
        assert_eq!(get(&params, "sslrootcert"), None);
        assert_eq!(get(&params, "connect_timeout").as_deref(), Some("10"));
        assert_eq!(
            get(&params, "application_name").as_deref(),
            Some("pgbridge")
        );
        pg.password = None;
        assert_eq!(get(&pg.libpq_params(), "password"), None);
        pg.sslmode = Some(SslMode::VerifyFull);
        pg.sslrootcert = Some("/etc/ca.pem".into());
        pg.sslcert = Some("/etc/c.pem".into());
        pg.sslkey = Some("/etc/k.pem".into());
        let params = pg.libpq_params();
        assert_eq!(get(&params, "sslmode").as_deref(), Some("verify-full"));
        assert_eq!(get(&params, "sslrootcert").as_deref(), Some("/etc/ca.pem"));
        assert_eq!(get(&params, "sslcert").as_deref(), Some("/etc/c.pem"));
        assert_eq!(get(&params, "sslkey").as_deref(), Some("/etc/k.pem"));
    }

    #[test]
    fn userinfo_ends_at_the_last_at() {
        // PostgreSQL: reserved characters in the password, as they are or percent-encoded.
        for (url, user, password, host, port, db) in [
            (
                "postgres://u:p@ss/w:rd@host/db",
                "u",
                "p@ss/w:rd",
                "host",
                None,
                "db",
            ),
            (
                "postgres://u:pa/ss@h:5433/db",
                "u",
                "pa/ss",
                "h",
                Some(5433),
                "db",
            ),
            ("postgres://u:p%2Fss@h/db", "u", "p/ss", "h", None, "db"),
            ("postgres://u:a?b#c@h/db", "u", "a?b#c", "h", None, "db"),
            ("postgres://u:%40%3A@h/db", "u", "@:", "h", None, "db"),
            (
                "postgresql://u:p:q@[::1]:6000/db",
                "u",
                "p:q",
                "::1",
                Some(6000),
                "db",
            ),
            (
                "postgres://u%3Ax:pw@[2001:db8::7]/d%40b",
                "u:x",
                "pw",
                "2001:db8::7",
                None,
                "d@b",
            ),
        ] {
            let p = parse_pg_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(p.user.as_deref(), Some(user), "{url}");
            assert_eq!(
                p.password.as_ref().map(Secret::expose),
                Some(password),
                "{url}"
            );
            assert_eq!(p.host.as_deref(), Some(host), "{url}");
            assert_eq!(p.port, port, "{url}");
            assert_eq!(p.dbname.as_deref(), Some(db), "{url}");
        }
        let p = parse_pg_url(
            "postgres://u:p/w@h/db?sslmode=verify-full&sslrootcert=/etc/ca%20x.pem\
             &sslcert=c.pem&sslkey=k.pem",
        )
        .unwrap();
        assert_eq!(p.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(p.sslrootcert, Some(PathBuf::from("/etc/ca x.pem")));
        assert_eq!(p.sslcert, Some(PathBuf::from("c.pem")));
        assert_eq!(p.sslkey, Some(PathBuf::from("k.pem")));

        // NATS: the same rule; the client gets the URL without user info.
        for (url, server, creds) in [
            (
                "nats://user:pa/ss@host:4222",
                "nats://host:4222",
                Some(UrlCredentials::UserPassword(
                    "user".into(),
                    Secret::new("pa/ss"),
                )),
            ),
            (
                "nats://user:p%2Fss@host",
                "nats://host",
                Some(UrlCredentials::UserPassword(
                    "user".into(),
                    Secret::new("p/ss"),
                )),
            ),
            (
                "tls://u:a@b?c#d@[::1]:4443",
                "tls://[::1]:4443",
                Some(UrlCredentials::UserPassword(
                    "u".into(),
                    Secret::new("a@b?c#d"),
                )),
            ),
            (
                "s3cr%2Ft@host:4222",
                "nats://host:4222",
                Some(UrlCredentials::Token(Secret::new("s3cr/t"))),
            ),
            ("NATS://host", "nats://host", None),
            ("wss://host:443/ws", "wss://host:443/ws", None),
            ("[fe80::1]", "nats://[fe80::1]", None),
        ] {
            let u = parse_nats_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(u.server, server, "{url}");
            assert_eq!(u.credentials, creds, "{url}");
        }
        assert!(parse_nats_url("localhost").unwrap().is_loopback());
        assert!(parse_nats_url("nats://127.0.0.2:4222")
            .unwrap()
            .is_loopback());
        assert!(parse_nats_url("tls://[::1]").unwrap().is_loopback());
        assert!(!parse_nats_url("nats://10.0.0.1").unwrap().is_loopback());
    }

    #[test]
    fn redaction_hides_all_user_info() {
        for (url, shown) in [
            ("nats://user:pa/ss@host:4222", "nats://***@host:4222"),
            ("nats://u:p@ss/w@host", "nats://***@host"),
            ("tok@host", "***@host"),
            ("nats://host:4222", "nats://host:4222"),
            ("postgres://u:p/w@h/db?x=1", "postgres://***@h/db?x=1"),
        ] {
            assert_eq!(redact_url_userinfo(url), shown, "{url}");
        }
    }

    #[test]
    fn bad_nats_urls_never_echo_secrets() {
        for (url, expect) in [
            ("http://u:s3cret@h:4222", "scheme 'http'"),
            ("nats://u:s3cret", "port"),
            ("u:s3cret", "port"),
            ("nats://u:s3cret@", "no host"),
            ("nats://u:s3cret@h:0", "port"),
            ("nats://u:s3cret@h:99999", "port"),
            ("nats://u:s3cret%zz@h", "percent-escape"),
            ("nats://:s3cret@h", "no user name"),
            ("nats://u:s3cret@[::1", "IPv6"),
            ("u:s3cret://h", "scheme is not"),
            ("nats://u:s3cret@h:1:2", "host"),
        ] {
            let c = Config {
                nats: NatsConfig {
                    urls: vec!["nats://ok:4222".into(), url.into()],
                    ..NatsConfig::default()
                },
                ..Config::default()
            };
            let err = c.validate().unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(
                    err,
                    ConfigError::Url {
                        field: "nats.urls",
                        ..
                    }
                ),
                "{msg}"
            );
            assert!(msg.contains(expect), "{url}: {msg}");
            assert!(msg.contains("server 2 of 2"), "{url}: {msg}");
            assert!(!msg.contains("s3cret"), "{url}: {msg}");
        }
    }

    #[test]
    fn nats_auth_is_one_method() {
        let with = |f: &dyn Fn(&mut NatsConfig)| {
            let mut n = NatsConfig::default();
            f(&mut n);
            n
        };
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let n = with(&|n| n.urls = vec!["nats://u:p/w@h".into(), "nats://u:p%2Fw@h2".into()]);
        assert_eq!(
            n.auth().unwrap(),
            NatsAuth::UserPassword {
                user: "u".into(),
                password: Secret::new("p/w")
            }
        );
        n.validate().unwrap();
        let n = with(&|n| n.nkey_seed = Some(Secret::new(seed.clone())));
        assert_eq!(
            n.auth().unwrap(),
            NatsAuth::NkeySeed(Secret::new(seed.clone()))
        );
        n.validate().unwrap();
        assert_eq!(NatsConfig::default().auth().unwrap(), NatsAuth::None);

        for (n, field, needle) in [
            (
                with(&|n| n.urls = vec!["nats://a:1@h".into(), "nats://b:2@h2".into()]),
                "nats.urls",
                "different credentials",
            ),
            (
                with(&|n| {
                    n.urls = vec!["nats://a:1@h".into()];
                    n.token = Some(Secret::new("t"));
                }),
                "nats.token",
                "only one",
            ),
            (
                with(&|n| {
                    n.nkey_seed = Some(Secret::new(seed.clone()));
                    n.user = Some("u".into());
                    n.password = Some(Secret::new("p"));
                }),
                "nats.nkey_seed",
                "only one",
            ),
            (
                with(&|n| n.nkey_seed = Some(Secret::new("SUbogusseed"))),
                "nats.nkey_seed",
                "not a valid",
            ),
            (
                with(&|n| n.nkey_seed = Some(Secret::new("not-a-seed"))),
                "nats.nkey_seed",
                "start with SU",
            ),
            (
                with(&|n| n.nkey_file = Some("/nonexistent/u.nk".into())),
                "nats.nkey_file",
                "does not exist",
            ),
            (
                with(&|n| n.tls_ca_file = Some("/nonexistent/ca.pem".into())),
                "nats.tls_ca_file",
                "does not exist",
            ),
            (
                with(&|n| n.tls_cert_file = Some("/nonexistent/c.pem".into())),
                "nats.tls_cert_file",
                "does not exist",
            ),
        ] {
            let err = n.validate().unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
                "{field}: {msg}"
            );
            assert!(msg.contains(needle), "{field}: {msg}");
            assert!(!msg.contains(&seed), "{msg}");
        }
        // A certificate needs its key.
        let tmp = temp_file("cert.pem", "x");
        let n = with(&|n| n.tls_cert_file = Some(tmp.path.clone()));
        assert!(n
            .validate()
            .unwrap_err()
            .to_string()
            .contains("nats.tls_key_file"));
        let mut pg = PgConfig {
            sslkey: Some(tmp.path.clone()),
            ..PgConfig::default()
        };
        assert!(pg
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("invalid postgres.sslcert"));
        pg.sslcert = Some(tmp.path.clone());
        pg.sslrootcert = Some("system".into());
        pg.validate().unwrap();
        pg.sslrootcert = Some("/nonexistent/root.crt".into());
        assert!(pg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
    }

    #[test]
    fn tls_required_and_plaintext_warning() {
        let n = |urls: &[&str], f: &dyn Fn(&mut NatsConfig)| {
            let mut n = NatsConfig {
                urls: urls.iter().map(|u| u.to_string()).collect(),
                ..NatsConfig::default()
            };
            f(&mut n);
            n
        };
        assert!(!n(&["nats://h"], &|_| {}).requires_tls());
        assert!(n(&["nats://h", "TLS://h2"], &|_| {}).requires_tls());
        assert!(n(&["h"], &|n| n.tls_required = true).requires_tls());
        assert!(n(&["h"], &|n| n.tls_ca_file = Some("ca".into())).requires_tls());

        let creds = |n: &mut NatsConfig| {
            n.user = Some("u".into());
            n.password = Some(Secret::new("pw-secret"));
        };
        let w = n(&["nats://localhost", "nats://db.example:4222"], &creds)
            .plaintext_credentials_warning()
            .expect("warns");
        assert!(
            w.contains("nats://db.example:4222") && w.contains("(user)"),
            "{w}"
        );
        assert!(!w.contains("localhost") && !w.contains("pw-secret"), "{w}");
        let w = n(&["nats://tok-secret@10.1.2.3"], &|_| {})
            .plaintext_credentials_warning()
            .expect("warns");
        assert!(w.contains("(token)") && !w.contains("tok-secret"), "{w}");
        // No credentials, loopback only, TLS required or wss: no warning.
        assert_eq!(
            n(&["nats://db.example"], &|_| {}).plaintext_credentials_warning(),
            None
        );
        assert_eq!(
            n(&["nats://127.0.0.1", "[::1]:4222"], &creds).plaintext_credentials_warning(),
            None
        );
        assert_eq!(
            n(&["tls://db.example"], &creds).plaintext_credentials_warning(),
            None
        );
        assert_eq!(
            n(&["wss://db.example"], &creds).plaintext_credentials_warning(),
            None
        );
        assert_eq!(
            n(&["nats://db.example"], &|n| {
                creds(n);
                n.tls_required = true;
            })
            .plaintext_credentials_warning(),
            None
        );
    }

    #[test]
    fn validation_names_the_field() {
        let ok = Config::default();
        let check = |f: &dyn Fn(&mut Config)| {
            let mut c = ok.clone();
            f(&mut c);
            c
        };
        let cases: Vec<(Config, &str, &str)> = vec![
            (
                check(&|c| c.replication.slot.clear()),
                "replication.slot",
                "empty",
            ),
            (
                check(&|c| c.replication.slot = "Cdc-Slot".into()),
                "replication.slot",
                "a-z, 0-9 and _",
            ),
            (
                check(&|c| c.replication.slot = "a".repeat(64)),
                "replication.slot",
                "1-63",
            ),
            (
                check(&|c| c.replication.publication.clear()),
                "replication.publication",
                "empty",
            ),
            (
                check(&|c| c.replication.publication = "my pub".into()),
                "replication.publication",
                "' '",
            ),
            (
                check(&|c| c.replication.tables = vec!["a.b.c".into()]),
                "replication.tables",
                "more than one",
            ),
            (
                check(&|c| c.replication.tables = vec!["1abc".into()]),
                "replication.tables",
                "start with",
            ),
            (
                check(&|c| c.replication.tables = vec!["or-ders".into()]),
                "replication.tables",
                "'-'",
            ),
            (
                check(&|c| c.replication.tables = vec!["public.".into()]),
                "replication.tables",
                "empty",
            ),
            (
                check(&|c| c.replication.tables = vec!["a".into(), "a".into()]),
                "replication.tables",
                "twice",
            ),
            (
                check(&|c| c.replication.ring_capacity = 1000),
                "replication.ring_capacity",
                "power of two",
            ),
            (
                check(&|c| c.replication.ring_capacity = 8),
                "replication.ring_capacity",
                "power of two",
            ),
            (
                check(&|c| c.replication.max_in_flight = 0),
                "replication.max_in_flight",
                "between",
            ),
            (
                check(&|c| c.replication.reconnect_backoff_secs = 0),
                "replication.reconnect_backoff_secs",
                "at least",
            ),
            (
                check(&|c| c.replication.standby_status_interval_secs = 0),
                "replication.standby_status_interval_secs",
                "at least",
            ),
            (
                check(&|c| c.replication.state_file = Some(PathBuf::new())),
                "replication.state_file",
                "empty",
            ),
            (
                check(&|c| c.replication.id_namespace = Some(String::new())),
                "replication.id_namespace",
                "1-64 characters",
            ),
            (
                check(&|c| c.replication.id_namespace = Some("a:b".into())),
                "replication.id_namespace",
                "A-Z, a-z, 0-9, _ and -",
            ),
            (
                check(&|c| c.replication.id_namespace = Some("x".repeat(65))),
                "replication.id_namespace",
                "1-64 characters",
            ),
            (check(&|c| c.postgres.port = 0), "postgres.port", "not 0"),
            (
                check(&|c| c.postgres.host.clear()),
                "postgres.host",
                "empty",
            ),
            (
                check(&|c| c.postgres.connect_timeout_secs = 0),
                "postgres.connect_timeout_secs",
                "at least",
            ),
            (check(&|c| c.http.port = 0), "http.port", "not 0"),
            (
                check(&|c| c.http.admin_token = Some(Secret::new(""))),
                "http.admin_token",
                "empty",
            ),
            (
                check(&|c| c.http.admin_token = Some(Secret::new("a b"))),
                "http.admin_token",
                "whitespace",
            ),
            (
                check(&|c| c.snapshot.chunk_rows = 0),
                "snapshot.chunk_rows",
                "between 1",
            ),
            (
                check(&|c| c.monitor.lag_warn_bytes = c.monitor.lag_critical_bytes),
                "monitor.lag_warn_bytes",
                "below",
            ),
            (
                check(&|c| c.monitor.interval_secs = 0),
                "monitor.interval_secs",
                "at least",
            ),
            (
                check(&|c| c.streams.cdc = "C D C".into()),
                "streams.cdc",
                "whitespace",
            ),
            (
                check(&|c| c.streams.cdc = "cdc.stream".into()),
                "streams.cdc",
                "'.'",
            ),
            (
                check(&|c| c.streams.init = "INIT>".into()),
                "streams.init",
                "'>'",
            ),
            (
                check(&|c| c.streams.init = "I*".into()),
                "streams.init",
                "'*'",
            ),
            (
                check(&|c| c.streams.init = "CDC".into()),
                "streams.init",
                "differ",
            ),
            (
                check(&|c| c.streams.cdc_duplicate_window_secs = 0),
                "streams.cdc_duplicate_window_secs",
                "at least",
            ),
            (
                check(&|c| c.streams.cdc_max_age_secs = 60),
                "streams.cdc_duplicate_window_secs",
                "longer than",
            ),
            (
                check(&|c| c.streams.replicas = 0),
                "streams.replicas",
                "not between 1 and 5",
            ),
            (
                check(&|c| c.streams.replicas = 6),
                "streams.replicas",
                "not between 1 and 5",
            ),
            (
                check(&|c| c.nats.urls.clear()),
                "nats.urls",
                "no NATS server",
            ),
            (
                check(&|c| c.nats.urls = vec!["http://x:4222".into()]),
                "nats.urls",
                "scheme",
            ),
            (
                check(&|c| c.nats.urls = vec!["nats://:4222".into()]),
                "nats.urls",
                "no host",
            ),
            (
                check(&|c| c.nats.urls = vec!["nats://h:99999".into()]),
                "nats.urls",
                "port",
            ),
            (
                check(&|c| c.nats.user = Some("u".into())),
                "nats.password",
                "no password",
            ),
            (
                check(&|c| c.nats.password = Some(Secret::new("p"))),
                "nats.user",
                "no user",
            ),
            (
                check(&|c| {
                    c.nats.token = Some(Secret::new("t"));
                    c.nats.creds_file = Some("x.creds".into());
                }),
                "nats.token",
                "only one",
            ),
        ];
        for (config, field, needle) in cases {
            assert_eq!(invalid_field(&config), field, "{needle}");
            let msg = config.validate().unwrap_err().to_string();
            assert!(msg.contains(needle), "{field}: {msg}");
            assert!(msg.starts_with(&format!("invalid {field} (--")), "{msg}");
        }

        // Accepted edge cases.
        let edge = check(&|c| {
            c.replication.slot = "a".repeat(63);
            c.replication.tables = vec!["public.users".into(), "_t$1".into(), "ünïcode".into()];
            c.replication.ring_capacity = MIN_RING_CAPACITY;
            c.replication.id_namespace = Some(format!("Az09_-{}", "x".repeat(58)));
            c.streams.cdc_max_age_secs = 0;
            c.nats.urls = vec!["localhost".into(), "tls://[::1]:4222".into()];
            c.nats.user = Some("u".into());
            c.nats.password = Some(Secret::new("p"));
        });
        edge.validate().unwrap();
    }

    #[test]
    fn secrets_never_print() {
        let c = toml_config(
            r#"
            [postgres]
            url = "postgres://u:pg-url-secret@h/db"
            password = "pg-secret"
            [nats]
            urls = ["nats://nu:nats-url-secret@n1:4222"]
            user = "nu"
            password = "nats-secret"
            [http]
            admin_token = "admin-secret"
            "#,
        )
        .unwrap();
        assert_eq!(c.postgres.password.as_ref().unwrap().expose(), "pg-secret");
        let shown = [
            format!("{c:?}"),
            format!("{c:#?}"),
            c.summary(),
            c.to_redacted_toml(),
        ];
        for text in shown {
            for secret in [
                "pg-secret",
                "pg-url-secret",
                "nats-secret",
                "nats-url-secret",
                "admin-secret",
            ] {
                assert!(!text.contains(secret), "{secret} leaked in {text}");
            }
            assert!(text.contains(REDACTED), "{text}");
        }
        assert!(c.summary().contains("admin_token=***"));
        assert!(c.to_redacted_toml().contains("nats://***@n1:4222"));
        assert_eq!(format!("{}", Secret::new("x")), REDACTED);
        assert_eq!(format!("{:?}", Some(Secret::new("x"))), "Some(***)");
        let raw: RawConfig = toml::from_str("[postgres]\nurl = \"postgres://u:zz@h\"\n").unwrap();
        assert!(!format!("{raw:?}").contains("zz"));
        // An unquoted numeric secret is refused without quoting it back.
        for key in [
            "[postgres]\npassword",
            "[nats]\npassword",
            "[http]\nadmin_token",
        ] {
            let msg = toml_config(&format!("{key} = 987654321\n"))
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("quoted string") && msg.contains("line 2"),
                "{msg}"
            );
            assert!(!msg.contains("987654321"), "{msg}");
        }
    }

    #[test]
    fn redacted_toml_reads_back() {
        let mut c = Config::default();
        c.replication.tables = vec!["users".into()];
        c.http.admin_token = Some(Secret::new("tok"));
        let text = c.to_redacted_toml();
        let back = toml_config(&text).unwrap();
        assert_eq!(
            back.replication,
            ReplicationConfig {
                state_file: Some("pgbridge-cdc_slot.lsn".into()),
                spool_dir: Some("pgbridge-spool-cdc_slot".into()),
                ..c.replication.clone()
            }
        );
        assert_eq!(back.http.admin_token, Some(Secret::new(REDACTED)));
        assert_eq!(back.postgres, c.postgres);
    }

    #[test]
    fn summary_line() {
        let s = Config::default().summary();
        assert!(!s.contains('\n'));
        for part in [
            "postgres=postgres@localhost:5432/postgres",
            "pg_password=none",
            "slot=cdc_slot",
            "publication=cdc_pub",
            "tables=all",
            "format=msgpack",
            "streams=CDC,INIT",
            "http=127.0.0.1:9090",
        ] {
            assert!(s.contains(part), "{part} missing in {s}");
        }
    }

    #[test]
    fn field_sources_match_the_cli() {
        let cmd = Cli::command();
        let args: Vec<_> = cmd.get_arguments().collect();
        for (key, flag, env) in FIELD_SOURCES {
            let arg = args
                .iter()
                .find(|a| a.get_long().map(|l| format!("--{l}")).as_deref() == Some(*flag))
                .unwrap_or_else(|| panic!("{key}: no flag {flag}"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(*env),
                "{key}: {flag}"
            );
        }
        // Every flag but --config and the NATS_HOST spelling configures a listed field.
        for arg in args {
            let Some(long) = arg.get_long() else { continue };
            if ["config", "nats-host", "help", "version"].contains(&long) {
                continue;
            }
            let flag = format!("--{long}");
            assert!(
                FIELD_SOURCES.iter().any(|(_, f, _)| *f == flag),
                "{flag} is missing from FIELD_SOURCES"
            );
        }
    }
}
