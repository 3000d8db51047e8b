//! The overlay: a partial configuration, every field optional. The file, the environment and the
//! command line each produce one; [`Config::load`](super::Config::load) lays them over the
//! defaults in that order, field by field, only where a value was given.
//!
//! Each field is declared once here, with its TOML key, flag and environment variable: the
//! error messages name the flag and variable from this table, and a test checks it against the
//! command line.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::kafka::SinkKind;
use super::url::redact_url_userinfo;
use super::{
    Format, HttpConfig, KafkaConfig, KafkaProperties, MonitorConfig, NatsConfig, OnOversize,
    OutboxConfig, PgPorts, ReplicationConfig, Secret, SnapshotConfig, SslMode, StreamsConfig,
    TargetSessionAttrs,
};

/// Sets a configuration field from an overlay value: a plain field takes the value, an optional
/// one takes `Some(value)`.
trait Assign<T> {
    fn assign(&mut self, value: T);
}

impl<T> Assign<T> for T {
    fn assign(&mut self, value: T) {
        *self = value;
    }
}

impl<T> Assign<T> for Option<T> {
    fn assign(&mut self, value: T) {
        *self = Some(value);
    }
}

/// Where a field can be set: TOML key, flag, environment variable.
type FieldSource = (&'static str, &'static str, &'static str);

/// Declares the overlay of one section: one `Option` per field, in the section's order (serde
/// lists them in that order in an "unknown field" error), the flag and environment variable of
/// each, `merge`, and with `=> Target`, `apply_to`.
macro_rules! overlay {
    (
        $(#[$attr:meta])*
        $name:ident, $section:literal => $target:ty {
            $($field:ident: $ty:ty = $flag:literal, $env:literal;)*
        }
    ) => {
        overlay! {
            $(#[$attr])*
            $name, $section {
                $($field: $ty = $flag, $env;)*
            }
        }

        impl $name {
            /// Sets the fields this overlay gives.
            fn apply_to(self, target: &mut $target) {
                $(if let Some(value) = self.$field {
                    Assign::assign(&mut target.$field, value);
                })*
            }
        }
    };
    (
        $(#[$attr:meta])*
        $name:ident, $section:literal {
            $($field:ident: $ty:ty = $flag:literal, $env:literal;)*
        }
    ) => {
        $(#[$attr])*
        #[derive(Clone, Default, PartialEq, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $(
                #[doc = concat!("`", $section, ".", stringify!($field), "` (", $flag, ", ", $env, ").")]
                pub $field: Option<$ty>,
            )*
        }

        impl $name {
            /// Where each field can be set.
            const SOURCES: &'static [FieldSource] = &[
                $((concat!($section, ".", stringify!($field)), $flag, $env),)*
            ];

            /// Takes every value `later` gives.
            fn merge(&mut self, later: Self) {
                $(if later.$field.is_some() {
                    self.$field = later.$field;
                })*
            }
        }
    };
}

overlay! {
    /// `[postgres]`: every part optional until the URL is expanded, because a part given on its
    /// own wins over the URL's, whichever source each comes from.
    #[derive(Debug)]
    PgOverlay, "postgres" {
        url: Secret = "--pg-url", "PG_URL";
        host: String = "--pg-host", "PG_HOST";
        port: PgPorts = "--pg-port", "PG_PORT";
        user: String = "--pg-user", "PG_USER";
        password: Secret = "--pg-password", "PG_PASSWORD";
        dbname: String = "--pg-db", "PG_DB";
        sslmode: SslMode = "--pg-sslmode", "PG_SSLMODE";
        sslrootcert: PathBuf = "--pg-sslrootcert", "PG_SSLROOTCERT";
        sslcert: PathBuf = "--pg-sslcert", "PG_SSLCERT";
        sslkey: PathBuf = "--pg-sslkey", "PG_SSLKEY";
        connect_timeout_secs: u64 = "--pg-connect-timeout-secs", "PG_CONNECT_TIMEOUT_SECS";
        target_session_attrs: TargetSessionAttrs =
            "--pg-target-session-attrs", "PG_TARGET_SESSION_ATTRS";
    }
}

overlay! {
    /// `[nats]`.
    NatsOverlay, "nats" => NatsConfig {
        urls: Vec<String> = "--nats-url", "NATS_URL";
        user: String = "--nats-user", "NATS_BRIDGE_USER";
        password: Secret = "--nats-password", "NATS_BRIDGE_PASSWORD";
        token: Secret = "--nats-token", "NATS_BRIDGE_TOKEN";
        creds_file: PathBuf = "--nats-creds", "NATS_BRIDGE_CREDS";
        nkey_seed: Secret = "--nats-nkey-seed", "NATS_NKEY_SEED";
        nkey_file: PathBuf = "--nats-nkey-file", "NATS_NKEY_FILE";
        tls_required: bool = "--nats-tls-required", "NATS_TLS_REQUIRED";
        tls_ca_file: PathBuf = "--nats-tls-ca-file", "NATS_TLS_CA_FILE";
        tls_cert_file: PathBuf = "--nats-tls-cert-file", "NATS_TLS_CERT_FILE";
        tls_key_file: PathBuf = "--nats-tls-key-file", "NATS_TLS_KEY_FILE";
        inbox_prefix: String = "--nats-inbox-prefix", "NATS_INBOX_PREFIX";
    }
}

/// Credentials in the server URLs stay hidden, as in [`NatsConfig`]'s `Debug`.
impl fmt::Debug for NatsOverlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Option<Vec<String>> = self
            .urls
            .as_ref()
            .map(|urls| urls.iter().map(|u| redact_url_userinfo(u)).collect());
        f.debug_struct("NatsOverlay")
            .field("urls", &urls)
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
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

overlay! {
    /// `[replication]`.
    #[derive(Debug)]
    ReplicationOverlay, "replication" => ReplicationConfig {
        slot: String = "--slot", "BRIDGE_SLOT";
        publication: String = "--publication", "BRIDGE_PUBLICATION";
        tables: Vec<String> = "--table", "BRIDGE_TABLES";
        format: Format = "--format", "BRIDGE_FORMAT";
        envelope: super::replication::Envelope = "--envelope", "BRIDGE_ENVELOPE";
        debezium_schemas: bool = "--debezium-schemas", "BRIDGE_DEBEZIUM_SCHEMAS";
        ring_capacity: usize = "--ring-capacity", "BRIDGE_RING_CAPACITY";
        max_in_flight: usize = "--max-in-flight", "BRIDGE_MAX_IN_FLIGHT";
        ring_max_bytes: u64 = "--ring-max-bytes", "BRIDGE_RING_MAX_BYTES";
        max_in_flight_bytes: u64 = "--max-in-flight-bytes", "BRIDGE_MAX_IN_FLIGHT_BYTES";
        reconnect_backoff_secs: u64 = "--reconnect-backoff-secs", "BRIDGE_RECONNECT_BACKOFF_SECS";
        standby_status_interval_secs: u64 =
            "--standby-status-interval-secs", "BRIDGE_STANDBY_STATUS_INTERVAL_SECS";
        batch_wait_ms: u64 = "--batch-wait-ms", "BRIDGE_BATCH_WAIT_MS";
        state_file: PathBuf = "--state-file", "BRIDGE_STATE_FILE";
        spool_dir: PathBuf = "--spool-dir", "BRIDGE_SPOOL_DIR";
        wal_receive_timeout_secs: u64 =
            "--wal-receive-timeout-secs", "BRIDGE_WAL_RECEIVE_TIMEOUT_SECS";
        accept_position_gap: bool = "--accept-position-gap", "BRIDGE_ACCEPT_POSITION_GAP";
        failover_slot: bool = "--failover-slot", "BRIDGE_FAILOVER_SLOT";
        batch_publish: bool = "--batch-publish", "BRIDGE_BATCH_PUBLISH";
        id_namespace: String = "--id-namespace", "BRIDGE_ID_NAMESPACE";
        sink: SinkKind = "--sink", "BRIDGE_SINK";
    }
}

overlay! {
    /// `[http]`.
    #[derive(Debug)]
    HttpOverlay, "http" => HttpConfig {
        bind: IpAddr = "--http-bind", "BRIDGE_HTTP_BIND";
        port: u16 = "--port", "BRIDGE_PORT";
        admin_token: Secret = "--admin-token", "BRIDGE_ADMIN_TOKEN";
    }
}

overlay! {
    /// `[monitor]`.
    #[derive(Debug)]
    MonitorOverlay, "monitor" => MonitorConfig {
        interval_secs: u64 = "--monitor-interval-secs", "BRIDGE_MONITOR_INTERVAL_SECS";
        lag_warn_bytes: u64 = "--lag-warn-bytes", "BRIDGE_LAG_WARN_BYTES";
        lag_critical_bytes: u64 = "--lag-critical-bytes", "BRIDGE_LAG_CRITICAL_BYTES";
        metrics_log_interval_secs: u64 =
            "--metrics-log-interval-secs", "BRIDGE_METRICS_LOG_INTERVAL_SECS";
    }
}

overlay! {
    /// `[snapshot]`.
    #[derive(Debug)]
    SnapshotOverlay, "snapshot" => SnapshotConfig {
        chunk_rows: usize = "--snapshot-chunk-rows", "BRIDGE_SNAPSHOT_CHUNK_ROWS";
        on_start: bool = "--snapshot-on-start", "BRIDGE_SNAPSHOT_ON_START";
        reply_prefix: String = "--snapshot-reply-prefix", "BRIDGE_SNAPSHOT_REPLY_PREFIX";
        max_concurrent: usize = "--snapshot-max-concurrent", "BRIDGE_SNAPSHOT_MAX_CONCURRENT";
        cooldown_secs: u64 = "--snapshot-cooldown-secs", "BRIDGE_SNAPSHOT_COOLDOWN_SECS";
    }
}

overlay! {
    /// `[streams]`.
    #[derive(Debug)]
    StreamsOverlay, "streams" => StreamsConfig {
        cdc: String = "--stream", "BRIDGE_STREAMS";
        init: String = "--stream", "BRIDGE_STREAMS";
        cdc_max_age_secs: u64 = "--cdc-max-age-secs", "BRIDGE_CDC_MAX_AGE_SECS";
        cdc_duplicate_window_secs: u64 =
            "--cdc-duplicate-window-secs", "BRIDGE_CDC_DUPLICATE_WINDOW_SECS";
        init_max_age_secs: u64 = "--init-max-age-secs", "BRIDGE_INIT_MAX_AGE_SECS";
        replicas: usize = "--stream-replicas", "BRIDGE_STREAM_REPLICAS";
    }
}

overlay! {
    /// `[outbox]`.
    #[derive(Debug)]
    OutboxOverlay, "outbox" => OutboxConfig {
        tables: Vec<String> = "--outbox-table", "BRIDGE_OUTBOX_TABLES";
        id_column: String = "--outbox-id-column", "BRIDGE_OUTBOX_ID_COLUMN";
        aggregate_type_column: String =
            "--outbox-aggregate-type-column", "BRIDGE_OUTBOX_AGGREGATE_TYPE_COLUMN";
        aggregate_id_column: String =
            "--outbox-aggregate-id-column", "BRIDGE_OUTBOX_AGGREGATE_ID_COLUMN";
        event_type_column: String =
            "--outbox-event-type-column", "BRIDGE_OUTBOX_EVENT_TYPE_COLUMN";
        payload_column: String = "--outbox-payload-column", "BRIDGE_OUTBOX_PAYLOAD_COLUMN";
        on_oversize: OnOversize = "--on-oversize", "BRIDGE_ON_OVERSIZE";
    }
}

overlay! {
    /// `[kafka]`.
    #[derive(Debug)]
    KafkaOverlay, "kafka" => KafkaConfig {
        brokers: Vec<String> = "--kafka-brokers", "KAFKA_BROKERS";
        topic_prefix: String = "--topic-prefix", "BRIDGE_TOPIC_PREFIX";
        tombstones: bool = "--kafka-tombstones", "BRIDGE_KAFKA_TOMBSTONES";
        partitions: u32 = "--kafka-partitions", "BRIDGE_KAFKA_PARTITIONS";
        replication_factor: u16 = "--kafka-replication-factor", "BRIDGE_KAFKA_REPLICATION_FACTOR";
        topic_config: KafkaProperties = "--kafka-topic-config", "BRIDGE_KAFKA_TOPIC_CONFIG";
        exactly_once: bool = "--kafka-exactly-once", "KAFKA_EXACTLY_ONCE";
        properties: KafkaProperties = "--kafka-property", "KAFKA_PROPERTIES";
    }
}

/// What one source says: the configuration file, the environment or the command line. The
/// file is parsed straight into it (an unknown key is an error); `bridge`'s command line builds
/// one for its environment variables and one for its flags.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Overlay {
    /// `[postgres]`.
    pub postgres: PgOverlay,
    /// `[nats]`.
    pub nats: NatsOverlay,
    /// `[replication]`.
    pub replication: ReplicationOverlay,
    /// `[http]`.
    pub http: HttpOverlay,
    /// `[monitor]`.
    pub monitor: MonitorOverlay,
    /// `[snapshot]`.
    pub snapshot: SnapshotOverlay,
    /// `[streams]`.
    pub streams: StreamsOverlay,
    /// `[outbox]`.
    pub outbox: OutboxOverlay,
    /// `[kafka]`.
    pub kafka: KafkaOverlay,
}

impl Overlay {
    /// Lays `later` over this overlay: every value it gives wins.
    pub(super) fn merge(&mut self, later: Overlay) {
        self.postgres.merge(later.postgres);
        self.nats.merge(later.nats);
        self.replication.merge(later.replication);
        self.http.merge(later.http);
        self.monitor.merge(later.monitor);
        self.snapshot.merge(later.snapshot);
        self.streams.merge(later.streams);
        self.outbox.merge(later.outbox);
        let mut kafka = later.kafka;
        // Both maps add up key by key across sources.
        if let (Some(earlier), Some(later)) = (&self.kafka.properties, &mut kafka.properties) {
            earlier.fill_from(later);
        }
        if let (Some(earlier), Some(later)) = (&self.kafka.topic_config, &mut kafka.topic_config) {
            earlier.fill_from(later);
        }
        self.kafka.merge(kafka);
    }

    /// Sets, in `config`, every field this overlay gives, except `[postgres]`, which needs the
    /// URL expanded first (see `PgOverlay::resolve`).
    pub(super) fn apply_to(self, config: &mut super::Config) {
        self.nats.apply_to(&mut config.nats);
        self.replication.apply_to(&mut config.replication);
        self.http.apply_to(&mut config.http);
        self.monitor.apply_to(&mut config.monitor);
        self.snapshot.apply_to(&mut config.snapshot);
        self.streams.apply_to(&mut config.streams);
        self.outbox.apply_to(&mut config.outbox);
        self.kafka.apply_to(&mut config.kafka);
    }
}

/// Every field's TOML key, flag and environment variable.
pub(crate) fn field_sources() -> impl Iterator<Item = &'static FieldSource> {
    PgOverlay::SOURCES
        .iter()
        .chain(NatsOverlay::SOURCES)
        .chain(ReplicationOverlay::SOURCES)
        .chain(HttpOverlay::SOURCES)
        .chain(MonitorOverlay::SOURCES)
        .chain(SnapshotOverlay::SOURCES)
        .chain(StreamsOverlay::SOURCES)
        .chain(OutboxOverlay::SOURCES)
        .chain(KafkaOverlay::SOURCES)
}
