//! The overlay: a partial configuration, every field optional. The file, the environment and the
//! command line each produce one; [`Config::load`](super::Config::load) lays them over the
//! defaults in that order, field by field, only where a value was given.
//!
//! Each field's flag and environment variable stand in [`super::sources`], which the error
//! messages read too; a test checks that every field here has its line there.

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

/// Declares the overlay of one section: one `Option` per field, in the section's order (serde
/// lists them in that order in an "unknown field" error), `merge`, and with `=> Target`,
/// `apply_to`.
macro_rules! overlay {
    (
        $(#[$attr:meta])*
        $name:ident, $section:literal => $target:ty {
            $($field:ident: $ty:ty;)*
        }
    ) => {
        overlay! {
            $(#[$attr])*
            $name, $section {
                $($field: $ty;)*
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
            $($field:ident: $ty:ty;)*
        }
    ) => {
        $(#[$attr])*
        #[derive(Clone, Default, PartialEq, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $(
                #[doc = concat!("`", $section, ".", stringify!($field), "`.")]
                pub $field: Option<$ty>,
            )*
        }

        impl $name {
            /// Each field's TOML key.
            #[cfg(test)]
            const KEYS: &'static [&'static str] = &[
                $(concat!($section, ".", stringify!($field)),)*
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
        url: Secret;
        host: String;
        port: PgPorts;
        user: String;
        password: Secret;
        dbname: String;
        sslmode: SslMode;
        sslrootcert: PathBuf;
        sslcert: PathBuf;
        sslkey: PathBuf;
        connect_timeout_secs: u64;
        target_session_attrs: TargetSessionAttrs;
    }
}

overlay! {
    /// `[nats]`.
    NatsOverlay, "nats" => NatsConfig {
        urls: Vec<String>;
        user: String;
        password: Secret;
        token: Secret;
        creds_file: PathBuf;
        nkey_seed: Secret;
        nkey_file: PathBuf;
        tls_required: bool;
        tls_ca_file: PathBuf;
        tls_cert_file: PathBuf;
        tls_key_file: PathBuf;
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
            .finish()
    }
}

overlay! {
    /// `[replication]`.
    #[derive(Debug)]
    ReplicationOverlay, "replication" => ReplicationConfig {
        slot: String;
        publication: String;
        tables: Vec<String>;
        format: Format;
        envelope: super::replication::Envelope;
        debezium_schemas: bool;
        ring_capacity: usize;
        max_in_flight: usize;
        ring_max_bytes: u64;
        max_in_flight_bytes: u64;
        reconnect_backoff_secs: u64;
        standby_status_interval_secs: u64;
        batch_wait_ms: u64;
        state_file: PathBuf;
        spool_dir: PathBuf;
        wal_receive_timeout_secs: u64;
        accept_position_gap: bool;
        failover_slot: bool;
        id_namespace: String;
        sink: SinkKind;
    }
}

overlay! {
    /// `[http]`.
    #[derive(Debug)]
    HttpOverlay, "http" => HttpConfig {
        bind: IpAddr;
        port: u16;
        admin_token: Secret;
    }
}

overlay! {
    /// `[monitor]`.
    #[derive(Debug)]
    MonitorOverlay, "monitor" => MonitorConfig {
        interval_secs: u64;
        lag_warn_bytes: u64;
        lag_critical_bytes: u64;
        metrics_log_interval_secs: u64;
    }
}

overlay! {
    /// `[snapshot]`.
    #[derive(Debug)]
    SnapshotOverlay, "snapshot" => SnapshotConfig {
        chunk_rows: usize;
        on_start: bool;
        reply_prefix: String;
        max_concurrent: usize;
        cooldown_secs: u64;
    }
}

overlay! {
    /// `[streams]`.
    #[derive(Debug)]
    StreamsOverlay, "streams" => StreamsConfig {
        cdc: String;
        init: String;
        cdc_max_age_secs: u64;
        cdc_duplicate_window_secs: u64;
        init_max_age_secs: u64;
        replicas: usize;
    }
}

overlay! {
    /// `[outbox]`.
    #[derive(Debug)]
    OutboxOverlay, "outbox" => OutboxConfig {
        tables: Vec<String>;
        id_column: String;
        aggregate_type_column: String;
        aggregate_id_column: String;
        event_type_column: String;
        payload_column: String;
        on_oversize: OnOversize;
    }
}

overlay! {
    /// `[kafka]`.
    #[derive(Debug)]
    KafkaOverlay, "kafka" => KafkaConfig {
        brokers: Vec<String>;
        topic_prefix: String;
        tombstones: bool;
        partitions: u32;
        replication_factor: u16;
        topic_config: KafkaProperties;
        exactly_once: bool;
        properties: KafkaProperties;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sources::field_sources;

    #[test]
    fn every_field_has_its_sources() {
        let keys = [
            PgOverlay::KEYS,
            NatsOverlay::KEYS,
            ReplicationOverlay::KEYS,
            HttpOverlay::KEYS,
            MonitorOverlay::KEYS,
            SnapshotOverlay::KEYS,
            StreamsOverlay::KEYS,
            OutboxOverlay::KEYS,
            KafkaOverlay::KEYS,
        ]
        .concat();
        let sourced: Vec<&str> = field_sources().map(|(key, _, _)| *key).collect();
        assert_eq!(keys, sourced);
    }
}
