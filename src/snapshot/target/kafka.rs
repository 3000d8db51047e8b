//! Snapshots into Kafka init topics (see [`super`]): `{prefix}.pgbridge.init.{table}`, one
//! partition (created so when missing; records always go to partition 0), holding each
//! snapshot's chunks and then its meta record. Records are produced by an idempotent
//! producer with `acks=all` (the sink's client settings), one producer per snapshot.
//!
//! Every record carries the headers `pgbridge-id` (`snap-{id}-{chunk}`, `meta-{id}`) and
//! `pgbridge-op` ([`SNAPSHOT_CHUNK_OP`] or [`SNAPSHOT_META_OP`]); records have no key. The
//! meta carries, instead of NATS' `cdc_stream_seq`, the CDC topic (`cdc_topic`) and its end
//! offset of each partition (`cdc_offsets`), read before the snapshot's slot exists.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::sink::kafka::topics::Admin;
use crate::sink::kafka::{client_config, consumer_config};
use crate::telemetry::counters::NatsStats;
use crate::wire::fields;
use crate::wire::kafka::{
    init_topic, ID_HEADER, INIT_TOPIC_INFIX, OP_HEADER, SNAPSHOT_CHUNK_OP, SNAPSHOT_META_OP,
};

use super::super::chunks::{is_failure_document, SnapshotFailure};
use super::{AckWindow, InitTarget, InitWriter, LastMeta};

/// Bytes of chunks whose delivery report may be outstanding at once, in records of the
/// largest size the topic takes: four (a chunk is at most about half of one, so at least
/// eight chunks; Kafka batches them, so more than NATS' two help).
const IN_FLIGHT_MAX_RECORDS: usize = 4;
/// How long one metadata, offsets or read request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reading an init topic for its last meta may take in all.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// librdkafka's default `message.max.bytes`, the producer's limit on one record.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// What a record batch holding one record adds to it, at most (batch header and framing).
const BATCH_OVERHEAD: usize = 128;
/// How long to wait for the partitions of a new topic to get a leader.
const LEADER_WAIT: Duration = Duration::from_secs(30);
/// Between two looks for a leader.
const LEADER_RETRY: Duration = Duration::from_millis(200);
/// The partition every init record goes to.
const PARTITION: i32 = 0;

/// Init topics on the brokers of `kafka`.
pub(in crate::snapshot) struct KafkaInit {
    kafka: KafkaConfig,
    rt: tokio::runtime::Handle,
    admin: Admin,
}

impl KafkaInit {
    /// Init topics for `kafka`'s brokers; admin requests run on `rt`. `connection` is the
    /// sink's broker connection flag: one flag, and one log line when the brokers go away.
    pub(in crate::snapshot) fn new(
        kafka: &KafkaConfig,
        rt: tokio::runtime::Handle,
        connection: Arc<NatsStats>,
    ) -> Result<Self, crate::sink::kafka::KafkaSinkError> {
        let admin = Admin::new(kafka, connection)?;
        Ok(KafkaInit {
            kafka: kafka.clone(),
            rt,
            admin,
        })
    }

    fn init_topic(&self, schema: &str, table: &str) -> String {
        init_topic(&self.kafka.topic_prefix, schema, table)
    }

    fn consumer(&self) -> Result<BaseConsumer, String> {
        consumer_config(&self.kafka)
            .create()
            .map_err(|e| format!("Kafka consumer: {e}"))
    }

    /// The records of partition 0 of `topic` from `from` up to `to` (excluded), in order:
    /// `f` gets each one's `pgbridge-op` header and value.
    fn read(
        &self,
        consumer: &BaseConsumer,
        topic: &str,
        from: i64,
        to: i64,
        mut f: impl FnMut(Option<&str>, Option<&[u8]>),
    ) -> Result<(), String> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, PARTITION, Offset::Offset(from))
            .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + READ_TIMEOUT;
        let mut next = from;
        while next < to {
            if Instant::now() >= deadline {
                return Err(format!(
                    "reading {topic} took more than {READ_TIMEOUT:?} (at offset {next} of {to})"
                ));
            }
            let Some(m) = consumer.poll(REQUEST_TIMEOUT) else {
                continue;
            };
            let m = m.map_err(|e| format!("reading {topic}: {e}"))?;
            next = m.offset() + 1;
            let op = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == OP_HEADER)
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
            });
            f(op, m.payload());
        }
        Ok(())
    }
}

/// What a request refused as `in_progress` waits for: the meta is a record of the table's
/// init topic, not a NATS message.
fn awaited_meta(init_topic: &str) -> String {
    format!("its meta record on Kafka topic {init_topic}")
}

impl InitTarget for KafkaInit {
    fn awaited_meta(&self, schema: &str, table: &str) -> String {
        awaited_meta(&self.init_topic(schema, table))
    }

    fn name(&self) -> String {
        format!(
            "Kafka topics {}.{INIT_TOPIC_INFIX}.*",
            self.kafka.topic_prefix
        )
    }

    fn meta_location(&self, schema: &str, table: &str) -> (String, String) {
        (
            format!("Kafka topic {}", self.init_topic(schema, table)),
            "its last meta record".into(),
        )
    }

    fn last_meta(&self, schema: &str, table: &str) -> Result<LastMeta, String> {
        let topic = self.init_topic(schema, table);
        if self
            .admin
            .partitions_of(&topic)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Ok(LastMeta::Missing);
        }
        let consumer = self.consumer()?;
        let (low, high) = watermarks(&consumer, &topic, PARTITION)
            .map_err(|e| format!("offsets of {topic}: {e}"))?;
        let classify = |value: Option<&[u8]>| match value {
            Some(v) if is_failure_document(v) => LastMeta::Failed,
            _ => LastMeta::Finished,
        };
        let mut last = LastMeta::Missing;
        if high <= low {
            return Ok(last);
        }
        // A meta ends every snapshot that ended: the last record is one, unless a bridge
        // stopped mid-snapshot; only then is the whole topic read.
        self.read(&consumer, &topic, high - 1, high, |op, value| {
            if op == Some(SNAPSHOT_META_OP) {
                last = classify(value);
            }
        })?;
        if last == LastMeta::Missing && high - 1 > low {
            self.read(&consumer, &topic, low, high - 1, |op, value| {
                if op == Some(SNAPSHOT_META_OP) {
                    last = classify(value);
                }
            })?;
        }
        Ok(last)
    }

    fn open<'a>(
        &'a self,
        schema: &str,
        table: &str,
    ) -> Result<Box<dyn InitWriter + 'a>, SnapshotFailure> {
        let topic = self.init_topic(schema, table);
        let (_, topic_max) = self
            .rt
            .block_on(self.admin.ensure_with(&topic, Some(1), &[]))
            .map_err(|e| SnapshotFailure::InitTopic {
                topic: topic.clone(),
                reason: e.to_string(),
            })?;
        let producer_max = self
            .kafka
            .properties
            .expose()
            .find(|(k, _)| *k == "message.max.bytes")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        let limit = topic_max.map_or(producer_max, |t| t.min(producer_max));
        let mut config = client_config(&self.kafka);
        // A batch larger than the topic accepts is refused whole.
        if limit < DEFAULT_MESSAGE_MAX_BYTES {
            config.set(
                "batch.size",
                limit.saturating_sub(BATCH_OVERHEAD).max(1).to_string(),
            );
        }
        let producer: ThreadedProducer<Reports> =
            config
                .create_with_context(Reports)
                .map_err(|e| SnapshotFailure::InitTopic {
                    topic: topic.clone(),
                    reason: format!("the Kafka client refuses its configuration: {e}"),
                })?;
        Ok(Box::new(KafkaWriter {
            target: self,
            cdc_topic: crate::wire::kafka::topic(&self.kafka.topic_prefix, schema, table),
            out: KafkaOut { topic, producer },
            max: limit.saturating_sub(BATCH_OVERHEAD),
            in_flight: AckWindow::new(limit.saturating_mul(IN_FLIGHT_MAX_RECORDS)),
        }))
    }
}

/// A partition's low and high watermarks. Retried for a while: the partitions of a topic
/// created moments ago have no leader yet.
fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
) -> Result<(i64, i64), rdkafka::error::KafkaError> {
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        match consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT) {
            Ok(w) => return Ok(w),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                log::debug!("offsets of {topic} partition {partition}: {e}; retrying");
                std::thread::sleep(LEADER_RETRY);
            }
        }
    }
}

/// The producer's context: each record's delivery report goes to the channel it carries.
struct Reports;

impl ClientContext for Reports {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                log::error!("librdkafka {fac} (snapshots): {log_message}")
            }
            _ => log::debug!("librdkafka {fac} (snapshots): {log_message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        log::debug!("Kafka (snapshots): {error}: {reason}");
    }

    /// The sink's settings ask for statistics (its context reads broker states from them);
    /// the default would log each at info level.
    fn stats(&self, _: rdkafka::Statistics) {}
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<SyncSender<Result<(), String>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, tx: Self::DeliveryOpaque) {
        let _ = tx.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string()));
    }
}

/// A record produced and its delivery report to come.
type Pending = Receiver<Result<(), String>>;

/// One snapshot into its init topic.
struct KafkaWriter<'a> {
    target: &'a KafkaInit,
    out: KafkaOut,
    cdc_topic: String,
    max: usize,
    in_flight: AckWindow<Pending>,
}

/// Producing to the init topic, apart from the window so both can be borrowed at once.
struct KafkaOut {
    topic: String,
    producer: ThreadedProducer<Reports>,
}

impl KafkaOut {
    fn produce(&self, id: &str, op: &str, payload: &[u8]) -> Result<Pending, SnapshotFailure> {
        let (tx, rx) = sync_channel(1);
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: ID_HEADER,
                value: Some(id),
            })
            .insert(Header {
                key: OP_HEADER,
                value: Some(op),
            });
        let record: BaseRecord<'_, (), [u8], _> =
            BaseRecord::with_opaque_to(&self.topic, Box::new(tx))
                .partition(PARTITION)
                .payload(payload)
                .headers(headers);
        self.producer
            .send(record)
            .map_err(|(e, _)| SnapshotFailure::Produce {
                topic: self.topic.clone(),
                reason: e.to_string(),
            })?;
        Ok(rx)
    }

    fn wait(&self, pending: Pending, timeout: Duration) -> Result<(), SnapshotFailure> {
        let failed = |reason: String| SnapshotFailure::Produce {
            topic: self.topic.clone(),
            reason,
        };
        match pending.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(failed(e)),
            Err(_) => Err(failed(format!("no delivery report within {timeout:?}"))),
        }
    }
}

impl InitWriter for KafkaWriter<'_> {
    fn cdc_position(&mut self) -> Result<Vec<(&'static str, serde_json::Value)>, SnapshotFailure> {
        let failed = |reason: String| SnapshotFailure::CdcOffsets {
            topic: self.cdc_topic.clone(),
            reason,
        };
        // Created now when missing (with the sink's partition count), so that its offsets
        // exist: consumers then read it from the start.
        let (partitions, _) = self
            .target
            .rt
            .block_on(self.target.admin.ensure(&self.cdc_topic))
            .map_err(|e| failed(e.to_string()))?;
        let consumer = self.target.consumer().map_err(failed)?;
        let mut offsets = serde_json::Map::new();
        for p in 0..partitions as i32 {
            let (_, high) = watermarks(&consumer, &self.cdc_topic, p)
                .map_err(|e| failed(format!("partition {p}: {e}")))?;
            offsets.insert(p.to_string(), high.into());
        }
        Ok(vec![
            (fields::CDC_TOPIC, self.cdc_topic.clone().into()),
            (fields::CDC_OFFSETS, offsets.into()),
        ])
    }

    fn max_payload(&self) -> usize {
        self.max
    }

    fn row_too_large(&self, table: String, row: u64, key: String, size: usize) -> SnapshotFailure {
        SnapshotFailure::RowTooLargeForKafka {
            table,
            row,
            key,
            size,
            max: self.max,
            topic: self.out.topic.clone(),
        }
    }

    fn send_chunk(
        &mut self,
        id: &str,
        chunk: u64,
        payload: bytes::Bytes,
    ) -> Result<(), SnapshotFailure> {
        let out = &self.out;
        self.in_flight.send(
            payload.len(),
            |pending, timeout| out.wait(pending, timeout),
            || out.produce(&format!("snap-{id}-{chunk}"), SNAPSHOT_CHUNK_OP, &payload),
        )
    }

    fn send_meta(
        &mut self,
        id: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), SnapshotFailure> {
        // The meta says the snapshot is complete: only once every chunk is stored.
        let out = &self.out;
        self.in_flight
            .drain(|pending, timeout| out.wait(pending, timeout))?;
        let pending = out.produce(&format!("meta-{id}"), SNAPSHOT_META_OP, &payload)?;
        out.wait(pending, timeout)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_refused_request_waits_for_the_meta_record() {
        assert_eq!(
            super::awaited_meta(&super::init_topic("cdc", "public", "users")),
            "its meta record on Kafka topic cdc.pgbridge.init.users"
        );
    }
}
