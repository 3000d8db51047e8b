//! The command line of the `bridge` binary.
//!
//! Every configuration field has a flag and an environment variable (through clap's `env`).
//! Values are `Option`s without clap-side defaults, so that [`Config::load`] can tell "given"
//! from "not given" and lay them over the configuration file; the defaults shown in `--help` come
//! from the `DEFAULT_*` constants of [`crate::config`]. The configuration flags are global: they
//! may stand before or after a subcommand.
//!
//! [`Config::load`]: crate::config::Config::load

use std::fmt::Display;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};

use crate::config::{self as cfg, Format, Secret, SslMode};

/// Exit code of a clean shutdown.
pub const EXIT_OK: u8 = 0;
/// Exit code of a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a bad command line or configuration.
pub const EXIT_USAGE: u8 = 2;

const ABOUT: &str = "Stream PostgreSQL changes (logical replication, pgoutput) into NATS JetStream";

const LONG_ABOUT: &str = "\
Stream PostgreSQL changes (logical replication, pgoutput) into NATS JetStream, and serve \
consistent table snapshots for consumers that mirror tables.

Every setting can be given as a flag, as an environment variable, or in a TOML configuration \
file. Flags beat environment variables, which beat the file, which beats the built-in defaults.";

const AFTER_LONG_HELP: &str = "\
CONFIGURATION FILE
  --config FILE (BRIDGE_CONFIG) reads a TOML file with the sections [postgres], [nats],
  [replication], [http], [monitor], [snapshot] and [streams]. The keys are the ones that
  `bridge check-config` prints; an unknown key is an error.

POSTGRESQL URL
  --pg-url / PG_URL / postgres.url take postgres://user:password@host:port/dbname?sslmode=require
  (or postgresql://; query parameters sslmode, sslrootcert, sslcert, sslkey, connect_timeout,
  host, port, user, password, dbname). The user info ends at the LAST '@', so a password may
  hold '/', '?', '#' or '@' as is or percent-encoded (%2F); an '@' after the host is written %40.
  A part given on its own (--pg-host, PG_HOST, postgres.host, ...) always wins over the same
  part of the URL, wherever each comes from; parts given nowhere take the defaults.

NATS SERVERS
  --nats-url / NATS_URL and --nats-host / NATS_HOST (the original name) set the same list:
  nats://host:port, tls://host:port, host:port or host, comma separated. When both are given,
  --nats-url / NATS_URL wins. user:password@ or token@ in a URL authenticate (the user info
  ends at the last '@'). A tls:// URL, a CA or a client certificate make TLS required.

SECRETS
  Prefer the environment (PG_PASSWORD, NATS_BRIDGE_PASSWORD, NATS_BRIDGE_TOKEN, NATS_NKEY_SEED,
  BRIDGE_ADMIN_TOKEN) or the file over password flags: command lines are visible to every
  user through ps. Secrets are never logged or printed; they show as ***.

EXIT CODES
  0 clean shutdown, 1 runtime failure, 2 bad usage or configuration.
  SIGINT and SIGTERM stop the bridge gracefully; a second signal exits at once with code 1.

EXAMPLES
  bridge --stream CDC,INIT --slot cdc_slot --publication cdc_pub --table users,orders --port 9090
  PG_URL=postgres://bridge_reader@db:5432/app PG_PASSWORD=... bridge check-config";

/// `text [default: value]`, so the help shows the defaults without clap applying them.
fn with_default(text: &str, default: impl Display) -> String {
    format!("{text} [default: {default}]")
}

/// The `bridge` command line.
#[derive(Debug, Parser)]
#[command(
    name = "bridge",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = AFTER_LONG_HELP
)]
pub struct Cli {
    /// What to do; without a subcommand the bridge runs.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Configuration, shared by every subcommand.
    #[command(flatten)]
    pub config: ConfigArgs,
}

impl Cli {
    /// The subcommand, [`Command::Run`] when none was given.
    pub fn action(&self) -> Command {
        self.command.clone().unwrap_or_default()
    }
}

/// Subcommands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Stream changes from PostgreSQL into JetStream (the default).
    #[default]
    Run,
    /// Load and validate the configuration, print it as TOML with secrets shown as ***, and
    /// exit: 0 when valid, 2 when not.
    CheckConfig,
    /// Ask the running bridge's GET /health (at --http-bind/--port; 127.0.0.1 when it listens
    /// on every address), print the answer and exit 0 when it is 200, 1 otherwise. For
    /// container health checks in images without a shell or curl.
    Health,
    /// Keep a local SQLite database equal to the streamed tables: read their schemas from the
    /// KV bucket `schemas`, load a snapshot when the local copy is empty or older than the CDC
    /// stream, then follow the CDC stream. Uses the NATS and stream settings; --table chooses
    /// the tables (default: every table with a schema in the bucket).
    Mirror(MirrorArgs),
    /// Print the CDC stream's changes as JSON lines on stdout (stream_seq, subject, then the
    /// change's fields), decoded from either format. --table (global, table or schema.table)
    /// and --op filter. Starts with new changes unless --from-start or --last. Exit 0 on
    /// SIGINT/SIGTERM, --count or --until-idle; 2 for an unknown stream or a bad filter.
    Tail(TailArgs),
    /// Request a snapshot of TABLE (table or schema.table) from the running bridge and show its
    /// progress until it is complete; the last line has rows, chunks, seconds, rows/s,
    /// snapshot id, lsn and cdc_stream_seq. Exit 0 when complete, 1 when refused or failed.
    Snapshot(SnapshotCommandArgs),
}

/// An operation `bridge tail --op` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TailOp {
    /// INSERT.
    Insert,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
    /// TRUNCATE.
    Truncate,
}

impl TailOp {
    /// The subject token.
    pub fn as_lower(self) -> &'static str {
        match self {
            TailOp::Insert => "insert",
            TailOp::Update => "update",
            TailOp::Delete => "delete",
            TailOp::Truncate => "truncate",
        }
    }
}

/// `bridge tail` options (the tables come from the global --table).
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct TailArgs {
    /// Show only these operations (repeat or comma separate) [default: every one].
    #[arg(
        long,
        value_name = "OP",
        value_enum,
        value_delimiter = ',',
        ignore_case = true
    )]
    pub op: Vec<TailOp>,

    /// Start with every change the stream holds.
    #[arg(long, conflicts_with = "last")]
    pub from_start: bool,

    /// Start with the last N changes that pass the filters, then follow.
    #[arg(long, value_name = "N")]
    pub last: Option<u64>,

    /// Exit (code 0) after N changes.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// Exit (code 0) after this many seconds without a change.
    #[arg(long, value_name = "SECONDS")]
    pub until_idle: Option<u64>,

    /// No colours, even on a terminal (never used when stdout is not a terminal).
    #[arg(long)]
    pub no_color: bool,
}

/// `bridge snapshot` options.
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct SnapshotCommandArgs {
    /// The table: table (schema public) or schema.table.
    #[arg(value_name = "TABLE")]
    pub table: String,

    /// Give up (exit 1) when the snapshot sends nothing for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = crate::watch::snapshot::DEFAULT_WAIT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub wait_secs: u64,
}

/// `bridge mirror` options.
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct MirrorArgs {
    /// SQLite file, created when missing; it also holds each table's position.
    #[arg(long, env = "MIRROR_DB", value_name = "FILE")]
    pub db: PathBuf,

    /// Durable JetStream consumer on the CDC stream [default: pgbridge-mirror- and a hash of
    /// the host name and the SQLite file's absolute path, so each mirror file has its own].
    #[arg(long, env = "MIRROR_DURABLE", value_name = "NAME", value_parser = parse_durable)]
    pub durable: Option<String>,

    /// Exit (code 0) after this many seconds without a new change, e.g. for a scheduled
    /// refresh; without it the mirror runs until SIGINT or SIGTERM.
    #[arg(long, value_name = "SECONDS")]
    pub until_idle: Option<u64>,

    /// Request a snapshot again when the one being loaded sent nothing for this many seconds
    /// (the bridge serving it was stopped).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::mirror::DEFAULT_SNAPSHOT_STALL.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_stall_secs: u64,
}

/// A consumer name JetStream accepts: letters, digits, `-` and `_`.
fn parse_durable(value: &str) -> Result<String, String> {
    if !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(value.to_owned())
    } else {
        Err("use 1 to 64 letters, digits, '-' or '_'".to_owned())
    }
}

/// Every configuration flag. Each field overrides the configuration field of the same meaning
/// when given (see [`crate::config::FIELD_SOURCES`]).
#[derive(Clone, Debug, Default, Args)]
pub struct ConfigArgs {
    /// TOML configuration file, read over the defaults and under the environment and flags.
    #[arg(long, env = "BRIDGE_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// `[postgres]`.
    #[command(flatten)]
    pub postgres: PgArgs,
    /// `[nats]`.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// `[replication]`.
    #[command(flatten)]
    pub replication: ReplicationArgs,
    /// `[http]`.
    #[command(flatten)]
    pub http: HttpArgs,
    /// `[monitor]`.
    #[command(flatten)]
    pub monitor: MonitorArgs,
    /// `[snapshot]`.
    #[command(flatten)]
    pub snapshot: SnapshotArgs,
    /// `[streams]`.
    #[command(flatten)]
    pub streams: StreamArgs,
}

/// PostgreSQL connection flags (`[postgres]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "PostgreSQL")]
pub struct PgArgs {
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
    pub pg_url: Option<Secret>,

    /// `postgres.host`.
    #[arg(long, env = "PG_HOST", value_name = "HOST", global = true,
          help = with_default("Host name, IP address or Unix socket directory", cfg::DEFAULT_PG_HOST))]
    pub pg_host: Option<String>,

    /// `postgres.port`.
    #[arg(long, env = "PG_PORT", value_name = "PORT", global = true,
          help = with_default("Port", cfg::DEFAULT_PG_PORT))]
    pub pg_port: Option<u16>,

    /// `postgres.user`.
    #[arg(long, env = "PG_USER", value_name = "USER", global = true,
          help = with_default("Role with REPLICATION and SELECT on the published tables", cfg::DEFAULT_PG_USER))]
    pub pg_user: Option<String>,

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
    pub pg_password: Option<Secret>,

    /// `postgres.dbname`.
    #[arg(long, env = "PG_DB", value_name = "DBNAME", global = true,
          help = with_default("Database holding the publication", cfg::DEFAULT_PG_DBNAME))]
    pub pg_db: Option<String>,

    /// `postgres.sslmode`.
    #[arg(long, env = "PG_SSLMODE", value_name = "MODE", global = true,
          help = with_default("libpq sslmode; when given nowhere, none is passed and libpq \
                               reads PGSSLMODE", cfg::DEFAULT_PG_SSLMODE_TEXT))]
    pub pg_sslmode: Option<SslMode>,

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
    pub pg_sslrootcert: Option<PathBuf>,

    /// `postgres.sslcert`.
    #[arg(
        long,
        env = "PG_SSLCERT",
        value_name = "FILE",
        global = true,
        help = "Client certificate (libpq sslcert); needs --pg-sslkey [default: libpq's, \
                  PGSSLCERT or ~/.postgresql/postgresql.crt]"
    )]
    pub pg_sslcert: Option<PathBuf>,

    /// `postgres.sslkey`.
    #[arg(
        long,
        env = "PG_SSLKEY",
        value_name = "FILE",
        global = true,
        help = "Private key of the client certificate (libpq sslkey) [default: libpq's, \
                  PGSSLKEY or ~/.postgresql/postgresql.key]"
    )]
    pub pg_sslkey: Option<PathBuf>,

    /// `postgres.connect_timeout_secs`.
    #[arg(long, env = "PG_CONNECT_TIMEOUT_SECS", value_name = "SECS", global = true,
          help = with_default("Connection timeout in seconds", cfg::DEFAULT_PG_CONNECT_TIMEOUT_SECS))]
    pub pg_connect_timeout_secs: Option<u64>,
}

/// NATS connection flags (`[nats]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "NATS")]
pub struct NatsArgs {
    /// `nats.urls`.
    #[arg(long, env = "NATS_URL", value_name = "URLS", value_delimiter = ',', global = true,
          hide_env_values = true,
          help = with_default("NATS servers, comma separated: nats://host:port, tls://host:port, \
                               host:port or host", cfg::DEFAULT_NATS_URL))]
    pub nats_url: Option<Vec<String>>,

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
    pub nats_host: Option<Vec<String>>,

    /// `nats.user`.
    #[arg(
        long,
        env = "NATS_BRIDGE_USER",
        value_name = "USER",
        global = true,
        help = "NATS user; needs a password too [default: none]"
    )]
    pub nats_user: Option<String>,

    /// `nats.password`.
    #[arg(
        long,
        env = "NATS_BRIDGE_PASSWORD",
        value_name = "PASSWORD",
        global = true,
        hide_env_values = true,
        help = "NATS password; prefer NATS_BRIDGE_PASSWORD, a flag is visible in ps"
    )]
    pub nats_password: Option<Secret>,

    /// `nats.token`.
    #[arg(
        long,
        env = "NATS_BRIDGE_TOKEN",
        value_name = "TOKEN",
        global = true,
        hide_env_values = true,
        help = "NATS authentication token, instead of user and password; prefer the environment"
    )]
    pub nats_token: Option<Secret>,

    /// `nats.creds_file`.
    #[arg(
        long,
        env = "NATS_BRIDGE_CREDS",
        value_name = "FILE",
        global = true,
        help = "NATS .creds file (JWT and NKey seed), instead of user/password or token"
    )]
    pub nats_creds: Option<PathBuf>,

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
    pub nats_nkey_seed: Option<Secret>,

    /// `nats.nkey_file`.
    #[arg(
        long,
        env = "NATS_NKEY_FILE",
        value_name = "FILE",
        global = true,
        help = "File holding the NKey user seed (a line starting with SU), instead of other \
                credentials"
    )]
    pub nats_nkey_file: Option<PathBuf>,

    /// `nats.tls_required`.
    #[arg(long, env = "NATS_TLS_REQUIRED", value_name = "BOOL", global = true,
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(),
          help = "Refuse NATS connections without TLS; implied by tls:// URLs and by a CA or \
                  client certificate [default: false]")]
    pub nats_tls_required: Option<bool>,

    /// `nats.tls_ca_file`.
    #[arg(
        long,
        env = "NATS_TLS_CA_FILE",
        value_name = "FILE",
        global = true,
        help = "PEM CA certificates that sign the NATS server's certificate [default: the \
                system's roots]"
    )]
    pub nats_tls_ca_file: Option<PathBuf>,

    /// `nats.tls_cert_file`.
    #[arg(
        long,
        env = "NATS_TLS_CERT_FILE",
        value_name = "FILE",
        global = true,
        help = "PEM client certificate for NATS servers that verify clients; needs \
                --nats-tls-key-file"
    )]
    pub nats_tls_cert_file: Option<PathBuf>,

    /// `nats.tls_key_file`.
    #[arg(
        long,
        env = "NATS_TLS_KEY_FILE",
        value_name = "FILE",
        global = true,
        help = "PEM private key of --nats-tls-cert-file"
    )]
    pub nats_tls_key_file: Option<PathBuf>,
}

/// Replication flags (`[replication]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Replication")]
pub struct ReplicationArgs {
    /// `replication.slot`.
    #[arg(long, env = "BRIDGE_SLOT", value_name = "SLOT", global = true,
          help = with_default("Logical replication slot, created if missing; a-z, 0-9 and _, \
                               at most 63", cfg::DEFAULT_SLOT))]
    pub slot: Option<String>,

    /// `replication.publication`.
    #[arg(long, env = "BRIDGE_PUBLICATION", value_name = "PUBLICATION", global = true,
          help = with_default("Publication to stream; it must exist", cfg::DEFAULT_PUBLICATION))]
    pub publication: Option<String>,

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
    pub table: Option<Vec<String>>,

    /// `replication.format`.
    #[arg(long, env = "BRIDGE_FORMAT", value_name = "FORMAT", global = true,
          help = with_default("Message encoding", cfg::DEFAULT_FORMAT))]
    pub format: Option<Format>,

    /// `replication.ring_capacity`.
    #[arg(long, env = "BRIDGE_RING_CAPACITY", value_name = "N", global = true,
          help = with_default("Capacity of the ring between the WAL reader and the publisher, \
                               a power of two", cfg::DEFAULT_RING_CAPACITY))]
    pub ring_capacity: Option<usize>,

    /// `replication.max_in_flight`.
    #[arg(long, env = "BRIDGE_MAX_IN_FLIGHT", value_name = "N", global = true,
          help = with_default("Messages awaiting a JetStream PubAck at once", cfg::DEFAULT_MAX_IN_FLIGHT))]
    pub max_in_flight: Option<usize>,

    /// `replication.ring_max_bytes`.
    #[arg(long, env = "BRIDGE_RING_MAX_BYTES", value_name = "BYTES", global = true,
          help = with_default("Bytes the decoded changes waiting between the wal and publisher \
                               threads may hold", cfg::DEFAULT_RING_MAX_BYTES))]
    pub ring_max_bytes: Option<u64>,

    /// `replication.max_in_flight_bytes`.
    #[arg(long, env = "BRIDGE_MAX_IN_FLIGHT_BYTES", value_name = "BYTES", global = true,
          help = with_default("Payload bytes awaiting a JetStream PubAck at once",
                              cfg::DEFAULT_MAX_IN_FLIGHT_BYTES))]
    pub max_in_flight_bytes: Option<u64>,

    /// `replication.reconnect_backoff_secs`.
    #[arg(long, env = "BRIDGE_RECONNECT_BACKOFF_SECS", value_name = "SECS", global = true,
          help = with_default("Wait before reconnecting to PostgreSQL, in seconds",
                              cfg::DEFAULT_RECONNECT_BACKOFF_SECS))]
    pub reconnect_backoff_secs: Option<u64>,

    /// `replication.standby_status_interval_secs`.
    #[arg(long, env = "BRIDGE_STANDBY_STATUS_INTERVAL_SECS", value_name = "SECS", global = true,
          help = with_default("Longest interval between standby status updates to PostgreSQL, \
                               in seconds", cfg::DEFAULT_STANDBY_STATUS_INTERVAL_SECS))]
    pub standby_status_interval_secs: Option<u64>,

    /// `replication.state_file`.
    #[arg(long, env = "BRIDGE_STATE_FILE", value_name = "FILE", global = true,
          help = with_default("File holding the last durable LSN",
                              format!("{}{{slot}}{}", cfg::DEFAULT_STATE_FILE_PREFIX,
                                      cfg::DEFAULT_STATE_FILE_SUFFIX)))]
    pub state_file: Option<PathBuf>,

    /// `replication.spool_dir`.
    #[arg(long, env = "BRIDGE_SPOOL_DIR", value_name = "DIR", global = true,
          help = with_default("Private directory (created with mode 0700) for the spool files \
                               of large transactions streamed before they commit",
                              format!("{}{{slot}} beside the state file",
                                      cfg::DEFAULT_SPOOL_DIR_PREFIX)))]
    pub spool_dir: Option<PathBuf>,

    /// `replication.wal_receive_timeout_secs`.
    #[arg(long, env = "BRIDGE_WAL_RECEIVE_TIMEOUT_SECS", value_name = "SECS", global = true,
          help = with_default("Silence from PostgreSQL after which the replication connection \
                               is dropped and reconnected, in seconds; 0: the server's \
                               wal_sender_timeout plus 30 s (120 s if it has none)",
                              cfg::DEFAULT_WAL_RECEIVE_TIMEOUT_SECS))]
    pub wal_receive_timeout_secs: Option<u64>,

    /// `replication.accept_position_gap`.
    #[arg(long, env = "BRIDGE_ACCEPT_POSITION_GAP", value_name = "BOOL", global = true,
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(),
          help = with_default("Start even when the state file's position belongs to another \
                               cluster, timeline, database or slot, or lies beyond the server's \
                               WAL: stream from the slot, log the skipped range and rewrite the \
                               state file. Without it such a start stops with exit code 2",
                              cfg::DEFAULT_ACCEPT_POSITION_GAP))]
    pub accept_position_gap: Option<bool>,

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
    pub id_namespace: Option<String>,
}

/// HTTP flags (`[http]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "HTTP")]
pub struct HttpArgs {
    /// `http.bind`.
    #[arg(long, env = "BRIDGE_HTTP_BIND", value_name = "ADDR", global = true,
          help = with_default("Address of /metrics, /status, /health and the admin endpoints; \
                               loopback by default, use 0.0.0.0 in a container", cfg::DEFAULT_HTTP_BIND))]
    pub http_bind: Option<IpAddr>,

    /// `http.port`.
    #[arg(long, env = "BRIDGE_PORT", value_name = "PORT", global = true,
          help = with_default("HTTP port", cfg::DEFAULT_HTTP_PORT))]
    pub port: Option<u16>,

    /// `http.admin_token`.
    #[arg(
        long,
        env = "BRIDGE_ADMIN_TOKEN",
        value_name = "TOKEN",
        global = true,
        hide_env_values = true,
        help = "Bearer token required by /shutdown and /streams/*; without one they are refused. \
                Prefer BRIDGE_ADMIN_TOKEN, a flag is visible in ps [default: none]"
    )]
    pub admin_token: Option<Secret>,
}

/// Monitor flags (`[monitor]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Monitoring")]
pub struct MonitorArgs {
    /// `monitor.interval_secs`.
    #[arg(long, env = "BRIDGE_MONITOR_INTERVAL_SECS", value_name = "SECS", global = true,
          help = with_default("Interval between two reads of the slot's lag, in seconds",
                              cfg::DEFAULT_MONITOR_INTERVAL_SECS))]
    pub monitor_interval_secs: Option<u64>,

    /// `monitor.lag_warn_bytes`.
    #[arg(long, env = "BRIDGE_LAG_WARN_BYTES", value_name = "BYTES", global = true,
          help = with_default("Slot lag that logs a warning, in bytes", cfg::DEFAULT_LAG_WARN_BYTES))]
    pub lag_warn_bytes: Option<u64>,

    /// `monitor.lag_critical_bytes`.
    #[arg(long, env = "BRIDGE_LAG_CRITICAL_BYTES", value_name = "BYTES", global = true,
          help = with_default("Slot lag that logs an error, in bytes", cfg::DEFAULT_LAG_CRITICAL_BYTES))]
    pub lag_critical_bytes: Option<u64>,

    /// `monitor.metrics_log_interval_secs`.
    #[arg(long, env = "BRIDGE_METRICS_LOG_INTERVAL_SECS", value_name = "SECS", global = true,
          help = with_default("Interval between two METRICS log lines, in seconds; 0 turns them off",
                              cfg::DEFAULT_METRICS_LOG_INTERVAL_SECS))]
    pub metrics_log_interval_secs: Option<u64>,
}

/// Snapshot flags (`[snapshot]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Snapshots")]
pub struct SnapshotArgs {
    /// `snapshot.chunk_rows`.
    #[arg(long, env = "BRIDGE_SNAPSHOT_CHUNK_ROWS", value_name = "ROWS", global = true,
          help = with_default("Rows per snapshot chunk message", cfg::DEFAULT_SNAPSHOT_CHUNK_ROWS))]
    pub snapshot_chunk_rows: Option<usize>,

    /// `snapshot.on_start`.
    #[arg(long, env = "BRIDGE_SNAPSHOT_ON_START", value_name = "BOOL", global = true,
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(),
          help = with_default("At start, snapshot, one after the other, every streamed table \
                               without a snapshot in the INIT stream (no init.meta.{table}, or \
                               a failed one); --snapshot-on-start=false turns a file's true off",
                              cfg::DEFAULT_SNAPSHOT_ON_START))]
    pub snapshot_on_start: Option<bool>,

    /// `snapshot.reply_prefix`.
    #[arg(long, env = "BRIDGE_SNAPSHOT_REPLY_PREFIX", value_name = "PREFIX", global = true,
          help = with_default("Answer snapshot requests only when their reply subject starts \
                               with this prefix (the clients' inbox prefix); other requests \
                               are neither answered nor served",
                              cfg::DEFAULT_SNAPSHOT_REPLY_PREFIX))]
    pub snapshot_reply_prefix: Option<String>,

    /// `snapshot.max_concurrent`.
    #[arg(long, env = "BRIDGE_SNAPSHOT_MAX_CONCURRENT", value_name = "N", global = true,
          help = with_default("Snapshots that may run at once (each holds a temporary \
                               replication slot); more requests are refused as busy",
                              cfg::DEFAULT_SNAPSHOT_MAX_CONCURRENT))]
    pub snapshot_max_concurrent: Option<usize>,

    /// `snapshot.cooldown_secs`.
    #[arg(long, env = "BRIDGE_SNAPSHOT_COOLDOWN_SECS", value_name = "SECS", global = true,
          help = with_default("Seconds after a snapshot of a table started during which new \
                               requests for it are refused; 0 turns it off",
                              cfg::DEFAULT_SNAPSHOT_COOLDOWN_SECS))]
    pub snapshot_cooldown_secs: Option<u64>,
}

/// Stream flags (`[streams]`).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "JetStream streams")]
pub struct StreamArgs {
    /// `streams.cdc` and `streams.init`.
    #[arg(long, env = "BRIDGE_STREAMS", value_name = "CDC[,INIT]", global = true,
          value_parser = parse_stream_names,
          help = with_default("Names of the CDC stream (subjects cdc.>) and of the INIT stream \
                               (subjects init.>)", format!("{},{}", cfg::DEFAULT_CDC_STREAM,
                                                           cfg::DEFAULT_INIT_STREAM)))]
    pub stream: Option<StreamNames>,

    /// `streams.cdc_max_age_secs`.
    #[arg(long, env = "BRIDGE_CDC_MAX_AGE_SECS", value_name = "SECS", global = true,
          help = with_default("CDC stream retention in seconds, 0 for unlimited; keep it at least \
                               as long as the INIT stream's", cfg::DEFAULT_CDC_MAX_AGE_SECS))]
    pub cdc_max_age_secs: Option<u64>,

    /// `streams.cdc_duplicate_window_secs`.
    #[arg(long, env = "BRIDGE_CDC_DUPLICATE_WINDOW_SECS", value_name = "SECS", global = true,
          help = with_default("CDC stream duplicate window in seconds; republished changes are \
                               stored once within it", cfg::DEFAULT_CDC_DUPLICATE_WINDOW_SECS))]
    pub cdc_duplicate_window_secs: Option<u64>,

    /// `streams.init_max_age_secs`.
    #[arg(long, env = "BRIDGE_INIT_MAX_AGE_SECS", value_name = "SECS", global = true,
          help = with_default("INIT stream retention in seconds, 0 for unlimited",
                              cfg::DEFAULT_INIT_MAX_AGE_SECS))]
    pub init_max_age_secs: Option<u64>,

    /// `streams.replicas`.
    #[arg(long, env = "BRIDGE_STREAM_REPLICAS", value_name = "N", global = true,
          help = with_default("Replicas of the CDC and INIT streams and the schemas bucket when                                the bridge creates them (1..=5; 3 on a JetStream cluster);                                existing ones keep theirs", cfg::DEFAULT_STREAM_REPLICAS))]
    pub stream_replicas: Option<usize>,
}

/// The value of `--stream CDC[,INIT]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamNames {
    /// The CDC stream's name.
    pub cdc: String,
    /// The INIT stream's name, when given.
    pub init: Option<String>,
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

/// Renders a clap usage error as one line (without the `error:` prefix, the usage block and
/// the blank lines), tips included, for `bridge: usage error: ...`.
pub fn usage_error_line(err: &clap::Error) -> String {
    let text = err.to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("Usage:")
                && !line.starts_with("For more information")
        })
        .map(|line| line.strip_prefix("error: ").unwrap_or(line))
        .collect();
    let mut line = parts.join("; ");
    // clap names only the flag, even when the bad value came from its environment variable.
    if let Some(env) = env_of_invalid_arg(err).filter(|env| std::env::var_os(env).is_some()) {
        line.push_str(&format!(" ({env} is set in the environment)"));
    }
    format!("{line} (see 'bridge --help')")
}

/// The environment variable of the argument a value error is about, if it has one.
fn env_of_invalid_arg(err: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let ContextValue::String(arg) = err.get(ContextKind::InvalidArg)? else {
        return None;
    };
    // "--pg-port <PORT>" or "--snapshot-on-start[=<BOOL>]"
    let long = arg.strip_prefix("--")?.split([' ', '[', '=']).next()?;
    let cmd = <Cli as clap::CommandFactory>::command();
    let arg = cmd.get_arguments().find(|a| a.get_long() == Some(long))?;
    arg.get_env()?.to_str().map(str::to_owned)
}

/// Serialises the tests that read or change the process environment: clap reads it on every
/// parse, and the environment is shared by all test threads.
#[cfg(test)]
pub(crate) mod test_env {
    use std::ffi::OsString;
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
    use std::sync::Mutex;

    use clap::CommandFactory;

    use super::Cli;

    static ENV_LOCK: Mutex<()> = Mutex::new(());

    /// Runs `f` with every environment variable the CLI reads removed, except `vars`, and
    /// restores the environment afterwards, also when `f` panics.
    pub(crate) fn with_env<R>(vars: &[(&str, &str)], f: impl FnOnce() -> R) -> R {
        let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let names: Vec<OsString> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_owned()))
            .collect();
        let saved: Vec<(OsString, Option<OsString>)> = names
            .iter()
            .map(|n| (n.clone(), std::env::var_os(n)))
            .collect();
        for name in &names {
            std::env::remove_var(name);
        }
        for (key, value) in vars {
            std::env::set_var(key, value);
        }
        let result = catch_unwind(AssertUnwindSafe(f));
        for (key, _) in vars {
            std::env::remove_var(key);
        }
        for (name, value) in saved {
            if let Some(value) = value {
                std::env::set_var(name, value);
            }
        }
        result.unwrap_or_else(|panic| resume_unwind(panic))
    }
}

#[cfg(test)]
mod tests {
    use super::test_env::with_env;
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn subcommands_and_defaults() {
        with_env(&[], || {
            let cli = Cli::try_parse_from(["bridge"]).unwrap();
            assert_eq!(cli.action(), Command::Run);
            assert!(cli.config.replication.slot.is_none());
            assert!(cli.config.http.port.is_none());
            let cli = Cli::try_parse_from(["bridge", "--slot", "s", "check-config"]).unwrap();
            assert_eq!(cli.action(), Command::CheckConfig);
            assert_eq!(cli.config.replication.slot.as_deref(), Some("s"));
            let cli = Cli::try_parse_from(["bridge", "run", "--port", "9999"]).unwrap();
            assert_eq!(cli.action(), Command::Run);
            assert_eq!(cli.config.http.port, Some(9999));
        });
    }

    #[test]
    fn seed_command_line() {
        with_env(&[], || {
            let cli = Cli::try_parse_from([
                "bridge",
                "--stream",
                "CDC,INIT",
                "--slot",
                "cdc_slot",
                "--publication",
                "cdc_pub",
                "--table",
                "users,orders",
                "--port",
                "9090",
            ])
            .unwrap();
            let c = &cli.config;
            assert_eq!(
                c.streams.stream,
                Some(StreamNames {
                    cdc: "CDC".into(),
                    init: Some("INIT".into())
                })
            );
            assert_eq!(
                c.replication.table.as_deref(),
                Some(&["users".to_owned(), "orders".to_owned()][..])
            );
            assert_eq!(c.http.port, Some(9090));
        });
    }

    #[test]
    fn flag_forms() {
        with_env(&[], || {
            let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.config);
            let c = parse(&["bridge", "--snapshot-on-start"]).unwrap();
            assert_eq!(c.snapshot.snapshot_on_start, Some(true));
            let c = parse(&["bridge", "--snapshot-on-start=no"]).unwrap();
            assert_eq!(c.snapshot.snapshot_on_start, Some(false));
            // The flag takes no separate value, so a subcommand can follow it.
            let cli =
                Cli::try_parse_from(["bridge", "--snapshot-on-start", "check-config"]).unwrap();
            assert_eq!(cli.action(), Command::CheckConfig);
            let c = parse(&["bridge", "--format", "json", "--pg-sslmode", "verify-full"]).unwrap();
            assert_eq!(c.replication.format, Some(Format::Json));
            assert_eq!(c.postgres.pg_sslmode, Some(SslMode::VerifyFull));
            for bad in [
                &["bridge", "--format", "xml"][..],
                &["bridge", "--port", "http"],
                &["bridge", "--stream", "A,B,C"],
                &["bridge", "--stream", ",B"],
                &["bridge", "--http-bind", "localhost"],
                &["bridge", "--no-such-flag"],
            ] {
                let err = parse(bad).unwrap_err();
                assert_eq!(err.exit_code(), i32::from(EXIT_USAGE), "{bad:?}");
                let line = usage_error_line(&err);
                assert!(!line.contains('\n') && !line.starts_with("error"), "{line}");
            }
        });
    }

    #[test]
    fn help_shows_defaults_but_no_secret_values() {
        with_env(
            &[
                ("PG_PASSWORD", "help-secret"),
                ("PG_URL", "postgres://u:url-secret@h/db"),
            ],
            || {
                let help = Cli::command().render_long_help().to_string();
                assert!(help.contains("[default: cdc_slot]"), "{help}");
                assert!(help.contains("[default: 9090]"));
                assert!(help.contains("[default: pgbridge-{slot}.lsn]"));
                assert!(!help.contains("help-secret") && !help.contains("url-secret"));
            },
        );
    }
}
