//! The snapshot side's threads: the request service (its own NATS connection and runtime,
//! serving `snapshot.request.{table}` while this process streams from the slot) and the
//! schema writer that keeps the `schemas` bucket current.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::pg::conn::PgConnection;
use crate::pg::setup;
use crate::shutdown::Shutdown;
use crate::sink::nats;
use crate::telemetry::state::Telemetry;
use crate::wire::event::TableRef;

/// What the schema writer follows, and the session it reads the catalog on.
pub(crate) struct SchemaSource {
    /// Tables whose Relation message showed a change.
    pub(crate) changes: tokio::sync::mpsc::UnboundedReceiver<TableRef>,
    /// An open session (the set-up's checks'), so that the writer does not log in again.
    pub(crate) session: PgConnection,
}

/// Starts the snapshot thread: its own NATS connection (retried with the reconnect backoff
/// while NATS is away, like the publisher's) and runtime, serving `snapshot.request.{table}`
/// while this process streams from the slot, until shutdown. The schemas bucket is kept
/// current on a thread of its own, so reading the catalog never holds up a request; it
/// follows `schemas`.
pub(crate) fn spawn_service(
    config: &Config,
    shutdown: &Shutdown,
    telemetry: Arc<Telemetry>,
    tables: Vec<setup::PublishedTable>,
    schemas: SchemaSource,
    slot: super::ServiceSlot,
) -> Option<JoinHandle<()>> {
    let config = config.clone();
    let shutdown = shutdown.clone();
    let spawned = std::thread::Builder::new()
        .name("snapshots".into())
        .spawn(move || {
            let rt = match crate::runtime::current_thread() {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("snapshots unavailable: tokio runtime: {e}");
                    return;
                }
            };
            let handle = rt.handle().clone();
            rt.block_on(async {
                let backoff = config.replication.reconnect_backoff();
                let client = loop {
                    let attempt = nats::connect(&config.nats, "pgbridge-snapshots");
                    match shutdown.run_until(attempt).await {
                        None => return,
                        Some(Ok((c, _))) => break c,
                        // The publisher reports it too and stops the bridge.
                        Some(Err(e)) if e.is_configuration() => {
                            log::error!("snapshots unavailable: {e}");
                            return;
                        }
                        // A failure as quick as a refused TLS handshake beats the shutdown
                        // check above: look again, or this loop would spin after shutdown.
                        Some(Err(_)) if shutdown.is_triggered() => return,
                        Some(Err(e)) => {
                            log::warn!("snapshot service: {e}; retrying in {}s", backoff.as_secs());
                            shutdown.sleep(backoff).await;
                        }
                    }
                };
                let js = async_nats::jetstream::context::ContextBuilder::new()
                    .timeout(crate::sink::nats::publisher::ACK_TIMEOUT)
                    .build(client.clone());
                let schemas =
                    spawn_schema_writer(&config, &shutdown, js.clone(), tables.clone(), schemas);
                let target = super::target::nats::NatsInit {
                    js,
                    rt: handle,
                    init_stream: config.streams.init.clone(),
                    cdc_stream: config.streams.cdc.clone(),
                };
                let service = super::SnapshotService::new(
                    &config,
                    Box::new(target),
                    tables,
                    Arc::clone(&telemetry),
                    shutdown.clone(),
                );
                let _ = slot.set(Arc::clone(&service));
                service.serve(client).await;
                // The schema thread uses this runtime's connection: wait for it (bounded; it
                // ends on shutdown or when the wal side closes its channel).
                if let Some(h) = schemas {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while !h.is_finished() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
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

/// `--sink kafka`: starts the snapshot thread with its own runtime, taking snapshots into
/// Kafka init topics on `POST /snapshots/{table}` and, with `snapshot.on_start`, at start,
/// while this process streams from the slot, until shutdown. (There is no NATS connection, so
/// no `snapshot.request.{table}` and no schemas bucket.)
#[cfg(feature = "kafka")]
pub(crate) fn spawn_kafka_service(
    config: &Config,
    shutdown: &Shutdown,
    telemetry: Arc<Telemetry>,
    tables: Vec<setup::PublishedTable>,
    slot: super::ServiceSlot,
) -> Option<JoinHandle<()>> {
    let config = config.clone();
    let shutdown = shutdown.clone();
    let spawned = std::thread::Builder::new()
        .name("snapshots".into())
        .spawn(move || {
            let rt = match crate::runtime::current_thread() {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("snapshots unavailable: tokio runtime: {e}");
                    return;
                }
            };
            let target = match super::target::kafka::KafkaInit::new(
                &config.kafka,
                rt.handle().clone(),
                Arc::clone(&telemetry.nats),
            ) {
                Ok(t) => t,
                // The sink reports a configuration it refuses too and stops the bridge.
                Err(e) => {
                    log::error!("snapshots unavailable: {e}");
                    return;
                }
            };
            let service = super::SnapshotService::new(
                &config,
                Box::new(target),
                tables,
                telemetry,
                shutdown.clone(),
            );
            let _ = slot.set(Arc::clone(&service));
            rt.block_on(service.serve_without_requests());
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            log::error!("snapshots unavailable: cannot start the thread: {e}");
            None
        }
    }
}

/// Starts the thread that writes the streamed tables' schemas to the KV bucket at start and
/// again for every table whose Relation message arrives on `changes`. It reads the catalog
/// (blocking libpq) on its own thread and runtime; its NATS requests go through `js`.
fn spawn_schema_writer(
    config: &Config,
    shutdown: &Shutdown,
    js: async_nats::jetstream::Context,
    tables: Vec<setup::PublishedTable>,
    source: SchemaSource,
) -> Option<JoinHandle<()>> {
    let SchemaSource {
        mut changes,
        session,
    } = source;
    use super::schemas::{open_bucket, Refreshed, SchemaWriter};
    use crate::wire::names::SCHEMAS_BUCKET;
    let format = config.replication.format;
    let params = config.postgres.libpq_params();
    let replicas = config.streams.replicas;
    let shutdown = shutdown.clone();
    let spawned = std::thread::Builder::new()
        .name("schemas".into())
        .spawn(move || {
            let rt = match crate::runtime::current_thread() {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("schemas unavailable: tokio runtime: {e}");
                    return;
                }
            };
            rt.block_on(async {
                let mut writer = match open_bucket(&js, replicas).await {
                    Ok(store) => SchemaWriter::new(store, format, params).with_connection(session),
                    Err(e) => {
                        log::error!("schemas unavailable: {e}");
                        return;
                    }
                };
                for t in &tables {
                    if shutdown.is_triggered() {
                        return;
                    }
                    match writer.refresh(&t.schema, &t.name).await {
                        Ok(Refreshed::Unchanged) => {}
                        Ok(_) => log::info!(
                            "schema of {} written to KV bucket {SCHEMAS_BUCKET}",
                            t.qualified()
                        ),
                        Err(e) => log::warn!("{e}"),
                    }
                }
                while let Some(Some(relation)) = shutdown.run_until(changes.recv()).await {
                    let (schema, table) = (&relation.schema, &relation.table);
                    match writer.refresh_relation(&relation, &shutdown).await {
                        Ok(Refreshed::Unchanged) => {}
                        Ok(Refreshed::New) => log::info!(
                            "schema of {schema}.{table} (new to the stream) written to KV bucket {SCHEMAS_BUCKET}"
                        ),
                        Ok(Refreshed::Changed) => log::info!(
                            "schema of {schema}.{table} changed: new revision in KV bucket {SCHEMAS_BUCKET}"
                        ),
                        Err(e) => log::warn!("{e}"),
                    }
                }
            });
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            log::error!("schemas unavailable: cannot start the thread: {e}");
            None
        }
    }
}
