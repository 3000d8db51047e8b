//! The command line of the `bridge` binary.
//!
//! Every configuration field has a flag and an environment variable (through clap's `env`).
//! Values are `Option`s without clap-side defaults, so that "given" and "not given" stay apart:
//! [`parse`] turns them into two configuration overlays, one for the values that came from the
//! environment and one for those from flags, which [`Config::load`] lays over the file. The
//! defaults shown in `--help` come from the `DEFAULT_*` constants of [`crate::config`]. The
//! configuration flags are global: they may stand before or after a subcommand.
//!
//! [`Config::load`]: crate::config::Config::load

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{Config, Layers};
use crate::mirror::MirrorOptions;
use crate::watch::tail::{Start, TailOptions};

mod config_args;
mod help;
mod kafka_args;
#[cfg(test)]
mod tests;

pub(crate) use config_args::ConfigArgs;

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
  [replication], [http], [monitor], [snapshot], [streams], [outbox] and [kafka] (with
  [kafka.properties] for any librdkafka setting). The keys are the ones that
  `bridge check-config` prints; an unknown key is an error.

POSTGRESQL URL
  --pg-url / PG_URL / postgres.url take postgres://user:password@host:port/dbname?sslmode=require
  (or postgresql://; query parameters sslmode, sslrootcert, sslcert, sslkey, connect_timeout,
  target_session_attrs, host, port, user, password, dbname). Several hosts each take their own
  port: postgres://u@pg1:5432,pg2:5433/app?target_session_attrs=read-write (read-write is the
  default with several hosts: every connection goes to the primary). The user info ends at the LAST '@', so a password may
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
    pub(crate) command: Option<Command>,

    /// Configuration, shared by every subcommand.
    #[command(flatten)]
    pub(crate) config: ConfigArgs,
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
    /// the tables (default: every table with a schema in the bucket, also one that appears
    /// later).
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
    /// The dead letters in stream DLQ: `list` prints each as a JSON line (seq, subject, error,
    /// source, msg_id, bytes); `replay SEQ...` publishes them again to where they were meant to
    /// go (or --to SUBJECT) with their headers and message id, and removes each once stored.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

/// `bridge dlq` subcommands.
#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum DlqCommand {
    /// Print every dead letter as a JSON line.
    List,
    /// Publish dead letters again and remove them from DLQ once stored.
    Replay(DlqReplayArgs),
}

/// `bridge dlq replay` options.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct DlqReplayArgs {
    /// Stream sequences of the dead letters (as `bridge dlq list` shows them).
    #[arg(value_name = "SEQ", required = true)]
    pub seqs: Vec<u64>,

    /// Publish to this subject instead of the one each was meant for (for example after
    /// correcting an empty routing value).
    #[arg(long, value_name = "SUBJECT")]
    pub to: Option<String>,

    /// Keep the dead letters in DLQ after replaying them.
    #[arg(long)]
    pub keep: bool,
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
    pub(crate) fn as_lower(self) -> &'static str {
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
    pub(crate) op: Vec<TailOp>,

    /// Start with every change the stream holds.
    #[arg(long, conflicts_with = "last")]
    pub(crate) from_start: bool,

    /// Start with the last N changes that pass the filters, then follow.
    #[arg(long, value_name = "N")]
    pub(crate) last: Option<u64>,

    /// Exit (code 0) after N changes.
    #[arg(long, value_name = "N")]
    pub(crate) count: Option<u64>,

    /// Exit (code 0) after this many seconds without a change.
    #[arg(long, value_name = "SECONDS")]
    pub(crate) until_idle: Option<u64>,

    /// No colours, even on a terminal (never used when stdout is not a terminal).
    #[arg(long)]
    pub(crate) no_color: bool,
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
    pub(crate) db: PathBuf,

    /// Durable JetStream consumer on the CDC stream [default: pgbridge-mirror- and a hash of
    /// the host name and the SQLite file's absolute path, so each mirror file has its own].
    #[arg(long, env = "MIRROR_DURABLE", value_name = "NAME", value_parser = parse_durable)]
    pub(crate) durable: Option<String>,

    /// Exit (code 0) after this many seconds without a new change, e.g. for a scheduled
    /// refresh; without it the mirror runs until SIGINT or SIGTERM.
    #[arg(long, value_name = "SECONDS")]
    pub(crate) until_idle: Option<u64>,

    /// Request a snapshot again when the one being loaded sent nothing for this many seconds
    /// (the bridge serving it was stopped).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::mirror::DEFAULT_SNAPSHOT_STALL.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) snapshot_stall_secs: u64,
}

impl TailArgs {
    /// The options of `bridge tail`; the tables come from the configuration (the global
    /// --table). Colours only on a terminal.
    pub fn options(&self, config: &Config) -> TailOptions {
        TailOptions {
            tables: config.replication.tables.clone(),
            ops: self.op.iter().map(|o| o.as_lower().to_owned()).collect(),
            start: match (self.from_start, self.last) {
                (true, _) => Start::All,
                (false, Some(n)) => Start::Last(n),
                (false, None) => Start::New,
            },
            count: self.count,
            until_idle: self.until_idle.map(Duration::from_secs),
            colour: !self.no_color && std::io::stdout().is_terminal(),
        }
    }
}

impl MirrorArgs {
    /// The options of `bridge mirror`; the tables come from the configuration (the global
    /// --table).
    pub fn options(self, config: &Config) -> MirrorOptions {
        MirrorOptions {
            durable: self
                .durable
                .unwrap_or_else(|| crate::mirror::default_durable(&self.db)),
            db: self.db,
            tables: config.replication.tables.clone(),
            until_idle: self.until_idle.map(Duration::from_secs),
            snapshot_stall: Duration::from_secs(self.snapshot_stall_secs),
        }
    }
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

/// Parses the process's command line (and the environment variables of its flags) into the
/// command and the configuration layers.
pub fn parse() -> Result<(Cli, Layers), clap::Error> {
    parse_from(std::env::args_os())
}

/// [`parse`] for a given command line.
pub(crate) fn parse_from<I, T>(argv: I) -> Result<(Cli, Layers), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(argv)?;
    // As `Parser::try_parse_from` does: errors rendered against the full command.
    let cli = Cli::from_arg_matches(&matches).map_err(|err| err.format(&mut Cli::command()))?;
    let layers = cli.config.layers(&matches);
    Ok((cli, layers))
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
