//! The path from the replication stream to JetStream, and the top-level run loop:
//! PostgreSQL set-up, the publisher thread, and the wal loop with its reconnects.

pub mod durable;
pub mod position;

pub mod spool;
pub(crate) mod translate;
pub mod wal;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, SinkKind};
use crate::control;
use crate::pg::conn::{sqlstate, ConnectionKind, PgConnection, PgError};
use crate::pg::replication::{ReplicationConnection, SystemIdentity};
use crate::pg::setup::{self, DatabaseInfo, SetupError};
use crate::pg::timeline::{ServerPosition, TimelineHistory};
use crate::pg::Lsn;
use crate::shutdown::Shutdown;
use crate::sink::nats::publisher::PublishError;
use crate::sink::nats::NatsError;
use crate::sink::nats::NatsSink;
use crate::sink::ring;
use crate::sink::{Origin, Sink};
use crate::telemetry::counters::{DurableLsn, NatsStats, PublisherStats};
use crate::telemetry::{self, Telemetry, TelemetryError};

use durable::{StateFile, StateFileError, StateWriter};
use position::{Found, PositionError, PositionIdentity, Recorded, Resume};
use translate::TranslateError;
use wal::{WalContext, WalStream};

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
    /// NATS or JetStream is not usable.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// Publishing failed in a way retrying cannot fix.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Delivering to Kafka failed in a way retrying cannot fix.
    #[cfg(feature = "kafka")]
    #[error(transparent)]
    Kafka(#[from] crate::sink::kafka::KafkaSinkError),
    /// The state file could not be read.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The state file's position does not belong to this server, database or slot.
    #[error(transparent)]
    Position(Box<PositionError>),
    /// A telemetry thread could not start.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// The HTTP server could not start.
    #[error(transparent)]
    Control(#[from] control::HttpError),
    /// A thread could not be started or ended abnormally.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<PositionError> for RunError {
    fn from(e: PositionError) -> Self {
        RunError::Position(Box::new(e))
    }
}

impl From<Box<PositionError>> for RunError {
    fn from(e: Box<PositionError>) -> Self {
        RunError::Position(e)
    }
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
            RunError::Stream(StreamError::Translate(TranslateError::Spool(e)))
                if e.is_configuration() =>
            {
                2
            }
            RunError::Nats(e) if e.is_configuration() => 2,
            #[cfg(feature = "kafka")]
            RunError::Kafka(e) if e.is_configuration() => 2,
            RunError::Control(e) if e.is_configuration() => 2,
            RunError::Position(_) => 2,
            // Only an operator can recover (drop the slot, bootstrap from a snapshot).
            RunError::Stream(StreamError::SlotInvalidated(_)) => 2,
            _ => 1,
        }
    }

    /// True when another process streams from the slot (`55006 object_in_use`).
    fn is_slot_in_use(&self) -> bool {
        matches!(self, RunError::Stream(StreamError::Pg(e)) | RunError::Setup(SetupError::Pg(e))
            if e.sqlstate() == Some(sqlstate::OBJECT_IN_USE))
    }

    /// True when reconnecting after the backoff may succeed.
    fn is_transient(&self) -> bool {
        match self {
            RunError::Setup(SetupError::Pg(e)) | RunError::Stream(StreamError::Pg(e)) => {
                e.is_connection_problem() && !is_login_problem(e)
            }
            RunError::Stream(StreamError::Silent(_)) => true,
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

/// Totals of a run, for the summary line.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Wal thread counters.
    pub wal: WalStats,
    /// Messages stored in JetStream.
    pub published: u64,
    /// Messages JetStream already had (replays within the duplicate window).
    pub duplicates: u64,
    /// NATS fast-ingest batches committed.
    pub batches: u64,
    /// The durable position at the end.
    pub durable: Lsn,
}

/// The totals of a run stopped before it streamed (shutdown during set-up or the NATS
/// connect): the real uptime and reconnect attempts, so the summary agrees with `METRICS`.
fn early_summary(started: Instant, telemetry: &Telemetry) -> RunSummary {
    RunSummary {
        wal: WalStats {
            uptime: started.elapsed(),
            reconnects: telemetry.wal.reconnects.load(Ordering::Relaxed),
            ..WalStats::default()
        },
        published: telemetry.publisher.published.load(Ordering::Relaxed),
        duplicates: telemetry.publisher.duplicates.load(Ordering::Relaxed),
        batches: telemetry.publisher.batches.load(Ordering::Relaxed),
        durable: telemetry.durable.get(),
    }
}

fn pg_params(config: &Config) -> Vec<(&'static str, String)> {
    config.postgres.libpq_params()
}

/// What PostgreSQL set-up found and decided: where streaming starts and what it belongs to.
struct Setup {
    info: DatabaseInfo,
    repl: ReplicationConnection,
    /// The checks' session, handed on to the schema writer (one login fewer).
    session: PgConnection,
    /// Where streaming starts.
    start: Lsn,
    /// What the positions of this run belong to.
    identity: PositionIdentity,
    /// The current timeline's history, for the timeline of each commit.
    history: TimelineHistory,
    /// The server's WAL position at set-up.
    current_wal: Lsn,
    /// The state file must be written now (an accepted gap moved the position).
    rewrite_state: bool,
}

/// Opens the checks' session and checks the database: the publication, its tables, the
/// privileges (warnings) and the server's settings.
fn check_postgres(
    config: &Config,
    params: &[(&'static str, String)],
) -> Result<(PgConnection, DatabaseInfo), RunError> {
    let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut conn = PgConnection::connect(&refs, ConnectionKind::Normal).map_err(SetupError::Pg)?;
    let mut info = setup::check_database(
        &mut conn,
        &config.replication.publication,
        &config.replication.tables,
    )?;
    // Outbox tables publish events, not changes: no change stream, schema or snapshot.
    let outbox = config.outbox.qualified_tables();
    info.tables.retain(|t| !outbox.contains(&t.qualified()));
    for table in &outbox {
        if !info.published.iter().any(|t| &t.qualified() == table) {
            log::warn!(
                "outbox table {table} is not in publication '{}': its events are not published; \
                 add it with ALTER PUBLICATION {} ADD TABLE {table}",
                config.replication.publication,
                config.replication.publication
            );
        }
    }
    if let Some(w) = setup::status_interval_warning(
        config.replication.standby_status_interval(),
        info.wal_sender_timeout_ms,
    ) {
        log::warn!("{w}");
    }
    for w in setup::privilege_warnings(&mut conn, &info.tables, &info.published)
        .map_err(SetupError::Pg)?
    {
        log::warn!("{w}");
    }
    Ok((conn, info))
}

/// A replication session logging in on its own thread, and what the server said it is.
type ReplicationLogin = JoinHandle<Result<(ReplicationConnection, SystemIdentity), PgError>>;

/// Logs in a replication session and identifies the server (`IDENTIFY_SYSTEM`) on a thread
/// of its own.
fn spawn_replication_login(
    params: Vec<(&'static str, String)>,
) -> Result<ReplicationLogin, RunError> {
    std::thread::Builder::new()
        .name("pg-login".into())
        .spawn(move || {
            let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut repl = ReplicationConnection::connect(&refs)?;
            let system = repl.identify_system()?;
            Ok((repl, system))
        })
        .map_err(|e| RunError::Internal(format!("cannot start the PostgreSQL login thread: {e}")))
}

/// Checks the database, checks the state file's position against the server (before the slot
/// is created or anything is confirmed), and makes sure the slot exists. Returns the
/// replication connection too, so streaming can start on it without logging in again.
fn pg_setup(
    config: &Config,
    state_path: &std::path::Path,
    recorded: Option<&Recorded>,
) -> Result<Setup, RunError> {
    let params = pg_params(config);
    // The replication session logs in alongside the checks' session: each login costs tens
    // of milliseconds (SCRAM), and nothing of it is needed before the slot is looked at.
    let repl_login = spawn_replication_login(params.clone())?;
    let checked = check_postgres(config, &params);
    let logged_in = repl_login
        .join()
        .map_err(|_| RunError::Internal("the PostgreSQL login thread panicked".into()))?;
    // The checks' errors first, as when the logins ran one after the other.
    let (mut conn, info) = checked?;
    let (mut repl, system) = logged_in.map_err(SetupError::Pg)?;
    let slot_name = &config.replication.slot;
    let history = timeline_history(&mut repl, system.timeline)?;
    let identity = PositionIdentity {
        system_id: system.system_id,
        timeline: system.timeline,
        database: system.dbname.unwrap_or_default(),
        slot: slot_name.clone(),
    };
    let slot = setup::find_slot(&mut conn, slot_name)?;
    let current_wal = setup::current_wal_lsn(&mut conn)?;
    let found = Found {
        identity: identity.clone(),
        slot: slot.as_ref().map(|s| s.confirmed_flush),
        current_wal,
        history: history.clone(),
    };
    let (resume, gap) = match position::check(state_path, recorded, &found) {
        Ok(verdict) => {
            for (level, note) in &verdict.notes {
                log::log!(*level, "{note}");
            }
            (verdict.resume, None)
        }
        Err(e) if config.replication.accept_position_gap => (Resume::Slot, Some(e)),
        Err(e) => return Err(e.into()),
    };
    // Only now, with the position accepted, may a missing slot be created.
    let mut slot = match slot {
        Some(s) => s,
        None => setup::create_slot(&mut repl, slot_name, config.replication.failover_slot)?,
    };
    for (level, note) in setup::failover_checks(
        &mut conn,
        &mut repl,
        slot_name,
        &mut slot,
        config.replication.failover_slot,
    )
    .map_err(SetupError::Pg)?
    {
        log::log!(level, "{note}");
    }
    if let Some(w) = setup::several_hosts_warning(
        config.postgres.hosts().count(),
        info.server_version,
        slot.failover,
    ) {
        log::warn!("{w}");
    }
    let start = match resume {
        Resume::File(lsn) => lsn.max(slot.confirmed_flush),
        Resume::Slot => slot.confirmed_flush,
    };
    if let Some(gap) = &gap {
        log::warn!(
            "position gap accepted (--accept-position-gap): changes {} are not streamed; the state file is rewritten for this server and streaming starts from the slot. The refusal was: {gap}",
            gap.skipped_range(slot.confirmed_flush)
        );
    }
    Ok(Setup {
        info,
        repl,
        session: conn,
        start,
        identity,
        history,
        current_wal,
        rewrite_state: gap.is_some(),
    })
}

/// After a reconnect: the server must still be the same cluster and database, the durable
/// position on its timeline's history, and the slot must exist there. A promotion (a new
/// timeline that passed through the durable position) is followed: logged, and recorded in
/// the state file from now on. A promoted server without the slot stops the bridge: a new slot
/// would start past the changes committed since the durable position. `server` is told the
/// server's WAL position and history.
fn verify_reconnect(
    repl: &mut ReplicationConnection,
    identity: &mut PositionIdentity,
    state_path: &std::path::Path,
    durable: Lsn,
    state: &StateWriter,
    server: &ServerPosition,
) -> Result<TimelineHistory, RunError> {
    let system = repl.identify_system().map_err(SetupError::Pg)?;
    let found = PositionIdentity {
        system_id: system.system_id,
        timeline: system.timeline,
        database: system.dbname.unwrap_or_default(),
        slot: identity.slot.clone(),
    };
    if found.system_id != identity.system_id || found.database != identity.database {
        return Err(PositionError::OtherIdentity {
            path: state_path.to_path_buf(),
            lsn: durable,
            recorded: identity.clone(),
            found,
        }
        .into());
    }
    let history = timeline_history(repl, found.timeline)?;
    if found.timeline != identity.timeline {
        if !history.contains(identity.timeline, durable) {
            return Err(PositionError::TimelineDiverged {
                path: state_path.to_path_buf(),
                lsn: durable,
                recorded_timeline: identity.timeline,
                recorded: identity.clone(),
                switch_point: history.switch_point(identity.timeline),
                found,
            }
            .into());
        }
        log::info!(
            "the server moved from timeline {} to {} (switch point {}, after the durable position {durable}): a promotion; streaming goes on on timeline {}",
            identity.timeline,
            found.timeline,
            history
                .switch_point(identity.timeline)
                .map_or_else(|| "?".to_string(), |l| l.to_string()),
            found.timeline
        );
    }
    if setup::find_slot(repl.connection(), &identity.slot)?.is_none() {
        let path = state_path.to_path_buf();
        return Err(if found.timeline == identity.timeline {
            PositionError::SlotMissing {
                path,
                lsn: durable,
                recorded: Some(identity.clone()),
                slot: identity.slot.clone(),
                found,
            }
        } else {
            PositionError::SlotLost {
                path,
                lsn: durable,
                recorded_timeline: identity.timeline,
                switch_point: history.switch_point(identity.timeline),
                found,
            }
        }
        .into());
    }
    if found.timeline != identity.timeline {
        *identity = found;
        state.set_identity(identity.clone());
    }
    server.set(system.xlogpos, history.clone());
    Ok(history)
}

/// The history of the current timeline (`TIMELINE_HISTORY`; timeline 1 has none).
fn timeline_history(
    repl: &mut ReplicationConnection,
    timeline: u32,
) -> Result<TimelineHistory, RunError> {
    if timeline <= 1 {
        return Ok(TimelineHistory::single(timeline));
    }
    let text = repl.timeline_history(timeline).map_err(SetupError::Pg)?;
    TimelineHistory::parse(timeline, &text).map_err(|reason| {
        RunError::Setup(SetupError::Pg(crate::pg::conn::PgError::UnexpectedResult {
            command: format!("TIMELINE_HISTORY {timeline}"),
            status: reason,
        }))
    })
}

/// Runs `f` until it succeeds, retrying transient PostgreSQL failures and waiting while the
/// slot is held by another process. `None` when shutdown came first. Reconnects and the
/// reason for waiting are recorded in `telemetry`.
fn with_retries<T>(
    config: &Config,
    shutdown: &Shutdown,
    telemetry: &Telemetry,
    mut f: impl FnMut() -> Result<T, RunError>,
) -> Result<Option<T>, RunError> {
    let backoff = config.replication.reconnect_backoff();
    loop {
        if shutdown.is_triggered() {
            return Ok(None);
        }
        let result = f();
        telemetry.set_setup_attempted();
        telemetry.wal.set_connected(false);
        match result {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.is_slot_in_use() => {
                telemetry.set_pg_problem(Some(
                    "standby: the replication slot is in use by another process".into(),
                ));
                log::info!(
                    "{e}; another bridge holds the slot, waiting {}s before trying again (standby)",
                    backoff.as_secs()
                );
            }
            Err(e) if e.is_transient() => {
                telemetry.wal.reconnects.fetch_add(1, Ordering::Relaxed);
                telemetry.set_pg_problem(Some(format!("PostgreSQL unavailable: {e}")));
                log::warn!(
                    "PostgreSQL unavailable: {e}; reconnecting in {}s",
                    backoff.as_secs()
                );
            }
            Err(e) => return Err(e),
        }
        shutdown.wait_timeout(backoff);
    }
}

/// Runs the bridge until `shutdown` is triggered (returns the totals) or an error that a
/// reconnect cannot fix. The HTTP endpoints, the slot monitor and the `METRICS` log line run
/// alongside; `POST /shutdown` triggers `shutdown`.
pub fn run(config: &Config, shutdown: &Shutdown) -> Result<RunSummary, RunError> {
    let latency = telemetry::metrics::commit_to_puback_histogram().map_err(TelemetryError::from)?;
    let stats = Arc::new(PublisherStats {
        commit_to_ack: Some(latency.clone()),
        ..PublisherStats::default()
    });
    let telemetry = Arc::new(Telemetry::new(
        shutdown.clone(),
        stats,
        Arc::new(NatsStats::default()),
        config.replication.ring_capacity,
    ));
    let threads = telemetry::start(config, Arc::clone(&telemetry), latency)?;
    let snapshots = crate::snapshot::ServiceSlot::default();
    let http = match control::serve(
        config,
        &telemetry,
        threads.metrics(),
        Arc::clone(&snapshots),
        shutdown,
    ) {
        Ok(http) => http,
        Err(e) => {
            threads.stop();
            return Err(e.into());
        }
    };
    let result = run_pipeline(config, shutdown, &telemetry, snapshots);
    http.stop();
    threads.stop();
    result
}

fn run_pipeline(
    config: &Config,
    shutdown: &Shutdown,
    telemetry: &Arc<Telemetry>,
    snapshot_slot: crate::snapshot::ServiceSlot,
) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    // The spool holds row data: its directory must be private before anything streams.
    let spool_dir = config.replication.spool_dir_path();
    spool::ensure_private_dir(&spool_dir).map_err(StreamError::from)?;
    // The state file is read first: a position that does not belong to the server must
    // refuse the start before a slot is created or anything is confirmed.
    let mut state = StateFile::new(config.replication.state_file_path());
    let recorded = state.load()?;
    let state_path = state.path().to_path_buf();

    // The sink connects and makes sure its streams (topics) exist while PostgreSQL is set up:
    // the two are independent until the first change is delivered.
    let (writer, reader) = ring::channel(
        config.replication.ring_capacity,
        config.replication.ring_max_bytes,
    );
    let stats = Arc::clone(&telemetry.publisher);
    let durable: DurableLsn = telemetry.durable.clone();
    let mut sink = SinkThread::spawn(config, shutdown, telemetry, reader, durable.clone())?;

    let mut attempts = 0u32;
    let setup = with_retries(config, shutdown, telemetry, || {
        // PostgreSQL's own problems are reported first, as when the sink started after it;
        // but a sink that can never be ready (a configuration error) ends the start instead
        // of waiting for PostgreSQL to come back.
        attempts += 1;
        if attempts > 1 {
            if let Some(e) = sink.take_failure() {
                return Err(e);
            }
        }
        pg_setup(config, &state_path, recorded.as_ref())
    });
    let Setup {
        info,
        repl: setup_repl,
        session,
        start,
        identity,
        history,
        current_wal,
        rewrite_state,
    } = match setup {
        Ok(Some(setup)) => setup,
        Ok(None) => {
            sink.join()?;
            return Ok(early_summary(started, telemetry));
        }
        Err(e) => {
            // Both would need fixing: say the sink's problem too, not only the first.
            if let Some(sink_error) = sink.take_failure() {
                log::error!("{sink_error}");
            }
            let _ = sink.stop();
            return Err(e);
        }
    };
    let receive_timeout = config
        .replication
        .wal_receive_timeout(Duration::from_millis(info.wal_sender_timeout_ms));
    let upgrade = recorded.as_ref().is_some_and(|r| r.identity.is_none());
    state.set_identity(identity.clone());
    if rewrite_state {
        state.write(start)?;
    } else if upgrade {
        log::info!(
            "state file {} is upgraded to the format with identity ({identity})",
            state_path.display()
        );
        state.write(start)?;
    }
    let state = StateWriter::spawn(state)
        .map_err(|e| RunError::Internal(format!("cannot start the state file thread: {e}")))?;
    durable.advance(start);
    // Kept up to date at every reconnect, for the Kafka sink's exactly-once positions check.
    let server = Arc::new(ServerPosition::new(current_wal, history.clone()));
    let namespace = match &config.replication.id_namespace {
        Some(ns) => {
            log::info!("message ids in namespace '{ns}' (configured)");
            ns.clone()
        }
        None => {
            let ns = position::default_namespace(
                &identity.system_id,
                &identity.database,
                &config.replication.publication,
            );
            log::info!(
                "message ids in namespace '{ns}' (derived from system {} database '{}' publication '{}')",
                identity.system_id,
                identity.database,
                config.replication.publication
            );
            ns
        }
    };
    telemetry.set_id_namespace(&namespace);

    let tables: Option<HashSet<String>> = (!config.replication.tables.is_empty())
        .then(|| info.tables.iter().map(|t| t.qualified()).collect());
    log::info!(
        "slot '{}' publication '{}' tables [{}] format {:?} streams {},{} from {}",
        config.replication.slot,
        config.replication.publication,
        info.tables
            .iter()
            .map(|t| t.qualified())
            .collect::<Vec<_>>()
            .join(", "),
        config.replication.format,
        config.streams.cdc,
        config.streams.init,
        start
    );

    // Snapshots connect to NATS on their own (retrying while it is away) and serve requests
    // only while the wal side streams from the slot.
    let (schema_tx, schema_rx) = tokio::sync::mpsc::unbounded_channel();
    // With the Kafka sink, snapshots go to init topics (requested over HTTP) and there is no
    // schemas bucket.
    let snapshots = match config.replication.sink {
        SinkKind::Nats => crate::snapshot::threads::spawn_service(
            config,
            shutdown,
            Arc::clone(telemetry),
            info.tables.clone(),
            crate::snapshot::threads::SchemaSource {
                changes: schema_rx,
                session,
            },
            snapshot_slot,
        ),
        #[cfg(feature = "kafka")]
        SinkKind::Kafka => {
            drop(schema_rx);
            // No schemas bucket: the checks' session is not needed any more.
            drop(session);
            crate::snapshot::threads::spawn_kafka_service(
                config,
                shutdown,
                Arc::clone(telemetry),
                info.tables.clone(),
                snapshot_slot,
            )
        }
        #[cfg(not(feature = "kafka"))]
        SinkKind::Kafka => {
            drop(schema_rx);
            None
        }
    };

    // Wait for NATS and the streams before reading WAL: nothing could be made durable.
    match sink.wait_ready() {
        Ok(true) => {}
        Ok(false) => {
            // The sink ended before it was ready: shutdown during connect.
            stop_snapshots(shutdown, snapshots);
            sink.join()?;
            return Ok(early_summary(started, telemetry));
        }
        Err(e) => {
            let _ = sink.join();
            stop_snapshots(shutdown, snapshots);
            return Err(e);
        }
    }
    sink.start(Origin {
        id_namespace: namespace,
        system_id: identity.system_id.clone(),
        slot: identity.slot.clone(),
        server: Arc::clone(&server),
    });
    // Phase "streaming": set-up done. `streaming started` is logged by the wal side once
    // START_REPLICATION succeeded on the slot.
    telemetry.set_streaming();

    let mut ctx = WalContext {
        ring: writer,
        durable: durable.clone(),
        state,
        stats: WalStats::default(),
        last_pushed_end: start,
        reported_flush: start,
        telemetry: Arc::clone(telemetry),
        schema_changes: Some(schema_tx),
    };
    // The first attempt streams on the set-up connection (a login costs tens of ms of CPU
    // with SCRAM); if it was lost meanwhile, the attempt fails and the next one reconnects.
    let mut setup_repl = Some(setup_repl);
    let (mut identity, mut history) = (identity, history);
    let wal_result = with_retries(config, shutdown, telemetry, || {
        let repl = match setup_repl.take() {
            Some(repl) => repl,
            None => {
                let params = pg_params(config);
                let refs: Vec<(&str, &str)> =
                    params.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let mut repl = ReplicationConnection::connect(&refs).map_err(SetupError::Pg)?;
                // The server behind the address may have changed meanwhile (a failover).
                history = verify_reconnect(
                    &mut repl,
                    &mut identity,
                    &state_path,
                    ctx.durable.get(),
                    &ctx.state,
                    &server,
                )?;
                repl
            }
        };
        let mut stream = WalStream::new(
            repl,
            tables.clone(),
            info.server_version,
            config,
            shutdown.clone(),
            spool_dir.clone(),
            history.clone(),
        )
        .with_receive_timeout(receive_timeout);
        let resume = ctx.reported_flush.max(start);
        stream.run(resume, &mut ctx).map_err(RunError::from)
    });
    ctx.stats.reconnects = telemetry.wal.reconnects.load(Ordering::Relaxed);

    let wal_failed =
        matches!(&wal_result, Err(e) if !matches!(e, RunError::Stream(StreamError::PublisherGone)));
    if let Err(e) = &wal_result {
        if wal_failed {
            // Said at once: with NATS down, the publisher can take a while to give up.
            log::error!(
                "{e}; stopping (waiting up to {} s for {} to acknowledge what was sent)",
                crate::sink::nats::publisher::SHUTDOWN_RETRY_LIMIT.as_secs(),
                match config.replication.sink {
                    SinkKind::Nats => "JetStream",
                    SinkKind::Kafka => "Kafka",
                }
            );
            shutdown.trigger();
        }
    }
    // Close the ring (the wal side is dropped) and collect the publisher's outcome.
    ctx.ring.close();
    let publisher_result = sink.join();
    stop_snapshots(shutdown, snapshots);
    let summary = RunSummary {
        wal: WalStats {
            uptime: started.elapsed(),
            ..ctx.stats.clone()
        },
        published: stats.published.load(Ordering::Relaxed),
        duplicates: stats.duplicates.load(Ordering::Relaxed),
        batches: stats.batches.load(Ordering::Relaxed),
        durable: durable.get(),
    };
    match (wal_result, publisher_result) {
        // The wal thread's failure is the cause; the publisher's is its consequence.
        (Err(e), _) if wal_failed => Err(e),
        (_, Err(e)) => Err(e),
        (Err(RunError::Stream(StreamError::PublisherGone)), Ok(())) => Ok(summary),
        (Err(e), _) => Err(e),
        (Ok(_), Ok(())) => Ok(summary),
    }
}

/// The sink's thread, started before PostgreSQL's set-up: [`Sink::prepare`] (connect, streams
/// or topics) runs meanwhile, reported on `ready`; then, once the supervisor sent the
/// [`Origin`], [`Sink::run`] over the ring until it is closed.
struct SinkThread {
    /// `None` once joined.
    handle: Option<JoinHandle<Result<(), RunError>>>,
    /// `prepare`'s outcome: an error, or nothing at all when shutdown came first.
    ready: std::sync::mpsc::Receiver<Result<(), RunError>>,
    /// An outcome received before [`SinkThread::wait_ready`] asked for it.
    outcome: Option<Result<(), RunError>>,
    /// Dropped unsent, it ends the thread once prepared: nothing is to be delivered.
    origin: Option<tokio::sync::oneshot::Sender<Origin>>,
    shutdown: Shutdown,
}

impl SinkThread {
    /// Starts the configured sink's thread.
    fn spawn(
        config: &Config,
        shutdown: &Shutdown,
        telemetry: &Telemetry,
        reader: ring::RingReader,
        durable: DurableLsn,
    ) -> Result<Self, RunError> {
        let stats = Arc::clone(&telemetry.publisher);
        match config.replication.sink {
            SinkKind::Nats => {
                let sink = NatsSink::new(config, stats, Arc::clone(&telemetry.nats));
                Self::spawn_sink(sink, shutdown, reader, durable)
            }
            #[cfg(feature = "kafka")]
            SinkKind::Kafka => {
                // The broker connection's state shows where the NATS one does (`/health`).
                telemetry.set_kafka_sink();
                let sink =
                    crate::sink::kafka::KafkaSink::new(config, stats, Arc::clone(&telemetry.nats));
                Self::spawn_sink(sink, shutdown, reader, durable)
            }
            #[cfg(not(feature = "kafka"))]
            SinkKind::Kafka => Err(RunError::Internal(
                "this bridge was built without Kafka support".into(),
            )),
        }
    }

    fn spawn_sink<S: Sink>(
        mut sink: S,
        shutdown: &Shutdown,
        reader: ring::RingReader,
        durable: DurableLsn,
    ) -> Result<Self, RunError>
    where
        RunError: From<S::PrepareError> + From<S::Error>,
    {
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (origin_tx, origin) = tokio::sync::oneshot::channel::<Origin>();
        let thread_shutdown = shutdown.clone();
        let handle = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                let shutdown = thread_shutdown;
                let rt = crate::runtime::current_thread()
                    .map_err(|e| RunError::Internal(format!("tokio runtime: {e}")))?;
                rt.block_on(async move {
                    match sink.prepare(&shutdown).await {
                        Ok(true) => {}
                        Ok(false) => return Ok(()),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return Ok(());
                        }
                    }
                    let _ = ready_tx.send(Ok(()));
                    // Awaited, not blocked on: the runtime keeps serving the connection (its
                    // pings) while PostgreSQL's set-up goes on.
                    let Ok(origin) = origin.await else {
                        return Ok(());
                    };
                    sink.run(reader, durable, origin, shutdown)
                        .await
                        .map_err(RunError::from)
                })
            })
            .map_err(|e| RunError::Internal(format!("cannot start the publisher thread: {e}")))?;
        Ok(SinkThread {
            handle: Some(handle),
            ready,
            outcome: None,
            origin: Some(origin_tx),
            shutdown: shutdown.clone(),
        })
    }

    /// The error `prepare` reported, if it did already (only configuration errors: it
    /// retries the rest). Does not wait.
    fn take_failure(&mut self) -> Option<RunError> {
        if self.outcome.is_none() {
            self.outcome = self.ready.try_recv().ok();
        }
        match self.outcome.take() {
            Some(Err(e)) => Some(e),
            other => {
                self.outcome = other;
                None
            }
        }
    }

    /// Waits until the sink is ready (`true`), failed, or ended first (`false`: shutdown).
    fn wait_ready(&mut self) -> Result<bool, RunError> {
        match self.outcome.take().or_else(|| self.ready.recv().ok()) {
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(e),
            None => Ok(false),
        }
    }

    /// Lets the ready sink deliver what comes through the ring, as changes of `origin`.
    fn start(&mut self, origin: Origin) {
        if let Some(tx) = self.origin.take() {
            // A thread that ended meanwhile tells why when joined.
            let _ = tx.send(origin);
        }
    }

    /// Waits for the thread to end (if it was never started, once prepared) and returns its
    /// outcome. Before [`SinkThread::start`], only shutdown ends a `prepare` that retries.
    fn join(&mut self) -> Result<(), RunError> {
        self.origin = None;
        match self.handle.take() {
            Some(handle) => handle
                .join()
                .map_err(|_| RunError::Internal("the publisher thread panicked".into()))?,
            None => Ok(()),
        }
    }

    /// Ends the thread before it delivered anything (the start failed): asks for shutdown,
    /// which a `prepare` still retrying watches, and joins it.
    fn stop(&mut self) -> Result<(), RunError> {
        if self.handle.is_some() {
            self.shutdown.trigger();
        }
        self.join()
    }
}

impl Drop for SinkThread {
    /// A start that failed between spawning and joining leaves no thread retrying behind.
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Ends the snapshot thread: the run is over (it wakes on the shutdown signal and stops after
/// waiting a bounded time for running snapshots).
fn stop_snapshots(shutdown: &Shutdown, snapshots: Option<JoinHandle<()>>) {
    if let Some(s) = snapshots {
        shutdown.trigger();
        let _ = s.join();
    }
}
