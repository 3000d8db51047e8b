//! The NATS JetStream sink: the connection and [`NatsError`] (`connect.rs`), the streams and
//! their checks (`streams.rs`), the publisher with its window of PubAcks ([`publisher`],
//! `puback`), and `NatsSink`, which the pipeline drives.
//!
//! Everything here is async and meant for the small tokio runtime of the calling thread.

mod connect;
pub(crate) mod puback;
pub mod publisher;
mod streams;

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;

use crate::config::replication::Envelope;
use crate::config::{Config, NatsConfig, StreamsConfig};
use crate::shutdown::Shutdown;
use crate::telemetry::counters::{NatsStats, PublisherStats};
use crate::wire::encode::debezium::DebeziumOptions;

use publisher::{PublishError, Publisher, PublisherSettings, ACK_TIMEOUT};

use super::{Origin, Sink};
use crate::wire::names::CDC_SUBJECT_PREFIX;

/// Connection name the bridge shows in the server's monitoring (`/connz`).
pub const CONNECTION_NAME: &str = "pgbridge";

pub use connect::{connect, connect_with_stats, max_payload, unless_refused, NatsError};
pub use streams::{
    cdc_stream_config, check_jetstream, check_stream_format, dlq_stream_config,
    ensure_outbox_streams, ensure_streams, init_stream_config, outbox_stream_config,
    stream_last_sequence, StreamWarning, StreamsInfo,
};

/// The NATS JetStream sink: connects (retrying while NATS is away), makes sure the streams
/// exist in the configured format, then publishes the changes the driver hands it through a
/// [`Publisher`].
pub(crate) struct NatsSink {
    nats: NatsConfig,
    streams: StreamsConfig,
    /// Wait between connect and set-up attempts.
    backoff: Duration,
    settings: PublisherSettings,
    stats: Arc<PublisherStats>,
    connection: Arc<NatsStats>,
    /// Set by [`Sink::prepare`].
    client: Option<Client>,
}

impl NatsSink {
    /// A sink for `config`'s NATS servers and streams, counting in `stats` and `connection`.
    pub(crate) fn new(
        config: &Config,
        stats: Arc<PublisherStats>,
        connection: Arc<NatsStats>,
    ) -> Self {
        NatsSink {
            nats: config.nats.clone(),
            streams: config.streams.clone(),
            backoff: config.replication.reconnect_backoff(),
            settings: PublisherSettings {
                format: config.replication.format,
                debezium: (config.replication.envelope == Envelope::Debezium).then(|| {
                    DebeziumOptions {
                        name: CDC_SUBJECT_PREFIX.to_string(),
                        db: config.postgres.dbname.clone(),
                        schemas: config.replication.debezium_schemas,
                    }
                }),
                max_in_flight: config.replication.max_in_flight,
                max_in_flight_bytes: config.replication.max_in_flight_bytes,
                subject_prefix: CDC_SUBJECT_PREFIX.to_string(),
                // Known once PostgreSQL is set up: see `delivery`.
                id_namespace: String::new(),
                on_oversize: config.outbox.on_oversize,
                // Known once the server and the stream are: see `prepare`.
                batch_publish: config.replication.batch_publish,
            },
            stats,
            connection,
            client: None,
        }
    }
}

impl Sink for NatsSink {
    type PrepareError = NatsError;
    type Error = PublishError;
    type Delivery = Publisher;

    async fn prepare(&mut self, shutdown: &Shutdown) -> Result<bool, NatsError> {
        // Connect, retrying while NATS is unreachable (it may start after us).
        let connection = &self.connection;
        let connected = retry_transient(shutdown, self.backoff, || {
            connect_with_stats(&self.nats, CONNECTION_NAME, Arc::clone(connection))
        })
        .await?;
        let Some(client) = connected else {
            return Ok(false);
        };
        // For the set-up requests only; changes go out on the publisher's own pipelined path
        // over the same connection.
        let js = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            .build(client.clone());
        // A server that restarts or elects a leader meanwhile times these requests out:
        // retried like the connect; only a configuration error, or a permission the server
        // refuses (an API subject, the inbox), ends the start.
        let (streams, format) = (&self.streams, self.settings.format);
        let checked = retry_transient(shutdown, self.backoff, || {
            unless_refused(connection, async {
                let info = ensure_streams(&js, streams).await?;
                ensure_outbox_streams(&js, streams).await?;
                check_stream_format(&js, &info.cdc, format).await?;
                Ok(info.cdc.config.allow_batch_publish)
            })
        })
        .await?;
        let Some(stream_allows_batches) = checked else {
            return Ok(false);
        };
        self.settings.batch_publish = self.settings.batch_publish
            && batches_usable(&client, &self.streams.cdc, stream_allows_batches);
        self.client = Some(client);
        Ok(true)
    }

    fn delivery(self, origin: Origin, shutdown: Shutdown) -> Result<Publisher, PublishError> {
        // Only reachable without a client when `prepare` was skipped: nothing was sent.
        let Some(client) = self.client else {
            return Err(PublishError::ClientClosed { pending: 0 });
        };
        let settings = PublisherSettings {
            id_namespace: origin.id_namespace,
            ..self.settings
        };
        Ok(Publisher::new(client, settings, self.stats, shutdown)
            .with_connection_events(self.connection))
    }
}

/// Whether backlogs can go as fast-ingest batches: the server is 2.14 or later and the CDC
/// stream allows them. Says why not when they cannot, since batches were asked for.
fn batches_usable(client: &Client, stream: &str, stream_allows: bool) -> bool {
    let version = client.server_info().version;
    if !publisher::server_has_fast_batches(&version) {
        log::info!(
            "nats-server {version} has no fast-ingest batches (2.14 or later): every change gets a PubAck of its own"
        );
        return false;
    }
    if !stream_allows {
        log::info!(
            "stream '{stream}' does not allow fast-ingest batches: every change gets a PubAck of its own (allow them with `nats stream edit {stream} --allow-batch`, or set allow_batched in the stream's configuration)"
        );
        return false;
    }
    log::info!("backlogs go to stream '{stream}' as fast-ingest batches");
    true
}

/// Runs `attempt` until it succeeds, retrying what a retry may fix (NATS unreachable, a
/// request timed out) after `backoff` with a warning; a configuration error is returned at
/// once, and `Ok(None)` means shutdown came first.
async fn retry_transient<T, F, Fut>(
    shutdown: &Shutdown,
    backoff: Duration,
    mut attempt: F,
) -> Result<Option<T>, NatsError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, NatsError>>,
{
    loop {
        // Raced with shutdown: an attempt can wait up to the connect timeout, and the
        // supervisor stops the sink this way when PostgreSQL's set-up fails meanwhile.
        let Some(result) = shutdown.run_until(attempt()).await else {
            return Ok(None);
        };
        match result {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.is_configuration() => return Err(e),
            Err(_) if shutdown.is_triggered() => return Ok(None),
            Err(e) => {
                log::warn!("{e}; retrying in {}s", backoff.as_secs());
                shutdown.sleep(backoff).await;
            }
        }
    }
}
