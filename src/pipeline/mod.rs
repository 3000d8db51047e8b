//! The path from the replication stream to JetStream, and the top-level run loop:
//! PostgreSQL set-up, the publisher thread, and the wal loop with its reconnects.

pub mod durable;
pub mod event;
pub mod ring;
pub mod spool;
pub mod wal;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::pg::conn::{sqlstate, ConnectionKind, PgConnection, PgError};
use crate::pg::replication::ReplicationConnection;
use crate::pg::setup::{self, DatabaseInfo, SetupError, SlotState};
use crate::pg::Lsn;
use crate::shutdown::Shutdown;
use crate::sink::nats::{self, NatsError, NatsStats};
use crate::sink::publisher::{PublishError, Publisher, PublisherSettings, PublisherStats};
use crate::telemetry::{self, Telemetry, TelemetryError};

use durable::{DurableLsn, StateFile, StateFileError, StateWriter};
use wal::{RingItem, WalContext, WalStream};

pub use wal::{StreamError, WalStats};

/// Most published events kept for the wal thread to reuse.
const RECYCLE_CAPACITY: usize = 1024;

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
    /// The state file could not be read.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The HTTP server or another telemetry thread could not start.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// A thread could not be started or ended abnormally.
    #[error("internal error: {0}")]
    Internal(String),
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
            RunError::Stream(StreamError::Spool(e)) if e.is_configuration() => 2,
            RunError::Nats(e) if e.is_configuration() => 2,
            RunError::Telemetry(e) if e.is_configuration() => 2,
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
    /// The durable position at the end.
    pub durable: Lsn,
}

/// Sleeps up to `d`, waking early on shutdown.
fn sleep_unless(shutdown: &Shutdown, d: Duration) {
    let deadline = Instant::now() + d;
    while !shutdown.is_triggered() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50).min(deadline - Instant::now()));
    }
}

fn pg_params(config: &Config) -> Vec<(&'static str, String)> {
    config.postgres.libpq_params()
}

/// Checks the database and makes sure the slot exists. Returns the replication connection
/// too, so streaming can start on it without logging in again.
fn pg_setup(config: &Config) -> Result<(DatabaseInfo, SlotState, ReplicationConnection), RunError> {
    let params = pg_params(config);
    let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut conn = PgConnection::connect(&refs, ConnectionKind::Normal).map_err(SetupError::Pg)?;
    let info = setup::check_database(
        &mut conn,
        &config.replication.publication,
        &config.replication.tables,
    )?;
    if let Some(w) = setup::status_interval_warning(
        config.replication.standby_status_interval(),
        info.wal_sender_timeout_ms,
    ) {
        log::warn!("{w}");
    }
    let mut repl = ReplicationConnection::connect(&refs).map_err(SetupError::Pg)?;
    let slot = setup::ensure_slot(&mut conn, &mut repl, &config.replication.slot)?;
    Ok((info, slot, repl))
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
        sleep_unless(shutdown, backoff);
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
    let threads = telemetry::start(config, Arc::clone(&telemetry), latency, shutdown)?;
    let result = run_pipeline(config, shutdown, &telemetry);
    threads.stop();
    result
}

fn run_pipeline(
    config: &Config,
    shutdown: &Shutdown,
    telemetry: &Arc<Telemetry>,
) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let Some((info, slot, setup_repl)) =
        with_retries(config, shutdown, telemetry, || pg_setup(config))?
    else {
        return Ok(RunSummary::default());
    };

    // The spool holds row data: its directory must be private before anything streams.
    let spool_dir = config.replication.spool_dir_path();
    spool::ensure_private_dir(&spool_dir).map_err(StreamError::from)?;
    let receive_timeout = config
        .replication
        .wal_receive_timeout(Duration::from_millis(info.wal_sender_timeout_ms));

    // Resume from the later of what we persisted and what the slot confirmed.
    let mut state = StateFile::new(config.replication.state_file_path());
    let persisted = state.load()?;
    if let Some(p) = persisted {
        if slot.confirmed_flush > p && !slot.created {
            log::warn!(
                "replication slot '{}' is at {} but the last position stored in JetStream by this bridge was {} ({}): \
                 changes between the two were confirmed to PostgreSQL without being stored and may be missing from the stream \
                 (was the slot advanced by hand, or the state file replaced? with a second bridge on this slot this is expected: it moved the slot)",
                config.replication.slot,
                slot.confirmed_flush,
                p,
                state.path().display()
            );
        }
    }
    let start = persisted.unwrap_or(Lsn::INVALID).max(slot.confirmed_flush);
    let state = StateWriter::spawn(state)
        .map_err(|e| RunError::Internal(format!("cannot start the state file thread: {e}")))?;
    let durable: DurableLsn = telemetry.durable.clone();
    durable.advance(start);

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

    let (producer, consumer) = rtrb::RingBuffer::<RingItem>::new(config.replication.ring_capacity);
    // Published events go back to the wal thread to be reused (bounded: at most this many
    // wait there, the rest are dropped).
    let (recycle_tx, recycle_rx) = rtrb::RingBuffer::<Box<event::ChangeEvent>>::new(
        config.replication.ring_capacity.min(RECYCLE_CAPACITY),
    );
    let budget = Arc::new(ring::RingBudget::new(config.replication.ring_max_bytes));
    let notify = Arc::new(tokio::sync::Notify::new());
    let publisher_done = Arc::new(AtomicBool::new(false));
    let stats = Arc::clone(&telemetry.publisher);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let publisher = spawn_publisher(
        config,
        shutdown,
        consumer,
        (recycle_tx, Arc::clone(&budget)),
        Arc::clone(&notify),
        durable.clone(),
        (Arc::clone(&stats), Arc::clone(&telemetry.nats)),
        Arc::clone(&publisher_done),
        ready_tx,
    )?;
    // Wait for NATS and the streams before reading WAL: nothing could be made durable.
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = publisher.join();
            return Err(e.into());
        }
        Err(_) => {
            // The publisher ended before it was ready: shutdown during connect, or a panic.
            return match publisher.join() {
                Ok(Ok(())) => Ok(RunSummary::default()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(RunError::Internal("the publisher thread panicked".into())),
            };
        }
    }
    telemetry.set_streaming();
    log::info!("streaming started in {} ms", started.elapsed().as_millis());
    let (schema_tx, schema_rx) = tokio::sync::mpsc::unbounded_channel();
    let snapshots = spawn_snapshot_service(config, shutdown, info.tables.clone(), schema_rx);

    let mut ctx = WalContext {
        producer,
        notify: Arc::clone(&notify),
        durable: durable.clone(),
        state,
        stats: WalStats::default(),
        last_pushed_end: start,
        reported_flush: start,
        publisher_done: Arc::clone(&publisher_done),
        telemetry: Arc::clone(telemetry),
        schema_changes: Some(schema_tx),
        recycled: Some(recycle_rx),
        budget: Arc::clone(&budget),
    };
    // The first attempt streams on the set-up connection (a login costs tens of ms of CPU
    // with SCRAM); if it was lost meanwhile, the attempt fails and the next one reconnects.
    let mut setup_repl = Some(setup_repl);
    let wal_result = with_retries(config, shutdown, telemetry, || {
        let repl = match setup_repl.take() {
            Some(repl) => repl,
            None => {
                let params = pg_params(config);
                let refs: Vec<(&str, &str)> =
                    params.iter().map(|(k, v)| (*k, v.as_str())).collect();
                ReplicationConnection::connect(&refs).map_err(SetupError::Pg)?
            }
        };
        let mut stream = WalStream::new(
            repl,
            tables.clone(),
            info.server_version,
            config,
            shutdown.clone(),
            spool_dir.clone(),
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
                "{e}; stopping (waiting up to {} s for JetStream to acknowledge what was sent)",
                crate::sink::publisher::SHUTDOWN_RETRY_LIMIT.as_secs()
            );
            shutdown.trigger();
        }
    }
    // Close the ring (the wal side is dropped) and collect the publisher's outcome.
    drop(ctx.producer);
    notify.notify_one();
    let publisher_result = publisher
        .join()
        .map_err(|_| RunError::Internal("the publisher thread panicked".into()))?;
    if let Some(s) = snapshots {
        // It stops on the shutdown signal within its poll interval.
        shutdown.trigger();
        let _ = s.join();
    }
    let summary = RunSummary {
        wal: WalStats {
            uptime: started.elapsed(),
            ..ctx.stats.clone()
        },
        published: stats.published.load(Ordering::Relaxed),
        duplicates: stats.duplicates.load(Ordering::Relaxed),
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

#[allow(clippy::too_many_arguments)]
fn spawn_publisher(
    config: &Config,
    shutdown: &Shutdown,
    consumer: rtrb::Consumer<RingItem>,
    (recycle, budget): (
        rtrb::Producer<Box<event::ChangeEvent>>,
        Arc<ring::RingBudget>,
    ),
    notify: Arc<tokio::sync::Notify>,
    durable: DurableLsn,
    (stats, nats_stats): (Arc<PublisherStats>, Arc<NatsStats>),
    done: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<Result<(), NatsError>>,
) -> Result<JoinHandle<Result<(), RunError>>, RunError> {
    let nats_config = config.nats.clone();
    let streams = config.streams.clone();
    let backoff = config.replication.reconnect_backoff();
    let settings = PublisherSettings {
        format: config.replication.format,
        max_in_flight: config.replication.max_in_flight,
        max_in_flight_bytes: config.replication.max_in_flight_bytes,
        subject_prefix: nats::CDC_SUBJECT_PREFIX.to_string(),
    };
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let result = (|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| RunError::Internal(format!("tokio runtime: {e}")))?;
                rt.block_on(async {
                    // Connect, retrying while NATS is unreachable (it may start after us).
                    let client = loop {
                        match nats::connect_with_stats(
                            &nats_config,
                            nats::CONNECTION_NAME,
                            Arc::clone(&nats_stats),
                        )
                        .await
                        {
                            Ok(c) => break c,
                            Err(e) if !e.is_configuration() && !shutdown.is_triggered() => {
                                log::warn!("{e}; retrying in {}s", backoff.as_secs());
                                let deadline = Instant::now() + backoff;
                                while Instant::now() < deadline && !shutdown.is_triggered() {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                            Err(e) if e.is_configuration() => {
                                let _ = ready.send(Err(e));
                                return Ok(());
                            }
                            Err(_) => return Ok(()),
                        }
                    };
                    // For the set-up requests only; changes go out on the publisher's own
                    // pipelined path over the same connection.
                    let js = async_nats::jetstream::context::ContextBuilder::new()
                        .timeout(crate::sink::publisher::ACK_TIMEOUT)
                        .build(client.clone());
                    if let Err(e) = nats::ensure_streams(&js, &streams).await {
                        let _ = ready.send(Err(e));
                        return Ok(());
                    }
                    let _ = ready.send(Ok(()));
                    Publisher::new(client, consumer, notify, durable, settings, stats, shutdown)
                        .with_recycling(recycle)
                        .with_ring_budget(budget)
                        .with_connection_events(nats_stats)
                        .run()
                        .await
                        .map_err(RunError::from)
                })
            })();
            done.store(true, Ordering::Release);
            result
        })
        .map_err(|e| RunError::Internal(format!("cannot start the publisher thread: {e}")))
}

/// Starts the snapshot thread: its own NATS connection and runtime, serving
/// `snapshot.request.{table}` until shutdown. A failure to start only disables snapshots.
fn spawn_snapshot_service(
    config: &Config,
    shutdown: &Shutdown,
    tables: Vec<setup::PublishedTable>,
    schema_changes: tokio::sync::mpsc::UnboundedReceiver<(Arc<str>, Arc<str>)>,
) -> Option<JoinHandle<()>> {
    let config = config.clone();
    let shutdown = shutdown.clone();
    let spawned = std::thread::Builder::new()
        .name("snapshots".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("snapshots unavailable: tokio runtime: {e}");
                    return;
                }
            };
            let handle = rt.handle().clone();
            rt.block_on(async {
                let client = match nats::connect(&config.nats, "pgbridge-snapshots").await {
                    Ok((c, _)) => c,
                    Err(e) => {
                        log::error!("snapshots unavailable: {e}");
                        return;
                    }
                };
                let js = async_nats::jetstream::context::ContextBuilder::new()
                    .timeout(crate::sink::publisher::ACK_TIMEOUT)
                    .build(client.clone());
                let schemas =
                    match crate::sink::schemas::open_bucket(&js, config.streams.replicas).await {
                        Ok(store) => Some(crate::sink::schemas::SchemaWriter::new(
                            store,
                            config.replication.format,
                            config.postgres.libpq_params(),
                        )),
                        Err(e) => {
                            log::error!("schemas unavailable: {e}");
                            None
                        }
                    };
                let service = crate::sink::snapshot::SnapshotService::new(
                    &config,
                    js,
                    handle,
                    tables,
                    shutdown.clone(),
                );
                service.serve(client, schemas, schema_changes).await;
            });
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            log::error!("snapshots unavailable: cannot start the thread: {e}");
            None
        }
    }
}
