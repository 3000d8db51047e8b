//! Where each setting can be given: its TOML key, command-line flag and environment variable.
//! The error messages name the flag and variable from this table; tests check it against the
//! overlays' fields and the command line.

/// Where a field can be set: TOML key, flag, environment variable.
type FieldSource = (&'static str, &'static str, &'static str);

/// Builds the table from `section { field = flag, env; ... } ...`.
macro_rules! sources {
    ($($section:ident { $($field:ident = $flag:literal, $env:literal;)* })*) => {
        &[$($(
            (concat!(stringify!($section), ".", stringify!($field)), $flag, $env),
        )*)*]
    };
}

/// Every field's sources, the sections in the configuration's order.
const SOURCES: &[FieldSource] = sources! {
    postgres {
        url = "--pg-url", "PG_URL";
        host = "--pg-host", "PG_HOST";
        port = "--pg-port", "PG_PORT";
        user = "--pg-user", "PG_USER";
        password = "--pg-password", "PG_PASSWORD";
        dbname = "--pg-db", "PG_DB";
        sslmode = "--pg-sslmode", "PG_SSLMODE";
        sslrootcert = "--pg-sslrootcert", "PG_SSLROOTCERT";
        sslcert = "--pg-sslcert", "PG_SSLCERT";
        sslkey = "--pg-sslkey", "PG_SSLKEY";
        connect_timeout_secs = "--pg-connect-timeout-secs", "PG_CONNECT_TIMEOUT_SECS";
        target_session_attrs = "--pg-target-session-attrs", "PG_TARGET_SESSION_ATTRS";
    }
    nats {
        urls = "--nats-url", "NATS_URL";
        user = "--nats-user", "NATS_BRIDGE_USER";
        password = "--nats-password", "NATS_BRIDGE_PASSWORD";
        token = "--nats-token", "NATS_BRIDGE_TOKEN";
        creds_file = "--nats-creds", "NATS_BRIDGE_CREDS";
        nkey_seed = "--nats-nkey-seed", "NATS_NKEY_SEED";
        nkey_file = "--nats-nkey-file", "NATS_NKEY_FILE";
        tls_required = "--nats-tls-required", "NATS_TLS_REQUIRED";
        tls_ca_file = "--nats-tls-ca-file", "NATS_TLS_CA_FILE";
        tls_cert_file = "--nats-tls-cert-file", "NATS_TLS_CERT_FILE";
        tls_key_file = "--nats-tls-key-file", "NATS_TLS_KEY_FILE";
    }
    replication {
        slot = "--slot", "BRIDGE_SLOT";
        publication = "--publication", "BRIDGE_PUBLICATION";
        tables = "--table", "BRIDGE_TABLES";
        format = "--format", "BRIDGE_FORMAT";
        envelope = "--envelope", "BRIDGE_ENVELOPE";
        debezium_schemas = "--debezium-schemas", "BRIDGE_DEBEZIUM_SCHEMAS";
        ring_capacity = "--ring-capacity", "BRIDGE_RING_CAPACITY";
        max_in_flight = "--max-in-flight", "BRIDGE_MAX_IN_FLIGHT";
        ring_max_bytes = "--ring-max-bytes", "BRIDGE_RING_MAX_BYTES";
        max_in_flight_bytes = "--max-in-flight-bytes", "BRIDGE_MAX_IN_FLIGHT_BYTES";
        reconnect_backoff_secs = "--reconnect-backoff-secs", "BRIDGE_RECONNECT_BACKOFF_SECS";
        standby_status_interval_secs =
            "--standby-status-interval-secs", "BRIDGE_STANDBY_STATUS_INTERVAL_SECS";
        batch_wait_ms = "--batch-wait-ms", "BRIDGE_BATCH_WAIT_MS";
        state_file = "--state-file", "BRIDGE_STATE_FILE";
        spool_dir = "--spool-dir", "BRIDGE_SPOOL_DIR";
        wal_receive_timeout_secs = "--wal-receive-timeout-secs", "BRIDGE_WAL_RECEIVE_TIMEOUT_SECS";
        accept_position_gap = "--accept-position-gap", "BRIDGE_ACCEPT_POSITION_GAP";
        failover_slot = "--failover-slot", "BRIDGE_FAILOVER_SLOT";
        id_namespace = "--id-namespace", "BRIDGE_ID_NAMESPACE";
        sink = "--sink", "BRIDGE_SINK";
    }
    http {
        bind = "--http-bind", "BRIDGE_HTTP_BIND";
        port = "--port", "BRIDGE_PORT";
        admin_token = "--admin-token", "BRIDGE_ADMIN_TOKEN";
    }
    monitor {
        interval_secs = "--monitor-interval-secs", "BRIDGE_MONITOR_INTERVAL_SECS";
        lag_warn_bytes = "--lag-warn-bytes", "BRIDGE_LAG_WARN_BYTES";
        lag_critical_bytes = "--lag-critical-bytes", "BRIDGE_LAG_CRITICAL_BYTES";
        metrics_log_interval_secs =
            "--metrics-log-interval-secs", "BRIDGE_METRICS_LOG_INTERVAL_SECS";
    }
    snapshot {
        chunk_rows = "--snapshot-chunk-rows", "BRIDGE_SNAPSHOT_CHUNK_ROWS";
        on_start = "--snapshot-on-start", "BRIDGE_SNAPSHOT_ON_START";
        reply_prefix = "--snapshot-reply-prefix", "BRIDGE_SNAPSHOT_REPLY_PREFIX";
        max_concurrent = "--snapshot-max-concurrent", "BRIDGE_SNAPSHOT_MAX_CONCURRENT";
        cooldown_secs = "--snapshot-cooldown-secs", "BRIDGE_SNAPSHOT_COOLDOWN_SECS";
    }
    streams {
        cdc = "--stream", "BRIDGE_STREAMS";
        init = "--stream", "BRIDGE_STREAMS";
        cdc_max_age_secs = "--cdc-max-age-secs", "BRIDGE_CDC_MAX_AGE_SECS";
        cdc_duplicate_window_secs =
            "--cdc-duplicate-window-secs", "BRIDGE_CDC_DUPLICATE_WINDOW_SECS";
        init_max_age_secs = "--init-max-age-secs", "BRIDGE_INIT_MAX_AGE_SECS";
        replicas = "--stream-replicas", "BRIDGE_STREAM_REPLICAS";
    }
    outbox {
        tables = "--outbox-table", "BRIDGE_OUTBOX_TABLES";
        id_column = "--outbox-id-column", "BRIDGE_OUTBOX_ID_COLUMN";
        aggregate_type_column =
            "--outbox-aggregate-type-column", "BRIDGE_OUTBOX_AGGREGATE_TYPE_COLUMN";
        aggregate_id_column = "--outbox-aggregate-id-column", "BRIDGE_OUTBOX_AGGREGATE_ID_COLUMN";
        event_type_column = "--outbox-event-type-column", "BRIDGE_OUTBOX_EVENT_TYPE_COLUMN";
        payload_column = "--outbox-payload-column", "BRIDGE_OUTBOX_PAYLOAD_COLUMN";
        on_oversize = "--on-oversize", "BRIDGE_ON_OVERSIZE";
    }
    kafka {
        brokers = "--kafka-brokers", "KAFKA_BROKERS";
        topic_prefix = "--topic-prefix", "BRIDGE_TOPIC_PREFIX";
        tombstones = "--kafka-tombstones", "BRIDGE_KAFKA_TOMBSTONES";
        partitions = "--kafka-partitions", "BRIDGE_KAFKA_PARTITIONS";
        replication_factor = "--kafka-replication-factor", "BRIDGE_KAFKA_REPLICATION_FACTOR";
        topic_config = "--kafka-topic-config", "BRIDGE_KAFKA_TOPIC_CONFIG";
        exactly_once = "--kafka-exactly-once", "KAFKA_EXACTLY_ONCE";
        properties = "--kafka-property", "KAFKA_PROPERTIES";
    }
};

/// Every field's TOML key, flag and environment variable.
pub(crate) fn field_sources() -> impl Iterator<Item = &'static FieldSource> {
    SOURCES.iter()
}
