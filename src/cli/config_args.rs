//! The configuration flags, one clap group per section, and the overlays they give.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};

use super::help::with_default;

use crate::config::{
    nats, outbox, pg, replication, sections, Format, HttpOverlay, Layers, MonitorOverlay,
    NatsOverlay, OnOversize, OutboxOverlay, Overlay, PgOverlay, PgPorts, ReplicationOverlay,
    Secret, SnapshotOverlay, SslMode, StreamsOverlay, TargetSessionAttrs,
};

/// Every configuration flag. Each field gives the configuration field of the same meaning (see
/// [`ConfigArgs::layers`]).
#[derive(Clone, Debug, Default, Args)]
pub(crate) struct ConfigArgs {
    /// TOML configuration file, read over the defaults and under the environment and flags.
    #[arg(long, env = "BRIDGE_CONFIG", value_name = "FILE", global = true)]
    pub(crate) config: Option<PathBuf>,

    /// `[postgres]`.
    #[command(flatten)]
    pub(crate) postgres: PgArgs,
    /// `[nats]`.
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
    /// `[replication]`.
    #[command(flatten)]
    pub(crate) replication: ReplicationArgs,
    /// `[http]`.
    #[command(flatten)]
    pub(crate) http: HttpArgs,
    /// `[monitor]`.
    #[command(flatten)]
    pub(crate) monitor: MonitorArgs,
    /// `[snapshot]`.
    #[command(flatten)]
    pub(crate) snapshot: SnapshotArgs,
    /// `[streams]`.
    #[command(flatten)]
    pub(crate) streams: StreamArgs,
    /// `[outbox]`.
    #[command(flatten)]
    pub(crate) outbox: OutboxArgs,
    /// `replication.sink` and `[kafka]`.
    #[command(flatten)]
    pub(crate) kafka: super::kafka_args::KafkaArgs,
}

/// PostgreSQL connection flags (`[postgres]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "PostgreSQL")]
pub(crate) struct PgArgs {
    /// `postgres.url`.
    #[arg(
        long,
        env = "PG_URL",
        value_name = "URL",
        global = true,
        hide_env_values = true,
        help = "Connection URL, postgres://user:password@host:port/dbname?sslmode=...; \
                parts given on their own win over the URL's"
    )]
    pub(crate) pg_url: Option<Secret>,

    /// `postgres.host`.
    #[arg(long, env = "PG_HOST", value_name = "HOST", global = true,
          help = with_default("Host name, IP address or Unix socket directory; several, comma \
                               separated (h1,h2), are tried in turn for the primary", pg::DEFAULT_PG_HOST))]
    pub(crate) pg_host: Option<String>,

    /// `postgres.port`.
    #[arg(long, env = "PG_PORT", value_name = "PORT[,PORT...]", global = true,
          help = with_default("Port: one for every host, or one per host of --pg-host \
                               (5432,5433)", pg::DEFAULT_PG_PORT))]
    pub(crate) pg_port: Option<PgPorts>,

    /// `postgres.user`.
    #[arg(long, env = "PG_USER", value_name = "USER", global = true,
          help = with_default("Role with REPLICATION and SELECT on the published tables", pg::DEFAULT_PG_USER))]
    pub(crate) pg_user: Option<String>,

    /// `postgres.password`.
    #[arg(
        long,
        env = "PG_PASSWORD",
        value_name = "PASSWORD",
        global = true,
        hide_env_values = true,
        help = "Password; prefer PG_PASSWORD, a flag is visible in ps [default: none, \
                libpq then tries ~/.pgpass]"
    )]
    pub(crate) pg_password: Option<Secret>,

    /// `postgres.dbname`.
    #[arg(long, env = "PG_DB", value_name = "DBNAME", global = true,
          help = with_default("Database holding the publication", pg::DEFAULT_PG_DBNAME))]
    pub(crate) pg_db: Option<String>,

    /// `postgres.sslmode`.
    #[arg(long, env = "PG_SSLMODE", value_name = "MODE", global = true,
          help = with_default("libpq sslmode; when given nowhere, none is passed and libpq \
                               reads PGSSLMODE", pg::DEFAULT_PG_SSLMODE_TEXT))]
    pub(crate) pg_sslmode: Option<SslMode>,

    /// `postgres.sslrootcert`.
    #[arg(
        long,
        env = "PG_SSLROOTCERT",
        value_name = "FILE",
        global = true,
        help = "CA certificates that sign the server's certificate (libpq sslrootcert; \
                  'system' for the system's store) [default: libpq's, PGSSLROOTCERT or \
                  ~/.postgresql/root.crt]"
    )]
    pub(crate) pg_sslrootcert: Option<PathBuf>,

    /// `postgres.sslcert`.
    #[arg(
        long,
        env = "PG_SSLCERT",
        value_name = "FILE",
        global = true,
        help = "Client certificate (libpq sslcert); needs --pg-sslkey [default: libpq's, \
                  PGSSLCERT or ~/.postgresql/postgresql.crt]"
    )]
    pub(crate) pg_sslcert: Option<PathBuf>,

    /// `postgres.sslkey`.
    #[arg(
        long,
        env = "PG_SSLKEY",
        value_name = "FILE",
        global = true,
        help = "Private key of the client certificate (libpq sslkey) [default: libpq's, \
                  PGSSLKEY or ~/.postgresql/postgresql.key]"
    )]
    pub(crate) pg_sslkey: Option<PathBuf>,

    /// `postgres.connect_timeout_secs`.
    #[arg(long, env = "PG_CONNECT_TIMEOUT_SECS", value_name = "SECS", global = true,
          help = with_default("Connection timeout in seconds", pg::DEFAULT_PG_CONNECT_TIMEOUT_SECS))]
    pub(crate) pg_connect_timeout_secs: Option<u64>,

    /// `postgres.target_session_attrs`.
    #[arg(
        long,
        env = "PG_TARGET_SESSION_ATTRS",
        value_name = "ATTRS",
        global = true,
        help = "Which of several hosts to use (libpq target_session_attrs): read-write or \
                  primary reach the primary, any the first that answers [default: read-write \
                  with several hosts, else libpq's, PGTARGETSESSIONATTRS or any]"
    )]
    pub(crate) pg_target_session_attrs: Option<TargetSessionAttrs>,
}

/// NATS connection flags (`[nats]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "NATS")]
pub(crate) struct NatsArgs {
    /// `nats.urls`.
    #[arg(long, env = "NATS_URL", value_name = "URLS", value_delimiter = ',', global = true,
          hide_env_values = true,
          help = with_default("NATS servers, comma separated: nats://host:port, tls://host:port, \
                               host:port or host", nats::DEFAULT_NATS_URL))]
    pub(crate) nats_url: Option<Vec<String>>,

    /// `nats.urls`, under the original name; `nats_url` wins when both are given.
    #[arg(
        long,
        env = "NATS_HOST",
        value_name = "HOSTS",
        value_delimiter = ',',
        global = true,
        hide_env_values = true,
        help = "Same as --nats-url (the original name); --nats-url / NATS_URL win when both are given"
    )]
    pub(crate) nats_host: Option<Vec<String>>,

    /// `nats.user`.
    #[arg(
        long,
        env = "NATS_BRIDGE_USER",
        value_name = "USER",
        global = true,
        help = "NATS user; needs a password too [default: none]"
    )]
    pub(crate) nats_user: Option<String>,

    /// `nats.password`.
    #[arg(
        long,
        env = "NATS_BRIDGE_PASSWORD",
        value_name = "PASSWORD",
        global = true,
        hide_env_values = true,
        help = "NATS password; prefer NATS_BRIDGE_PASSWORD, a flag is visible in ps"
    )]
    pub(crate) nats_password: Option<Secret>,

    /// `nats.token`.
    #[arg(
        long,
        env = "NATS_BRIDGE_TOKEN",
        value_name = "TOKEN",
        global = true,
        hide_env_values = true,
        help = "NATS authentication token, instead of user and password; prefer the environment"
    )]
    pub(crate) nats_token: Option<Secret>,

    /// `nats.creds_file`.
    #[arg(
        long,
        env = "NATS_BRIDGE_CREDS",
        value_name = "FILE",
        global = true,
        help = "NATS .creds file (JWT and NKey seed), instead of user/password or token"
    )]
    pub(crate) nats_creds: Option<PathBuf>,

    /// `nats.nkey_seed`.
    #[arg(
        long,
        env = "NATS_NKEY_SEED",
        value_name = "SEED",
        global = true,
        hide_env_values = true,
        help = "NKey user seed (SU...), instead of other credentials; prefer NATS_NKEY_SEED or \
                --nats-nkey-file, a flag is visible in ps"
    )]
    pub(crate) nats_nkey_seed: Option<Secret>,

    /// `nats.nkey_file`.
    #[arg(
        long,
        env = "NATS_NKEY_FILE",
        value_name = "FILE",
        global = true,
        help = "File holding the NKey user seed (a line starting with SU), instead of other \
                credentials"
    )]
    pub(crate) nats_nkey_file: Option<PathBuf>,

    /// `nats.tls_required`.
    #[arg(long, env = "NATS_TLS_REQUIRED", value_name = "BOOL", global = true,
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(),
          help = "Refuse NATS connections without TLS; implied by tls:// URLs and by a CA or \
                  client certificate [default: false]")]
    pub(crate) nats_tls_required: Option<bool>,

    /// `nats.tls_ca_file`.
    #[arg(
        long,
        env = "NATS_TLS_CA_FILE",
        value_name = "FILE",
        global = true,
        help = "PEM CA certificates that sign the NATS server's certificate [default: the \
                system's roots]"
    )]
    pub(crate) nats_tls_ca_file: Option<PathBuf>,

    /// `nats.tls_cert_file`.
    #[arg(
        long,
        env = "NATS_TLS_CERT_FILE",
        value_name = "FILE",
        global = true,
        help = "PEM client certificate for NATS servers that verify clients; needs \
                --nats-tls-key-file"
    )]
    pub(crate) nats_tls_cert_file: Option<PathBuf>,

    /// `nats.tls_key_file`.
    #[arg(
        long,
        env = "NATS_TLS_KEY_FILE",
        value_name = "FILE",
        global = true,
        help = "PEM private key of --nats-tls-cert-file"
    )]
    pub(crate) nats_tls_key_file: Option<PathBuf>,

    /// `nats.inbox_prefix`.
    #[arg(long, env = "NATS_INBOX_PREFIX", value_name = "PREFIX", global = true,
          help = with_default("Prefix of the subjects PubAcks and JetStream answers come back \
                               on; one of the bridge's own lets NATS permissions keep other \
                               users out", nats::DEFAULT_INBOX_PREFIX))]
    pub(crate) nats_inbox_prefix: Option<String>,
}

/// Replication flags (`[replication]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Replication")]
pub(crate) struct ReplicationArgs {
    /// `replication.slot`.
    #[arg(long, env = "BRIDGE_SLOT", value_name = "SLOT", global = true,
          help = with_default("Logical replication slot, created if missing; a-z, 0-9 and _, \
                               at most 63", replication::DEFAULT_SLOT))]
    pub(crate) slot: Option<String>,

    /// `replication.publication`.
    #[arg(long, env = "BRIDGE_PUBLICATION", value_name = "PUBLICATION", global = true,
          help = with_default("Publication to stream; it must exist", replication::DEFAULT_PUBLICATION))]
    pub(crate) publication: Option<String>,

    /// `replication.tables`.
    #[arg(
        long,
        env = "BRIDGE_TABLES",
        value_name = "TABLES",
        value_delimiter = ',',
        global = true,
        help = "Tables to stream, comma separated, as table or schema.table; '' streams every \
                table of the publication [default: every table of the publication]"
    )]
    pub(crate) table: Option<Vec<String>>,

    /// `replication.format`.
    #[arg(long, env = "BRIDGE_FORMAT", value_name = "FORMAT", global = true,
          help = with_default("Message encoding", replication::DEFAULT_FORMAT))]
    pub(crate) format: Option<Format>,

    /// `replication.envelope`.
    #[arg(long, env = "BRIDGE_ENVELOPE", value_name = "ENVELOPE", global = true,
          help = with_default("Shape of change event bodies: native (the bridge's own event), or \
                               debezium (Debezium's change-event envelope, always JSON; implies \
                               --format json)", replication::DEFAULT_ENVELOPE))]
    pub(crate) envelope: Option<replication::Envelope>,

    /// `replication.debezium_schemas`.
    #[arg(long, env = "BRIDGE_DEBEZIUM_SCHEMAS", value_name = "BOOL", global = true,
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(),
          help = with_default("With --envelope debezium: write {\"schema\": …, \"payload\": …} \
                               like Debezium's JSON converter with schemas.enable=true",
                              replication::DEFAULT_DEBEZIUM_SCHEMAS))]
    pub(crate) debezium_schemas: Option<bool>,

    /// `replication.ring_capacity`.
    #[arg(long, env = "BRIDGE_RING_CAPACITY", value_name = "N", global = true,
          help = with_default("Capacity of the ring between the WAL reader and the publisher, \
                               a power of two", replication::DEFAULT_RING_CAPACITY))]
    pub(crate) ring_capacity: Option<usize>,

    /// `replication.max_in_flight`.
    #[arg(long, env = "BRIDGE_MAX_IN_FLIGHT", value_name = "N", global = true,
          help = with_default("Messages awaiting a JetStream PubAck at once", replication::DEFAULT_MAX_IN_FLIGHT))]
    pub(crate) max_in_flight: Option<usize>,

    /// `replication.ring_max_bytes`.
    #[arg(long, env = "BRIDGE_RING_MAX_BYTES", value_name = "BYTES", global = true,
          help = with_default("Bytes the decoded changes waiting between the wal and publisher \
                               threads may hold", replication::DEFAULT_RING_MAX_BYTES))]
    pub(crate) ring_max_bytes: Option<u64>,

    /// `replication.max_in_flight_bytes`.
    #[arg(long, env = "BRIDGE_MAX_IN_FLIGHT_BYTES", value_name = "BYTES", global = true,
          help = with_default("Payload bytes awaiting a JetStream PubAck at once",
                              replication::DEFAULT_MAX_IN_FLIGHT_BYTES))]
    pub(crate) max_in_flight_bytes: Option<u64>,

    /// `replication.reconnect_backoff_secs`.
    #[arg(long, env = "BRIDGE_RECONNECT_BACKOFF_SECS", value_name = "SECS", global = true,
          help = with_default("Wait before reconnecting to PostgreSQL, in seconds",
                              replication::DEFAULT_RECONNECT_BACKOFF_SECS))]
    pub(crate) reconnect_backoff_secs: Option<u64>,

    /// `replication.standby_status_interval_secs`.
    #[arg(long, env = "BRIDGE_STANDBY_STATUS_INTERVAL_SECS", value_name = "SECS", global = true,
          help = with_default("Longest interval between standby status updates to PostgreSQL, \
                               in seconds", replication::DEFAULT_STANDBY_STATUS_INTERVAL_SECS))]
    pub(crate) standby_status_interval_secs: Option<u64>,

    /// `replication.batch_wait_ms`.
    #[arg(long, env = "BRIDGE_BATCH_WAIT_MS", value_name = "MS", global = true,
          help = with_default("After a read that emptied the replication connection, how long \
                               more transactions may gather before the next read, so that one \
                               wake-up serves several at a steady rate (adds at most this much \
                               latency; a transaction after a quiet spell is read at once); 0: \
                               read each as soon as it arrives", replication::DEFAULT_BATCH_WAIT_MS))]
    pub(crate) batch_wait_ms: Option<u64>,

    /// `replication.state_file`.
    #[arg(long, env = "BRIDGE_STATE_FILE", value_name = "FILE", global = true,
          help = with_default("File holding the last durable LSN",
                              format!("{}{{slot}}{}", replication::DEFAULT_STATE_FILE_PREFIX,
                                      replication::DEFAULT_STATE_FILE_SUFFIX)))]
    pub(crate) state_file: Option<PathBuf>,

    /// `replication.spool_dir`.
    #[arg(long, env = "BRIDGE_SPOOL_DIR", value_name = "DIR", global = true,
          help = with_default("Private directory (created with mode 0700) for the spool files \
                               of large transactions streamed before they commit",
                              format!("{}{{slot}} beside the state file",
                                      replication::DEFAULT_SPOOL_DIR_PREFIX)))]
    pub(crate) spool_dir: Option<PathBuf>,

    /// `replication.wal_receive_timeout_secs`.
    #[arg(long, env = "BRIDGE_WAL_RECEIVE_TIMEOUT_SECS", value_name = "SECS", global = true,
          help = with_default("Silence from PostgreSQL after which the replication connection \
                               is dropped and reconnected, in seconds; 0: the server's \
                               wal_sender_timeout plus 30 s (120 s if it has none)",
                              replication::DEFAULT_WAL_RECEIVE_TIMEOUT_SECS))]
    pub(crate) wal_receive_timeout_secs: Option<u64>,

    /// `replication.accept_position_gap`.
    #[arg(long, env = "BRIDGE_ACCEPT_POSITION_GAP", value_name = "BOOL", global = true,
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(),
          help = with_default("Start even when the state file's position belongs to another \
                               cluster, timeline, database or slot, or lies beyond the server's \
                               WAL: stream from the slot, log the skipped range and rewrite the \
                               state file. Without it such a start stops with exit code 2",
                              replication::DEFAULT_ACCEPT_POSITION_GAP))]
    pub(crate) accept_position_gap: Option<bool>,

    /// `replication.failover_slot`.
    #[arg(long, env = "BRIDGE_FAILOVER_SLOT", value_name = "BOOL", global = true,
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(),
          help = with_default("On PostgreSQL 17 and later, create the slot as a failover slot \
                               (and make an existing one so), which standbys with \
                               sync_replication_slots = on keep in step, so streaming goes on \
                               after a promotion",
                              replication::DEFAULT_FAILOVER_SLOT))]
    pub(crate) failover_slot: Option<bool>,

    /// `replication.batch_publish`.
    #[arg(long, env = "BRIDGE_BATCH_PUBLISH", value_name = "BOOL", global = true,
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(),
          help = with_default("Publish backlogs to NATS as fast-ingest batches (nats-server 2.14 \
                               and later, on a CDC stream with allow_batched): one flow \
                               acknowledgement per few hundred changes instead of a PubAck each; \
                               the same messages, ids and order",
                              replication::DEFAULT_BATCH_PUBLISH))]
    pub(crate) batch_publish: Option<bool>,

    /// `replication.id_namespace`.
    #[arg(
        long,
        env = "BRIDGE_ID_NAMESPACE",
        value_name = "NAME",
        global = true,
        help = "First part of every message id (Nats-Msg-Id {namespace}:{timeline}:{commit_lsn}-{seq}), \
                  1-64 characters of A-Z a-z 0-9 _ - [default: 8 hex digits of a hash of the \
                  system identifier, database and publication]"
    )]
    pub(crate) id_namespace: Option<String>,
}

/// HTTP flags (`[http]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "HTTP")]
pub(crate) struct HttpArgs {
    /// `http.bind`.
    #[arg(long, env = "BRIDGE_HTTP_BIND", value_name = "ADDR", global = true,
          help = with_default("Address of /metrics, /status, /health and the admin endpoints; \
                               loopback by default, use 0.0.0.0 in a container", sections::DEFAULT_HTTP_BIND))]
    pub(crate) http_bind: Option<IpAddr>,

    /// `http.port`.
    #[arg(long, env = "BRIDGE_PORT", value_name = "PORT", global = true,
          help = with_default("HTTP port", sections::DEFAULT_HTTP_PORT))]
    pub(crate) port: Option<u16>,

    /// `http.admin_token`.
    #[arg(
        long,
        env = "BRIDGE_ADMIN_TOKEN",
        value_name = "TOKEN",
        global = true,
        hide_env_values = true,
        help = "Bearer token required by /shutdown, /streams/* and POST /snapshots/{table}; without one they are refused. \
                Prefer BRIDGE_ADMIN_TOKEN, a flag is visible in ps [default: none]"
    )]
    pub(crate) admin_token: Option<Secret>,
}

/// Monitor flags (`[monitor]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Monitoring")]
pub(crate) struct MonitorArgs {
    /// `monitor.interval_secs`.
    #[arg(long, env = "BRIDGE_MONITOR_INTERVAL_SECS", value_name = "SECS", global = true,
          help = with_default("Interval between two reads of the slot's lag, in seconds",
                              sections::DEFAULT_MONITOR_INTERVAL_SECS))]
    pub(crate) monitor_interval_secs: Option<u64>,

    /// `monitor.lag_warn_bytes`.
    #[arg(long, env = "BRIDGE_LAG_WARN_BYTES", value_name = "BYTES", global = true,
          help = with_default("Slot lag that logs a warning, in bytes", sections::DEFAULT_LAG_WARN_BYTES))]
    pub(crate) lag_warn_bytes: Option<u64>,

    /// `monitor.lag_critical_bytes`.
    #[arg(long, env = "BRIDGE_LAG_CRITICAL_BYTES", value_name = "BYTES", global = true,
          help = with_default("Slot lag that logs an error, in bytes", sections::DEFAULT_LAG_CRITICAL_BYTES))]
    pub(crate) lag_critical_bytes: Option<u64>,

    /// `monitor.metrics_log_interval_secs`.
    #[arg(long, env = "BRIDGE_METRICS_LOG_INTERVAL_SECS", value_name = "SECS", global = true,
          help = with_default("Interval between two METRICS log lines, in seconds; 0 turns them off",
                              sections::DEFAULT_METRICS_LOG_INTERVAL_SECS))]
    pub(crate) metrics_log_interval_secs: Option<u64>,
}

/// Snapshot flags (`[snapshot]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Snapshots")]
pub(crate) struct SnapshotArgs {
    /// `snapshot.chunk_rows`.
    #[arg(long, env = "BRIDGE_SNAPSHOT_CHUNK_ROWS", value_name = "ROWS", global = true,
          help = with_default("Rows per snapshot chunk message", sections::DEFAULT_SNAPSHOT_CHUNK_ROWS))]
    pub(crate) snapshot_chunk_rows: Option<usize>,

    /// `snapshot.on_start`.
    #[arg(long, env = "BRIDGE_SNAPSHOT_ON_START", value_name = "BOOL", global = true,
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(),
          help = with_default("At start, snapshot, one after the other, every streamed table \
                               without a snapshot in the INIT stream (no init.meta.{table}, or \
                               a failed one) or, with --sink kafka, in its init topic \
                               {prefix}.pgbridge.init.{table}; --snapshot-on-start=false turns \
                               a file's true off",
                              sections::DEFAULT_SNAPSHOT_ON_START))]
    pub(crate) snapshot_on_start: Option<bool>,

    /// `snapshot.reply_prefix`.
    #[arg(long, env = "BRIDGE_SNAPSHOT_REPLY_PREFIX", value_name = "PREFIX", global = true,
          help = with_default("Answer snapshot requests only when their reply subject starts \
                               with this prefix (the clients' inbox prefix); other requests \
                               are neither answered nor served",
                              sections::DEFAULT_SNAPSHOT_REPLY_PREFIX))]
    pub(crate) snapshot_reply_prefix: Option<String>,

    /// `snapshot.max_concurrent`.
    #[arg(long, env = "BRIDGE_SNAPSHOT_MAX_CONCURRENT", value_name = "N", global = true,
          help = with_default("Snapshots that may run at once (each holds a temporary \
                               replication slot); more requests are refused as busy",
                              sections::DEFAULT_SNAPSHOT_MAX_CONCURRENT))]
    pub(crate) snapshot_max_concurrent: Option<usize>,

    /// `snapshot.cooldown_secs`.
    #[arg(long, env = "BRIDGE_SNAPSHOT_COOLDOWN_SECS", value_name = "SECS", global = true,
          help = with_default("Seconds after a snapshot of a table started during which new \
                               requests for it are refused; 0 turns it off",
                              sections::DEFAULT_SNAPSHOT_COOLDOWN_SECS))]
    pub(crate) snapshot_cooldown_secs: Option<u64>,
}

/// Stream flags (`[streams]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "JetStream streams")]
pub(crate) struct StreamArgs {
    /// `streams.cdc` and `streams.init`.
    #[arg(long, env = "BRIDGE_STREAMS", value_name = "CDC[,INIT]", global = true,
          value_parser = parse_stream_names,
          help = with_default("Names of the CDC stream (subjects cdc.>) and of the INIT stream \
                               (subjects init.>)", format!("{},{}", sections::DEFAULT_CDC_STREAM,
                                                           sections::DEFAULT_INIT_STREAM)))]
    pub(crate) stream: Option<StreamNames>,

    /// `streams.cdc_max_age_secs`.
    #[arg(long, env = "BRIDGE_CDC_MAX_AGE_SECS", value_name = "SECS", global = true,
          help = with_default("CDC stream retention in seconds, 0 for unlimited; keep it at least \
                               as long as the INIT stream's", sections::DEFAULT_CDC_MAX_AGE_SECS))]
    pub(crate) cdc_max_age_secs: Option<u64>,

    /// `streams.cdc_duplicate_window_secs`.
    #[arg(long, env = "BRIDGE_CDC_DUPLICATE_WINDOW_SECS", value_name = "SECS", global = true,
          help = with_default("CDC stream duplicate window in seconds; republished changes are \
                               stored once within it", sections::DEFAULT_CDC_DUPLICATE_WINDOW_SECS))]
    pub(crate) cdc_duplicate_window_secs: Option<u64>,

    /// `streams.init_max_age_secs`.
    #[arg(long, env = "BRIDGE_INIT_MAX_AGE_SECS", value_name = "SECS", global = true,
          help = with_default("INIT stream retention in seconds, 0 for unlimited",
                              sections::DEFAULT_INIT_MAX_AGE_SECS))]
    pub(crate) init_max_age_secs: Option<u64>,

    /// `streams.replicas`.
    #[arg(long, env = "BRIDGE_STREAM_REPLICAS", value_name = "N", global = true,
          help = with_default("Replicas of the CDC and INIT streams and the schemas bucket when                                the bridge creates them (1..=5; 3 on a JetStream cluster);                                existing ones keep theirs", sections::DEFAULT_STREAM_REPLICAS))]
    pub(crate) stream_replicas: Option<usize>,
}

/// Outbox flags (`[outbox]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Outbox and dead letters")]
pub(crate) struct OutboxArgs {
    /// `outbox.tables`.
    #[arg(
        long,
        env = "BRIDGE_OUTBOX_TABLES",
        value_name = "TABLE",
        value_delimiter = ',',
        global = true,
        help = "Outbox table (repeatable; comma separated in the variable), as table or \
                  schema.table: each insert is published as an event on \
                  outbox.{aggregate_type}.{event_type} in stream OUTBOX, and the table publishes \
                  no change events [default: none]"
    )]
    pub(crate) outbox_table: Option<Vec<String>>,

    /// `outbox.id_column`.
    #[arg(long, env = "BRIDGE_OUTBOX_ID_COLUMN", value_name = "COLUMN", global = true,
          help = with_default("Outbox column of the event id (the message id)",
                              outbox::DEFAULT_OUTBOX_ID_COLUMN))]
    pub(crate) outbox_id_column: Option<String>,

    /// `outbox.aggregate_type_column`.
    #[arg(long, env = "BRIDGE_OUTBOX_AGGREGATE_TYPE_COLUMN", value_name = "COLUMN", global = true,
          help = with_default("Outbox column of the aggregate type",
                              outbox::DEFAULT_OUTBOX_AGGREGATE_TYPE_COLUMN))]
    pub(crate) outbox_aggregate_type_column: Option<String>,

    /// `outbox.aggregate_id_column`.
    #[arg(long, env = "BRIDGE_OUTBOX_AGGREGATE_ID_COLUMN", value_name = "COLUMN", global = true,
          help = with_default("Outbox column of the aggregate id",
                              outbox::DEFAULT_OUTBOX_AGGREGATE_ID_COLUMN))]
    pub(crate) outbox_aggregate_id_column: Option<String>,

    /// `outbox.event_type_column`.
    #[arg(long, env = "BRIDGE_OUTBOX_EVENT_TYPE_COLUMN", value_name = "COLUMN", global = true,
          help = with_default("Outbox column of the event type",
                              outbox::DEFAULT_OUTBOX_EVENT_TYPE_COLUMN))]
    pub(crate) outbox_event_type_column: Option<String>,

    /// `outbox.payload_column`.
    #[arg(long, env = "BRIDGE_OUTBOX_PAYLOAD_COLUMN", value_name = "COLUMN", global = true,
          help = with_default("Outbox column of the payload (published as its text)",
                              outbox::DEFAULT_OUTBOX_PAYLOAD_COLUMN))]
    pub(crate) outbox_payload_column: Option<String>,

    /// `outbox.on_oversize`.
    #[arg(long, env = "BRIDGE_ON_OVERSIZE", value_name = "ACTION", global = true,
          help = with_default("A change event larger than the NATS server's max_payload (on \
                               Kafka: its topic's max.message.bytes): stop the bridge, or \
                               publish it as a dead letter in stream DLQ (topic dlq) and go on \
                               (outbox events always go to DLQ)",
                              outbox::DEFAULT_ON_OVERSIZE))]
    pub(crate) on_oversize: Option<OnOversize>,
}

/// The value of `--stream CDC[,INIT]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StreamNames {
    /// The CDC stream's name.
    pub(crate) cdc: String,
    /// The INIT stream's name, when given.
    pub(crate) init: Option<String>,
}

fn parse_stream_names(value: &str) -> Result<StreamNames, String> {
    let mut names = value.split(',').map(str::trim);
    let cdc = names.next().unwrap_or_default();
    let init = names.next();
    if names.next().is_some() {
        return Err("expected CDC[,INIT]: at most two stream names".into());
    }
    if cdc.is_empty() || init == Some("") {
        return Err("a stream name is empty; expected CDC[,INIT]".into());
    }
    Ok(StreamNames {
        cdc: cdc.to_owned(),
        init: init.map(str::to_owned),
    })
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

/// Picks the values of one source: the environment, or the command line.
struct Pick<'a> {
    matches: &'a ArgMatches,
    env: bool,
}

impl Pick<'_> {
    /// `value` when the argument `id` got it from this source. clap has already chosen between
    /// a flag and its environment variable, so each value lands in exactly one overlay.
    fn take<T: Clone>(&self, id: &str, value: &Option<T>) -> Option<T> {
        value.as_ref().filter(|_| self.gave(id)).cloned()
    }

    /// True when the argument `id`, if given, came from this source.
    fn gave(&self, id: &str) -> bool {
        let from_env = self.matches.value_source(id) == Some(ValueSource::EnvVariable);
        from_env == self.env
    }
}

/// `pick.take` for a field, by the field's name, which is its clap argument id.
macro_rules! take {
    ($pick:expr, $args:expr, $field:ident) => {
        $pick.take(stringify!($field), &$args.$field)
    };
}

impl ConfigArgs {
    /// The configuration file and the environment's and the flags' overlays; `matches` are the
    /// ones these arguments were parsed from.
    pub(crate) fn layers(&self, matches: &ArgMatches) -> Layers {
        Layers {
            file: self.config.clone(),
            env: self.overlay(&Pick { matches, env: true }),
            flags: self.overlay(&Pick {
                matches,
                env: false,
            }),
        }
    }

    fn overlay(&self, p: &Pick<'_>) -> Overlay {
        let (pg, n, r) = (&self.postgres, &self.nats, &self.replication);
        let (h, m, s, st) = (&self.http, &self.monitor, &self.snapshot, &self.streams);
        let o = &self.outbox;
        // --nats-url / NATS_URL and --nats-host / NATS_HOST are two names for one setting; the
        // first wins when both are given, whichever source each comes from.
        let urls = if n.nats_url.is_some() {
            take!(p, n, nats_url)
        } else {
            take!(p, n, nats_host)
        };
        let streams = take!(p, st, stream);
        Overlay {
            postgres: PgOverlay {
                url: take!(p, pg, pg_url),
                host: take!(p, pg, pg_host),
                port: take!(p, pg, pg_port),
                user: take!(p, pg, pg_user),
                password: take!(p, pg, pg_password),
                dbname: take!(p, pg, pg_db),
                sslmode: take!(p, pg, pg_sslmode),
                sslrootcert: take!(p, pg, pg_sslrootcert),
                sslcert: take!(p, pg, pg_sslcert),
                sslkey: take!(p, pg, pg_sslkey),
                connect_timeout_secs: take!(p, pg, pg_connect_timeout_secs),
                target_session_attrs: take!(p, pg, pg_target_session_attrs),
            },
            nats: NatsOverlay {
                urls: urls.map(|urls| cli_list(&urls)),
                user: take!(p, n, nats_user),
                password: take!(p, n, nats_password),
                token: take!(p, n, nats_token),
                creds_file: take!(p, n, nats_creds),
                nkey_seed: take!(p, n, nats_nkey_seed),
                nkey_file: take!(p, n, nats_nkey_file),
                tls_required: take!(p, n, nats_tls_required),
                tls_ca_file: take!(p, n, nats_tls_ca_file),
                tls_cert_file: take!(p, n, nats_tls_cert_file),
                tls_key_file: take!(p, n, nats_tls_key_file),
                inbox_prefix: take!(p, n, nats_inbox_prefix),
            },
            replication: ReplicationOverlay {
                slot: take!(p, r, slot),
                publication: take!(p, r, publication),
                tables: take!(p, r, table).map(|tables| cli_list(&tables)),
                format: take!(p, r, format),
                envelope: take!(p, r, envelope),
                debezium_schemas: take!(p, r, debezium_schemas),
                ring_capacity: take!(p, r, ring_capacity),
                max_in_flight: take!(p, r, max_in_flight),
                ring_max_bytes: take!(p, r, ring_max_bytes),
                max_in_flight_bytes: take!(p, r, max_in_flight_bytes),
                reconnect_backoff_secs: take!(p, r, reconnect_backoff_secs),
                standby_status_interval_secs: take!(p, r, standby_status_interval_secs),
                batch_wait_ms: take!(p, r, batch_wait_ms),
                state_file: take!(p, r, state_file),
                spool_dir: take!(p, r, spool_dir),
                wal_receive_timeout_secs: take!(p, r, wal_receive_timeout_secs),
                accept_position_gap: take!(p, r, accept_position_gap),
                failover_slot: take!(p, r, failover_slot),
                batch_publish: take!(p, r, batch_publish),
                id_namespace: take!(p, r, id_namespace),
                sink: p.take("sink", &self.kafka.sink),
            },
            http: HttpOverlay {
                bind: take!(p, h, http_bind),
                port: take!(p, h, port),
                admin_token: take!(p, h, admin_token),
            },
            monitor: MonitorOverlay {
                interval_secs: take!(p, m, monitor_interval_secs),
                lag_warn_bytes: take!(p, m, lag_warn_bytes),
                lag_critical_bytes: take!(p, m, lag_critical_bytes),
                metrics_log_interval_secs: take!(p, m, metrics_log_interval_secs),
            },
            snapshot: SnapshotOverlay {
                chunk_rows: take!(p, s, snapshot_chunk_rows),
                on_start: take!(p, s, snapshot_on_start),
                reply_prefix: take!(p, s, snapshot_reply_prefix),
                max_concurrent: take!(p, s, snapshot_max_concurrent),
                cooldown_secs: take!(p, s, snapshot_cooldown_secs),
            },
            streams: StreamsOverlay {
                cdc: streams.as_ref().map(|names| names.cdc.clone()),
                init: streams.and_then(|names| names.init),
                cdc_max_age_secs: take!(p, st, cdc_max_age_secs),
                cdc_duplicate_window_secs: take!(p, st, cdc_duplicate_window_secs),
                init_max_age_secs: take!(p, st, init_max_age_secs),
                replicas: take!(p, st, stream_replicas),
            },
            outbox: OutboxOverlay {
                tables: take!(p, o, outbox_table).map(|tables| cli_list(&tables)),
                id_column: take!(p, o, outbox_id_column),
                aggregate_type_column: take!(p, o, outbox_aggregate_type_column),
                aggregate_id_column: take!(p, o, outbox_aggregate_id_column),
                event_type_column: take!(p, o, outbox_event_type_column),
                payload_column: take!(p, o, outbox_payload_column),
                on_oversize: take!(p, o, on_oversize),
            },
            kafka: self.kafka.overlay(&|id| p.gave(id)),
        }
    }
}
