//! The bridge configuration: built-in defaults, the TOML file, the environment and the command line.
//!
//! # Precedence
//!
//! Highest first: command-line flags, environment variables, the TOML file (`--config` /
//! `BRIDGE_CONFIG`), the built-in defaults (the `DEFAULT_*` constants beside each section).
//! The file, the environment and the flags each give an [`Overlay`], a partial configuration;
//! [`Config::load`] lays them over the defaults in that order, field by field, only where a
//! value was given. The command line (`crate::cli`) builds the environment's and the flags'
//! overlays; this module knows nothing of it.
//!
//! # PostgreSQL URL
//!
//! `postgres.url` (`--pg-url`, `PG_URL`) accepts
//! `postgres[ql]://[user[:password]@][host][:port][,host[:port]...][/dbname][?param=value&...]`,
//! with `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `connect_timeout`,
//! `target_session_attrs`, `host`, `port`, `user`, `password` and `dbname` as query parameters
//! (a query parameter wins over the same part earlier in the URL, as in libpq). Several hosts
//! become comma lists of hosts and ports, as libpq takes them, and `read-write` target session
//! attributes unless others are given. User, password, host, database name and query values are percent-decoded.
//!
//! The user info ends at the *last* `@` of the URL: a password may hold `/`, `?`, `#`, `:` or
//! `@` as they are or percent-encoded, but an `@` after the host (in the database name or a
//! query value) must be written `%40`. NATS URLs follow the same rule.
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

use std::fmt;

use serde::Serialize;

mod error;
pub(crate) mod kafka;
mod load;
mod names;
pub(crate) mod nats;
pub(crate) mod outbox;
mod overlay;
pub(crate) mod pg;
pub(crate) mod replication;
mod secret;
pub(crate) mod sections;
mod url;
mod validate;

#[cfg(test)]
mod tests;

pub use error::ConfigError;
pub use kafka::{KafkaConfig, KafkaProperties, SinkKind};
pub use load::Layers;
pub(crate) use nats::check_nkey_seed;
pub(crate) use nats::NatsAuth;
pub use nats::NatsConfig;
pub use outbox::{OnOversize, OutboxConfig};
pub use overlay::{
    HttpOverlay, KafkaOverlay, MonitorOverlay, NatsOverlay, OutboxOverlay, Overlay, PgOverlay,
    ReplicationOverlay, SnapshotOverlay, StreamsOverlay,
};
pub use pg::{PgConfig, PgPorts, SslMode, TargetSessionAttrs};
pub use replication::{Format, ReplicationConfig};
pub use secret::Secret;
pub(crate) use secret::REDACTED;
pub use sections::{HttpConfig, MonitorConfig, SnapshotConfig, StreamsConfig};

#[cfg(test)]
pub(crate) use overlay::field_sources;

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
    /// Outbox tables and dead letters (`[outbox]`).
    pub outbox: OutboxConfig,
    /// The Kafka sink (`[kafka]`), used with `replication.sink = "kafka"`.
    pub kafka: KafkaConfig,
}

impl Config {
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
        let nats_sink = self.replication.sink == SinkKind::Nats;
        // With Kafka, the NATS settings (URLs, streams, TLS) are not used and are left out,
        // so the line does not suggest a NATS connection; `sink=` says which it is.
        write!(
            f,
            "postgres={}@{}/{} target_session_attrs={} pg_password={} sslmode={}",
            pg.user,
            pg.addresses(),
            pg.dbname,
            pg.target_session_attrs
                .map_or("libpq-default", TargetSessionAttrs::as_str),
            set(&pg.password),
            sslmode,
        )?;
        if nats_sink {
            write!(
                f,
                " nats={} nats_auth={}",
                self.nats.redacted_urls().join(","),
                nats_auth
            )?;
        }
        write!(
            f,
            " slot={} publication={} tables={} format={}",
            self.replication.slot, self.replication.publication, tables, self.replication.format,
        )?;
        if nats_sink {
            write!(f, " streams={},{}", self.streams.cdc, self.streams.init)?;
        }
        write!(
            f,
            " http={} admin_token={} state_file={} ring_capacity={} max_in_flight={} \
             snapshot_chunk_rows={} snapshot_on_start={}",
            self.http.socket_addr(),
            set(&self.http.admin_token),
            self.replication.state_file_path().display(),
            self.replication.ring_capacity,
            self.replication.max_in_flight,
            self.snapshot.chunk_rows,
            self.snapshot.on_start,
        )?;
        // Snapshot replies are NATS inboxes; with Kafka, requests come over HTTP.
        if nats_sink {
            write!(f, " snapshot_reply_prefix={}", self.snapshot.reply_prefix)?;
        }
        write!(
            f,
            " snapshot_max_concurrent={} snapshot_cooldown_secs={}",
            self.snapshot.max_concurrent, self.snapshot.cooldown_secs,
        )?;
        if nats_sink {
            let tls = if self.nats.requires_tls() {
                "required"
            } else {
                "if-offered"
            };
            write!(
                f,
                " nats_tls={tls} batch_publish={}",
                self.replication.batch_publish
            )?;
        }
        write!(
            f,
            " failover_slot={} outbox_tables={} on_oversize={} sink={}",
            self.replication.failover_slot,
            if self.outbox.tables.is_empty() {
                "none".to_owned()
            } else {
                self.outbox.tables.join(",")
            },
            self.outbox.on_oversize,
            self.replication.sink,
        )?;
        if self.replication.sink == SinkKind::Kafka {
            write!(
                f,
                " kafka_brokers={} topic_prefix={} kafka_tombstones={} kafka_exactly_once={} kafka_topic_config={:?} kafka_properties={:?}",
                self.kafka.brokers.join(","),
                self.kafka.topic_prefix,
                self.kafka.tombstones,
                self.kafka.exactly_once,
                self.kafka.topic_config,
                self.kafka.properties,
            )?;
        }
        Ok(())
    }
}
