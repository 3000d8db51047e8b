//! The Kafka sink: an idempotent librdkafka producer (`enable.idempotence=true`, `acks=all`)
//! that writes each change as the records of [`crate::wire::kafka`], and the topics it needs
//! (`topics.rs`). The delivering half is [`delivery::KafkaDelivery`].
//!
//! At least once: a position is confirmed only once every record up to the transaction's end
//! has a successful delivery report. Duplicates (after a crash, or a resend after a failed
//! report) carry the same `pgbridge-id` header and key. Exactly once (`--kafka-exactly-once`):
//! a transactional producer and the positions topic (`delivery/transactions.rs`,
//! `positions.rs`).

mod delivery;
mod positions;
pub(crate) mod topics;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{NoCustomPartitioner, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::replication::Envelope;
use crate::config::{Config, Format, KafkaConfig, OnOversize};
use crate::pg::Lsn;
use crate::shutdown::Shutdown;
use crate::telemetry::counters::{NatsStats, PublisherStats};
use crate::wire::encode::debezium::DebeziumOptions;

pub(crate) use delivery::{ExactlyOnce, KafkaDelivery};

use super::{Origin, Sink};

/// How long one metadata or admin request may take before it is retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the Kafka sink stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    /// librdkafka refused the configuration (an unknown or invalid property).
    #[error("the Kafka client refuses its configuration: {0} (check --kafka-property / [kafka.properties])")]
    Config(#[source] KafkaError),
    /// A record is larger than the broker or the topic accepts; skipping it would lose data.
    #[error(
        "a change of {table} ({size} bytes encoded, message id {message_id}) is larger than Kafka accepts ({reason}): raise message.max.bytes on the broker or max.message.bytes on the topic {topic} (and the producer's message.max.bytes with --kafka-property); the change stays in PostgreSQL's WAL until it can be delivered"
    )]
    TooLarge {
        /// `schema.table`.
        table: String,
        /// The topic.
        topic: String,
        /// Encoded size of the record's value.
        size: usize,
        /// The change's message id.
        message_id: String,
        /// What the client or broker said.
        reason: String,
    },
    /// Exactly once: the positions record of this bridge's key does not fit the server, so
    /// skipping up to it would lose changes.
    #[error("exactly once: positions topic {topic} holds position {end_lsn} (timeline {timeline}) for key {key}, {why}; skipping every transaction up to {end_lsn} would lose changes, so the bridge stops (nothing was sent to Kafka); if that record is stale, delete it (a tombstone: key {key}, null value, on {topic}) or start with another --topic-prefix (docs/operations.md, Exactly once)")]
    UntrustedPosition {
        /// The positions topic.
        topic: String,
        /// The record's key.
        key: String,
        /// The record's `end_lsn`.
        end_lsn: Lsn,
        /// The record's timeline.
        timeline: u32,
        /// What the server says and what that means.
        why: String,
    },
    /// The brokers refused the bridge's user: wrong SASL credentials, or an ACL missing.
    #[error("{0}")]
    Refused(String),
    /// Shutdown came while Kafka did not confirm delivery.
    #[error("stopped with {pending} changes not confirmed by Kafka (they will be sent again on the next start): {last_error}")]
    NotDrained {
        /// Changes still waiting for their delivery reports.
        pending: usize,
        /// The last delivery error.
        last_error: String,
    },
}

impl KafkaSinkError {
    /// True for errors a change of configuration (or of the state in Kafka) must fix (exit
    /// code 2).
    pub(crate) fn is_configuration(&self) -> bool {
        matches!(
            self,
            KafkaSinkError::Config(_)
                | KafkaSinkError::UntrustedPosition { .. }
                | KafkaSinkError::Refused(_)
        )
    }
}

/// Errors that mean the brokers will not serve the bridge's user until its credentials or
/// ACLs change: the SASL handshake failed, or an authorization (the idempotent producer's
/// id, a topic, the transactional id) was refused.
fn is_refusal(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
    )
}

/// The client context: turns librdkafka's global errors into one log line per change of the
/// broker connection, and keeps the connection flag `/health` reads.
pub(crate) struct Context {
    connection: Arc<NatsStats>,
}

impl Context {
    fn set_connected(&self, up: bool) {
        if self.connection.connected.swap(up, Ordering::Relaxed) != up {
            // Counted as NATS counts its connection (`sink_reconnect_count` of `/status`):
            // a loss, and a return after one.
            if up {
                if self.connection.disconnects() > 0 {
                    self.connection.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                log::info!("Kafka brokers reachable again; delivering");
            } else {
                self.connection.disconnects.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "no Kafka broker reachable; retrying (PostgreSQL keeps the WAL meanwhile)"
                );
            }
            self.connection.changed.notify_waiters();
        }
    }
}

/// Records a refusal of the bridge's user in `connection` (logged at most once a minute):
/// the start, or the delivery at its next step, stops on it with exit code 2.
fn record_refusal(connection: &NatsStats, error: &KafkaError, reason: &str) {
    let line = format!(
        "Kafka refused the bridge's user: {error}: {reason}; check the SASL credentials \
         (sasl.username, sasl.password in --kafka-property) and the user's ACLs: the bridge \
         produces idempotently (with --kafka-exactly-once, transactionally) to its topics \
         and creates those missing"
    );
    connection.record_refusal(line);
}

/// The refusal `connection` recorded, if any, as the sink's error.
pub(crate) fn check_refusal(connection: &NatsStats) -> Result<(), KafkaSinkError> {
    match connection.refused.get() {
        Some(line) => Err(KafkaSinkError::Refused(line.clone())),
        None => Ok(()),
    }
}

/// For a request that failed with `error` while `doing` it: when the brokers refused the
/// bridge's user (now, or earlier on another client of the connection), that refusal as the
/// sink's error, since no retry gets further.
pub(crate) fn stop_if_refused(
    connection: &NatsStats,
    error: &KafkaError,
    doing: &str,
) -> Result<(), KafkaSinkError> {
    if error.rdkafka_error_code().is_some_and(is_refusal) {
        record_refusal(connection, error, doing);
    }
    check_refusal(connection)
}

/// For the start's probe, which produces nothing.
impl ProducerContext<NoCustomPartitioner> for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => self.set_connected(false),
            // Single connection losses are retried by librdkafka and show as AllBrokersDown
            // when nothing is left.
            Some(RDKafkaErrorCode::BrokerTransportFailure) => {
                log::debug!("Kafka: {error}: {reason}")
            }
            // The positions reader asks for the end of its partition.
            Some(RDKafkaErrorCode::PartitionEOF) => log::debug!("Kafka: {error}: {reason}"),
            Some(code) if is_refusal(code) => record_refusal(&self.connection, &error, reason),
            _ => log::warn!("Kafka client: {error}: {reason}"),
        }
    }

    /// A broker librdkafka reached again shows as UP here before any record is delivered, so
    /// `/health` recovers while the database is idle too.
    fn stats(&self, statistics: rdkafka::Statistics) {
        if !self.connection.is_connected()
            && statistics
                .brokers
                .values()
                .any(|b| b.nodeid >= 0 && b.state == "UP")
        {
            self.set_connected(true);
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            // A failed connection to one broker (FAIL) is retried by librdkafka, and on a
            // cluster its partitions move to other brokers: a warning, not an error (a rolling
            // restart would log errors otherwise). Losing every broker is reported by
            // `Context::error`.
            L::Emerg | L::Alert | L::Critical | L::Error if fac == "FAIL" => {
                log::warn!("librdkafka {fac}: {log_message}")
            }
            L::Emerg | L::Alert | L::Critical | L::Error => {
                log::error!("librdkafka {fac}: {log_message}")
            }
            L::Warning => log::debug!("librdkafka {fac}: {log_message}"),
            _ => log::trace!("librdkafka {fac}: {log_message}"),
        }
    }
}

/// The client configuration of the producer and the admin client: the user's properties, the
/// brokers, and what at-least-once delivery needs.
pub(crate) fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    // Librdkafka's own logs go through `Context::log`, filtered by level.
    c.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
    for (k, v) in kafka.properties.expose() {
        c.set(k, v);
    }
    c.set("bootstrap.servers", kafka.brokers.join(","));
    c.set("enable.idempotence", "true");
    c.set("acks", "all");
    if !kafka.properties.0.contains_key("client.id") {
        c.set("client.id", "pgbridge");
    }
    // Broker states for `Context::stats`.
    if !kafka.properties.0.contains_key("statistics.interval.ms") {
        c.set("statistics.interval.ms", "5000");
    }
    c
}

/// The client configuration of a consumer that reads the bridge's own topics (the snapshot
/// service reads offsets and init topics): the user's properties (SASL, TLS) and the brokers,
/// without the producer's settings, no group membership and no committed offsets.
pub(crate) fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
    for (k, v) in kafka.properties.expose() {
        // Producer properties would be warned about and ignored by a consumer.
        if !PRODUCER_ONLY.contains(&k) {
            c.set(k, v);
        }
    }
    c.set("bootstrap.servers", kafka.brokers.join(","));
    c.set("group.id", "pgbridge-snapshots");
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    // Committed snapshots only, also when the CDC topic is written transactionally.
    c.set("isolation.level", "read_committed");
    if !kafka.properties.0.contains_key("client.id") {
        c.set("client.id", "pgbridge-snapshots");
    }
    c
}

/// Properties users set for the producer that a consumer does not know.
const PRODUCER_ONLY: &[&str] = &[
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "linger.ms",
    "queue.buffering.max.ms",
    "batch.size",
    "batch.num.messages",
    "compression.type",
    "compression.codec",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "retries",
    "message.send.max.retries",
    "transactional.id",
    "transaction.timeout.ms",
    "max.in.flight",
    "max.in.flight.requests.per.connection",
    "partitioner",
];

/// The Kafka sink: checks the brokers are reachable before any WAL is read, then delivers
/// through a [`KafkaDelivery`].
pub(crate) struct KafkaSink {
    kafka: KafkaConfig,
    format: Format,
    debezium: Option<DebeziumOptions>,
    on_oversize: OnOversize,
    max_in_flight: usize,
    max_in_flight_bytes: u64,
    backoff: Duration,
    stats: Arc<PublisherStats>,
    connection: Arc<NatsStats>,
    /// `--kafka-exactly-once`: delivery is transactional, named after the [`Origin`].
    exactly_once: bool,
}

impl KafkaSink {
    /// A sink for `config`'s brokers, counting in `stats` and keeping the broker connection's
    /// state in `connection`.
    pub(crate) fn new(
        config: &Config,
        stats: Arc<PublisherStats>,
        connection: Arc<NatsStats>,
    ) -> Self {
        KafkaSink {
            kafka: config.kafka.clone(),
            format: config.replication.format,
            // Debezium's `topic.prefix` is the prefix of its topics.
            debezium: (config.replication.envelope == Envelope::Debezium).then(|| {
                DebeziumOptions {
                    name: config.kafka.topic_prefix.clone(),
                    db: config.postgres.dbname.clone(),
                    schemas: config.replication.debezium_schemas,
                }
            }),
            on_oversize: config.outbox.on_oversize,
            max_in_flight: config.replication.max_in_flight,
            max_in_flight_bytes: config.replication.max_in_flight_bytes,
            backoff: config.replication.reconnect_backoff(),
            stats,
            connection,
            exactly_once: config.kafka.exactly_once,
        }
    }
}

impl Sink for KafkaSink {
    type PrepareError = KafkaSinkError;
    type Error = KafkaSinkError;
    type Delivery = KafkaDelivery;

    async fn prepare(&mut self, shutdown: &Shutdown) -> Result<bool, KafkaSinkError> {
        // A producer's client, not the admin client: its thread serves the client's events, so
        // a refused SASL handshake reaches `Context::error` and ends the start.
        let probe: ThreadedProducer<Context> = client_config(&self.kafka)
            .create_with_context(Context {
                connection: Arc::clone(&self.connection),
            })
            .map_err(KafkaSinkError::Config)?;
        // Reachable before any WAL is read: nothing could be delivered otherwise.
        let mut warned = false;
        loop {
            let brokers = probe
                .client()
                .fetch_metadata(None, REQUEST_TIMEOUT)
                .map(|md| md.brokers().len());
            match brokers {
                Ok(n) => {
                    log::info!(
                        "Kafka reachable ({n} broker{}); topics {}.*",
                        if n == 1 { "" } else { "s" },
                        self.kafka.topic_prefix
                    );
                    self.connection.connected.store(true, Ordering::Relaxed);
                    return Ok(true);
                }
                Err(e) => {
                    // Refused credentials: no retry gets further.
                    check_refusal(&self.connection)?;
                    if !warned {
                        log::warn!(
                            "Kafka brokers {} not reachable: {e}; retrying every {}s",
                            self.kafka.brokers.join(","),
                            self.backoff.as_secs()
                        );
                        warned = true;
                    }
                    if shutdown.sleep(self.backoff).await {
                        return Ok(false);
                    }
                }
            }
        }
    }

    fn delivery(self, origin: Origin, shutdown: Shutdown) -> Result<KafkaDelivery, KafkaSinkError> {
        KafkaDelivery::new(delivery::Settings {
            kafka: self.kafka,
            format: self.format,
            debezium: self.debezium,
            on_oversize: self.on_oversize,
            max_in_flight: self.max_in_flight,
            max_in_flight_bytes: self.max_in_flight_bytes,
            stats: self.stats,
            connection: self.connection,
            shutdown,
            exactly_once: self.exactly_once.then_some(ExactlyOnce {
                system_identifier: origin.system_id,
                slot: origin.slot,
                server: origin.server,
            }),
            id_namespace: origin.id_namespace,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_consumer_keeps_the_connection_settings_and_drops_the_producer_ones() {
        let mut kafka = KafkaConfig {
            brokers: vec!["k1:9092".into(), "k2:9092".into()],
            ..KafkaConfig::default()
        };
        for (k, v) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.username", "u"),
            ("linger.ms", "5"),
            ("compression.type", "zstd"),
        ] {
            kafka.properties.0.insert(k.into(), v.into());
        }
        let c = consumer_config(&kafka);
        assert_eq!(c.get("bootstrap.servers"), Some("k1:9092,k2:9092"));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("sasl.username"), Some("u"));
        assert_eq!(c.get("linger.ms"), None);
        assert_eq!(c.get("compression.type"), None);
        assert_eq!(c.get("acks"), None);
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
    }
}
