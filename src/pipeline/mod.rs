//! The path from the replication stream to the sink, and the top-level run loop.

pub mod event;
pub mod wal;

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::pg::conn::{sqlstate, ConnectionKind, PgConnection, PgError};
use crate::pg::setup::{self, SetupError};
use crate::shutdown::Shutdown;

pub use wal::{StreamError, WalStats};

/// Why [`run`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// PostgreSQL is not set up for this bridge (publication, tables, privileges, slot).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The replication stream failed in a way a reconnect cannot fix.
    #[error(transparent)]
    Stream(#[from] StreamError),
}

impl RunError {
    /// Process exit code: 2 for configuration and set-up problems, 1 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Setup(SetupError::Pg(e)) | RunError::Stream(StreamError::Pg(e))
                if is_login_problem(e) =>
            {
                2
            }
            RunError::Setup(e) if e.is_configuration() => 2,
            _ => 1,
        }
    }

    /// True when another process streams from the slot (`55006 object_in_use`).
    fn is_slot_in_use(&self) -> bool {
        matches!(self, RunError::Stream(StreamError::Pg(e)) if e.sqlstate() == Some(sqlstate::OBJECT_IN_USE))
    }

    /// True when reconnecting after the backoff may succeed.
    fn is_transient(&self) -> bool {
        match self {
            RunError::Setup(SetupError::Pg(e)) | RunError::Stream(StreamError::Pg(e)) => {
                e.is_connection_problem() && !is_login_problem(e)
            }
            _ => false,
        }
    }
}

/// Connection failures that retrying cannot fix: wrong credentials, missing role or database.
fn is_login_problem(e: &PgError) -> bool {
    match e {
        PgError::Connect(m) => {
            m.contains("password authentication failed")
                || m.contains("no password supplied")
                || (m.contains("role \"") && m.contains("does not exist"))
                || (m.contains("database \"") && m.contains("does not exist"))
                || m.contains("no pg_hba.conf entry")
        }
        _ => false,
    }
}

/// Runs the bridge until `shutdown` is triggered (returns the totals) or an error that a
/// reconnect cannot fix. PostgreSQL connection losses are retried after the configured backoff.
pub fn run(config: &Config, shutdown: &Shutdown) -> Result<WalStats, RunError> {
    let started = Instant::now();
    let mut stats = WalStats::default();
    let backoff = config.replication.reconnect_backoff();
    loop {
        if shutdown.is_triggered() {
            stats.uptime = started.elapsed();
            return Ok(stats);
        }
        match run_once(config, shutdown, &mut stats) {
            Ok(()) => {
                stats.uptime = started.elapsed();
                return Ok(stats);
            }
            Err(e) if e.is_slot_in_use() && !shutdown.is_triggered() => {
                log::info!(
                    "{e}; another bridge holds the slot, waiting {}s before trying again (standby)",
                    backoff.as_secs()
                );
                sleep_unless(shutdown, backoff);
            }
            Err(e) if e.is_transient() && !shutdown.is_triggered() => {
                stats.reconnects += 1;
                log::warn!(
                    "PostgreSQL unavailable: {e}; reconnecting in {}s",
                    backoff.as_secs()
                );
                sleep_unless(shutdown, backoff);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sleeps up to `d`, waking early on shutdown.
fn sleep_unless(shutdown: &Shutdown, d: Duration) {
    let deadline = Instant::now() + d;
    while !shutdown.is_triggered() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50).min(deadline - Instant::now()));
    }
}

/// One connection's worth of work: check, set up the slot, stream until shutdown or failure.
fn run_once(config: &Config, shutdown: &Shutdown, stats: &mut WalStats) -> Result<(), RunError> {
    let params = config.postgres.libpq_params();
    let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut conn = PgConnection::connect(&refs, ConnectionKind::Normal).map_err(SetupError::Pg)?;
    let info = setup::check_database(
        &mut conn,
        &config.replication.publication,
        &config.replication.tables,
    )?;
    let mut repl =
        crate::pg::replication::ReplicationConnection::connect(&refs).map_err(SetupError::Pg)?;
    let slot = setup::ensure_slot(&mut conn, &mut repl, &config.replication.slot)?;
    drop(conn);
    log::info!(
        "streaming slot '{}' of publication '{}' from {} (PostgreSQL {}, tables: {})",
        config.replication.slot,
        config.replication.publication,
        slot.confirmed_flush,
        info.server_version,
        if info.tables.is_empty() {
            "none yet".to_string()
        } else {
            info.tables
                .iter()
                .map(|t| t.qualified())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let mut stream = wal::WalStream::new(repl, &info, config, shutdown.clone());
    stream.run(stats)?;
    Ok(())
}
