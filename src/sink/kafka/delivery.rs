//! The Kafka [`Delivery`]: turns each change into its records, produces them through an
//! idempotent producer and reports, as the driver's watermark, the first change whose records
//! do not all have a successful delivery report yet.
//!
//! Order per key: one key always goes to one partition, and the idempotent producer keeps a
//! partition's records in the order they were produced, also across its internal retries.
//! A delivery error (a record timed out after `message.timeout.ms`, or the producer failed
//! fatally) stops new changes; once every record still in flight has its report, the producer
//! is replaced by a fresh one, and the window is produced again in the original order from its
//! first record without a successful report, including the records behind it that were stored
//! meanwhile. Records may so be stored twice (at least once), and the last record of every key
//! is always its latest change.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::config::{Format, KafkaConfig, OnOversize};
use crate::pg::Lsn;
use crate::shutdown::Shutdown;
use crate::sink::driver::{Delivery, Feed, Progress, Ticket};
use crate::telemetry::counters::{NatsStats, PublisherStats};
use crate::wire::encode::debezium::{encode_debezium_key, encode_debezium_value, DebeziumOptions};
use crate::wire::encode::{encode_change_in, CommitText};
use crate::wire::event::{ChangeEvent, Operation};
use crate::wire::id::MessageIds;
use crate::wire::kafka::{
    push_key, split_key_change, topic, ID_HEADER, KEY_CHANGE_DELETE_SUFFIX,
    KEY_CHANGE_INSERT_SUFFIX, OP_HEADER, TOMBSTONE_OP,
};
use crate::wire::outbox::OutboxEvent;

use super::topics::Admin;
use super::{check_refusal, client_config, stop_if_refused, Context, KafkaSinkError};

mod outbox;
mod transactions;

pub(crate) use transactions::ExactlyOnce;
use transactions::{Admit, Txns};

/// At shutdown, how long to keep waiting while Kafka does not confirm.
const SHUTDOWN_RETRY_LIMIT: Duration = Duration::from_secs(30);
/// First wait before producing the window again after a failure; doubles up to
/// [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest wait between two attempts.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Longest single wait for a delivery report, so that shutdown is looked at.
const REPORT_WAIT: Duration = Duration::from_secs(1);
/// Before a commit, how long to wait for the producer to let go of the last reported record
/// (it does so right after the report), or before recovering from a refused position record.
const COMMIT_WAIT: Duration = Duration::from_millis(1);
/// Longest wait for a new topic's metadata before its first record (the topic was just found
/// or created, so Kafka answers at once unless it went away meanwhile).
const LEARN_TOPIC_TIMEOUT: Duration = Duration::from_secs(1);
/// What a record batch holding one record adds to the record's key, value and headers, at
/// most (batch header 61 bytes, record framing and varints).
const BATCH_OVERHEAD: usize = 128;
/// librdkafka's default `batch.size`.
const DEFAULT_BATCH_SIZE: usize = 1_000_000;

/// What [`super::KafkaSink`] hands over.
pub(crate) struct Settings {
    pub(crate) kafka: KafkaConfig,
    pub(crate) format: Format,
    /// Write change events in Debezium's envelope (value and key) instead of `format`'s.
    pub(crate) debezium: Option<DebeziumOptions>,
    /// What a change too large for Kafka becomes (outbox events always become dead letters).
    pub(crate) on_oversize: OnOversize,
    pub(crate) max_in_flight: usize,
    pub(crate) max_in_flight_bytes: u64,
    pub(crate) id_namespace: String,
    pub(crate) stats: Arc<PublisherStats>,
    pub(crate) connection: Arc<NatsStats>,
    pub(crate) shutdown: Shutdown,
    /// Set with `--kafka-exactly-once`: a transactional producer (see [`transactions`]).
    pub(crate) exactly_once: Option<ExactlyOnce>,
}

/// A delivery report, tagged with the record it is about.
struct Report {
    generation: u64,
    ticket: Ticket,
    index: u32,
    result: Result<(), KafkaError>,
}

/// The producer's context: the client context plus the way reports reach the delivery.
pub(crate) struct ProducerCtx {
    base: Context,
    reports: UnboundedSender<Report>,
    stats: Arc<PublisherStats>,
}

impl ClientContext for ProducerCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        self.base.error(error, reason)
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.base.log(level, fac, log_message)
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        self.base.stats(statistics)
    }
}

impl ProducerContext for ProducerCtx {
    /// (generation, ticket, record index, when produced).
    type DeliveryOpaque = Box<(u64, Ticket, u32, Instant)>;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: Self::DeliveryOpaque) {
        let (generation, ticket, index, produced) = *tag;
        let micros = produced.elapsed().as_micros() as u64;
        self.stats.delivery_reports.fetch_add(1, Ordering::Relaxed);
        self.stats
            .delivery_report_micros
            .fetch_add(micros, Ordering::Relaxed);
        self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        let result = match result {
            Ok(_) => {
                self.base.set_connected(true);
                Ok(())
            }
            Err((e, _)) => Err(e.clone()),
        };
        // The receiver is gone only when the delivery ended: nothing waits for the report.
        let _ = self.reports.send(Report {
            generation,
            ticket,
            index,
            result,
        });
    }
}

/// One record of a change.
struct Record {
    topic: Arc<str>,
    /// Set for a truncate's per-partition records; otherwise the key chooses.
    partition: Option<i32>,
    key: Option<Bytes>,
    value: Option<Bytes>,
    id: Arc<str>,
    /// The [`OP_HEADER`] of a change's record.
    op: Option<&'static str>,
    /// Headers besides the id and the operation (outbox events, dead letters), Kafka names.
    headers: Vec<(String, String)>,
    lane: Lane,
    /// A successful delivery report arrived.
    done: bool,
}

/// What a record is: it decides whether a record too large for Kafka becomes a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Change,
    Outbox,
    Dead,
}

/// A change of the window: its records, kept until all are delivered.
struct Entry {
    ticket: Ticket,
    table: String,
    records: Vec<Record>,
    /// Records without a successful report.
    pending: usize,
    bytes: u64,
    /// The commit LSN of the change's transaction.
    commit_lsn: Lsn,
    /// Set on the last change of a transaction under exactly-once delivery: its end.
    end: Option<Lsn>,
}

/// The Kafka half of the sink (see the [module docs](self)).
pub(crate) struct KafkaDelivery {
    settings: Settings,
    /// Writes the message ids; its prefix `{namespace}:` starts every one.
    ids: MessageIds,
    admin: Admin,
    producer: Option<ThreadedProducer<ProducerCtx>>,
    reports_tx: UnboundedSender<Report>,
    reports: UnboundedReceiver<Report>,
    /// Bumped with every new producer: reports of an older one are ignored.
    generation: u64,
    /// Records produced by the current producer without a report yet.
    outstanding: usize,
    window: VecDeque<Entry>,
    window_bytes: u64,
    next_ticket: Ticket,
    /// Set at a delivery error: nothing new is produced until the window was produced again.
    recovering: bool,
    backoff: Duration,
    last_error: Option<String>,
    failing_since: Option<Instant>,
    /// A change no retry can deliver.
    fatal: Option<KafkaSinkError>,
    /// Each table's topic name.
    tables: HashMap<(Arc<str>, Arc<str>), Arc<str>>,
    /// Each topic known to exist: its partition count and `max.message.bytes`.
    topics: HashMap<Arc<str>, (usize, Option<usize>)>,
    /// The smallest `max.message.bytes` of the topics: producers build no larger batches.
    batch_limit: Option<usize>,
    /// Records refused as too large that become dead letters: (ticket, record index, reason).
    oversize: Vec<(Ticket, u32, String)>,
    key_buf: Vec<u8>,
    value_buf: Vec<u8>,
    /// The commit text of the transaction being encoded.
    commit_text: CommitText,
    scratch: (Vec<u8>, Vec<u8>),
    /// Exactly-once delivery's state; `None` at least once.
    eos: Option<Txns>,
}

impl KafkaDelivery {
    pub(crate) fn new(settings: Settings) -> Result<Self, KafkaSinkError> {
        let admin = Admin::new(&settings.kafka, Arc::clone(&settings.connection))?;
        let (reports_tx, reports) = unbounded_channel();
        let eos = settings
            .exactly_once
            .clone()
            .map(|ids| Txns::new(ids, &settings.kafka.topic_prefix));
        let mut d = KafkaDelivery {
            ids: MessageIds::new(&settings.id_namespace),
            settings,
            admin,
            producer: None,
            reports_tx,
            reports,
            generation: 0,
            outstanding: 0,
            window: VecDeque::new(),
            window_bytes: 0,
            next_ticket: 0,
            recovering: false,
            backoff: RETRY_MIN,
            last_error: None,
            failing_since: None,
            fatal: None,
            tables: HashMap::new(),
            topics: HashMap::new(),
            batch_limit: None,
            oversize: Vec::new(),
            key_buf: Vec::with_capacity(64),
            value_buf: Vec::with_capacity(4096),
            commit_text: CommitText::default(),
            scratch: (Vec::new(), Vec::new()),
            eos,
        };
        // A transactional producer is created at the first change (see `transactions`).
        if d.eos.is_none() {
            d.new_producer()?;
        }
        Ok(d)
    }

    fn new_producer(&mut self) -> Result<(), KafkaSinkError> {
        // The old one has no record in flight any more (see `delivered`).
        self.producer = None;
        self.settings.stats.queue_depth.store(0, Ordering::Relaxed);
        self.generation += 1;
        self.outstanding = 0;
        let ctx = ProducerCtx {
            base: Context {
                connection: Arc::clone(&self.settings.connection),
            },
            reports: self.reports_tx.clone(),
            stats: Arc::clone(&self.settings.stats),
        };
        let mut config = client_config(&self.settings.kafka);
        if let Some(t) = &self.eos {
            config.set("transactional.id", t.ids.transactional_id());
        }
        if let Some(limit) = self.batch_limit.filter(|&l| l < DEFAULT_BATCH_SIZE) {
            // A batch larger than a topic accepts is refused whole, with the error of a too
            // large record, also when every record in it would fit.
            config.set(
                "batch.size",
                limit.saturating_sub(BATCH_OVERHEAD).max(1).to_string(),
            );
        }
        let producer = config
            .create_with_context(ctx)
            .map_err(KafkaSinkError::Config)?;
        self.producer = Some(producer);
        Ok(())
    }

    /// Has the producer learn a topic it is about to write to for the first time: its
    /// partitions and leaders. Left to find them at its first record there, librdkafka waits
    /// for its next metadata refresh, up to a second before the first change after a start is
    /// stored. Only an optimisation: bounded by [`LEARN_TOPIC_TIMEOUT`], a failure is ignored.
    fn learn_topic(&self, topic: &str) {
        if let Some(p) = &self.producer {
            if let Err(e) = p.client().fetch_metadata(Some(topic), LEARN_TOPIC_TIMEOUT) {
                log::debug!("metadata of Kafka topic {topic}: {e}");
            }
        }
    }

    /// The topic of a table (see [`Self::topic_named`]).
    async fn topic_of(&mut self, ev: &ChangeEvent) -> Result<(Arc<str>, usize), KafkaSinkError> {
        let key = (Arc::clone(&ev.table.schema), Arc::clone(&ev.table.table));
        let name = match self.tables.get(&key) {
            Some(name) => Arc::clone(name),
            None => {
                let name: Arc<str> = Arc::from(topic(
                    &self.settings.kafka.topic_prefix,
                    &ev.table.schema,
                    &ev.table.table,
                ));
                self.tables.insert(key, Arc::clone(&name));
                name
            }
        };
        self.topic_named(name).await
    }

    /// The topic `name` and its partition count, created when missing; retried (with one
    /// warning) while Kafka cannot answer, until shutdown has waited long enough.
    async fn topic_named(&mut self, name: Arc<str>) -> Result<(Arc<str>, usize), KafkaSinkError> {
        if let Some((name, (partitions, _))) = self.topics.get_key_value(&name) {
            return Ok((Arc::clone(name), *partitions));
        }
        let mut warned = false;
        let since = Instant::now();
        loop {
            match self.admin.ensure(&name).await {
                Ok((partitions, max_bytes)) => {
                    if warned {
                        log::info!("Kafka topic {name} is ready");
                    }
                    let partitions = partitions.max(1);
                    self.learn_topic(&name);
                    self.topics
                        .insert(Arc::clone(&name), (partitions, max_bytes));
                    if let Some(m) = max_bytes {
                        self.batch_limit = Some(self.batch_limit.map_or(m, |b| b.min(m)));
                    }
                    return Ok((name, partitions));
                }
                Err(e) => {
                    stop_if_refused(
                        &self.settings.connection,
                        &e,
                        &format!("finding or creating topic {name}"),
                    )?;
                    if !warned {
                        log::warn!("cannot find or create Kafka topic {name}: {e}; retrying (PostgreSQL keeps the WAL meanwhile)");
                        warned = true;
                    }
                    if self.settings.shutdown.is_triggered()
                        && since.elapsed() > SHUTDOWN_RETRY_LIMIT
                    {
                        return Err(KafkaSinkError::NotDrained {
                            pending: self.window.len(),
                            last_error: e.to_string(),
                        });
                    }
                    tokio::time::sleep(RETRY_MAX).await;
                }
            }
        }
    }

    /// The records of one change (see [`crate::wire::kafka`]).
    fn records(&mut self, ev: &ChangeEvent, topic: &Arc<str>, partitions: usize) -> Vec<Record> {
        let format = self.settings.format;
        let base_id: Arc<str> = Arc::from(self.ids.id(ev.timeline, ev.commit_lsn, ev.seq));
        let mut out = Vec::with_capacity(2);
        let tombstones = self.settings.kafka.tombstones;
        let (a, b) = (&mut self.scratch.0, &mut self.scratch.1);
        if let Some((delete, insert)) = split_key_change(format, ev, (a, b)) {
            let del_id: Arc<str> = Arc::from(format!("{base_id}{KEY_CHANGE_DELETE_SUFFIX}"));
            let ins_id: Arc<str> = Arc::from(format!("{base_id}{KEY_CHANGE_INSERT_SUFFIX}"));
            self.row_records(&delete, topic, del_id, tombstones, &mut out);
            self.row_records(&insert, topic, ins_id, tombstones, &mut out);
            return out;
        }
        if ev.operation == Operation::Truncate {
            self.encode_value(ev);
            let value = Bytes::copy_from_slice(&self.value_buf);
            for p in 0..partitions {
                out.push(Record {
                    topic: Arc::clone(topic),
                    partition: Some(p as i32),
                    key: None,
                    value: Some(value.clone()),
                    id: Arc::clone(&base_id),
                    op: Some(Operation::Truncate.as_lower()),
                    headers: Vec::new(),
                    lane: Lane::Change,
                    done: false,
                });
            }
            return out;
        }
        self.row_records(ev, topic, base_id, tombstones, &mut out);
        out
    }

    /// The record of an INSERT, UPDATE or DELETE, and a DELETE's tombstone.
    fn row_records(
        &mut self,
        ev: &ChangeEvent,
        topic: &Arc<str>,
        id: Arc<str>,
        tombstones: bool,
        out: &mut Vec<Record>,
    ) {
        let has_key = match &self.settings.debezium {
            Some(opts) => encode_debezium_key(opts, ev, &mut self.key_buf),
            None => push_key(
                self.settings.format,
                &ev.table.key_columns,
                &ev.columns,
                ev.old_columns.as_deref(),
                &mut self.key_buf,
            ),
        };
        let key = has_key.then(|| Bytes::copy_from_slice(&self.key_buf));
        self.encode_value(ev);
        out.push(Record {
            topic: Arc::clone(topic),
            partition: None,
            key: key.clone(),
            value: Some(Bytes::copy_from_slice(&self.value_buf)),
            id: Arc::clone(&id),
            op: Some(ev.operation.as_lower()),
            headers: Vec::new(),
            lane: Lane::Change,
            done: false,
        });
        if ev.operation == Operation::Delete && tombstones && key.is_some() {
            out.push(Record {
                topic: Arc::clone(topic),
                partition: None,
                key,
                value: None,
                id,
                op: Some(TOMBSTONE_OP),
                headers: Vec::new(),
                lane: Lane::Change,
                done: false,
            });
        }
    }

    /// A change's value: the change event, or with the Debezium envelope Debezium's.
    fn encode_value(&mut self, ev: &ChangeEvent) {
        match &self.settings.debezium {
            Some(opts) => encode_debezium_value(
                opts,
                ev,
                crate::wire::text::now_unix_micros(),
                &mut self.value_buf,
            ),
            None => encode_change_in(
                self.settings.format,
                ev,
                &mut self.commit_text,
                &mut self.value_buf,
            ),
        }
    }

    /// Produces record `index` of the entry at `at`; a record the client refuses for its size
    /// stops delivery, any other refusal starts recovery.
    fn produce(&mut self, at: usize, index: usize) {
        let Some(producer) = &self.producer else {
            return;
        };
        let entry = &self.window[at];
        let r = &entry.records[index];
        if let Some(limit) = self.topics.get(&r.topic).and_then(|t| t.1) {
            let size = record_size(r) + BATCH_OVERHEAD;
            if size > limit {
                let reason = format!("topic {} accepts at most {limit} bytes", r.topic);
                self.refused_as_too_large(at, index, &reason);
                return;
            }
        }
        let mut headers = OwnedHeaders::new_with_capacity(2 + r.headers.len()).insert(Header {
            key: ID_HEADER,
            value: Some(r.id.as_bytes()),
        });
        if let Some(op) = r.op {
            headers = headers.insert(Header {
                key: OP_HEADER,
                value: Some(op.as_bytes()),
            });
        }
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let tag = Box::new((self.generation, entry.ticket, index as u32, Instant::now()));
        let mut record: BaseRecord<'_, [u8], [u8], _> =
            BaseRecord::with_opaque_to(&r.topic, tag).headers(headers);
        if let Some(k) = &r.key {
            record = record.key(&k[..]);
        }
        if let Some(v) = &r.value {
            record = record.payload(&v[..]);
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        match producer.send(record) {
            Ok(()) => {
                self.outstanding += 1;
                self.settings
                    .stats
                    .queue_depth
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                if is_too_large(&e) {
                    self.refused_as_too_large(at, index, &e.to_string());
                } else {
                    self.failed(&e);
                }
            }
        }
    }

    fn too_large(&self, at: usize, index: usize, reason: &str) -> KafkaSinkError {
        let entry = &self.window[at];
        let r = &entry.records[index];
        KafkaSinkError::TooLarge {
            table: entry.table.clone(),
            topic: r.topic.to_string(),
            size: r.value.as_ref().map_or(0, Bytes::len) + r.key.as_ref().map_or(0, Bytes::len),
            message_id: r.id.to_string(),
            reason: reason.to_owned(),
        }
    }

    /// A record was not stored: no new changes until the window was produced again.
    fn failed(&mut self, e: &KafkaError) {
        self.settings
            .stats
            .publish_errors
            .fetch_add(1, Ordering::Relaxed);
        if !self.recovering {
            log::warn!(
                "Kafka did not store a record: {e}; producing the {} unconfirmed changes again, in order, with a new producer (PostgreSQL keeps the WAL meanwhile)",
                self.window.len()
            );
        }
        self.recovering = true;
        self.last_error = Some(e.to_string());
        self.failing_since.get_or_insert_with(Instant::now);
        self.settings.stats.stalled.store(true, Ordering::Relaxed);
    }

    fn apply(&mut self, report: Report) {
        if report.generation != self.generation {
            return;
        }
        self.outstanding = self.outstanding.saturating_sub(1);
        let Some(front) = self.window.front() else {
            return;
        };
        let Some(at) = report
            .ticket
            .checked_sub(front.ticket)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        if at >= self.window.len() {
            return;
        }
        match report.result {
            Ok(()) => {
                let entry = &mut self.window[at];
                if let Some(r) = entry.records.get_mut(report.index as usize) {
                    if !r.done {
                        r.done = true;
                        entry.pending -= 1;
                    }
                }
            }
            Err(e) if is_too_large(&e) => {
                // The broker refused a record: the Kafka transaction can only be aborted,
                // and the window produced again (with the dead letter in its place).
                if self.eos.is_some() {
                    self.failed(&e);
                }
                let index = report.index as usize;
                let Some(r) = self.window[at].records.get(index) else {
                    return;
                };
                let fits = self
                    .topics
                    .get(&r.topic)
                    .and_then(|t| t.1)
                    .is_some_and(|limit| record_size(r) + BATCH_OVERHEAD <= limit);
                if fits {
                    // Refused with a batch too large as a whole: produced again, by a
                    // producer that builds smaller batches.
                    self.failed(&e);
                } else {
                    self.refused_as_too_large(at, index, &e.to_string());
                }
            }
            Err(e) => self.failed(&e),
        }
    }

    /// Produces the window again, in order, with a fresh producer: from the first record
    /// without a successful report on, every record, also those stored meanwhile. A record
    /// of the same key stored after the failed one (a producer that bumped its epoch goes on
    /// with the records behind a timed-out one) is so stored again after it: the key's last
    /// record is its latest change again.
    async fn reproduce(&mut self) -> Result<(), KafkaSinkError> {
        if self.settings.shutdown.sleep(self.backoff).await {
            self.check_shutdown()?;
        }
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
        self.new_producer()?;
        self.recovering = false;
        let mut resending = false;
        for at in 0..self.window.len() {
            for index in 0..self.window[at].records.len() {
                resending |= !self.window[at].records[index].done;
                if resending && !self.recovering {
                    self.produce(at, index);
                }
            }
        }
        Ok(())
    }

    fn check_shutdown(&self) -> Result<(), KafkaSinkError> {
        let stuck = !self.window.is_empty()
            && (self.recovering || !self.settings.connection.is_connected());
        if self.settings.shutdown.is_triggered() && stuck {
            let since = self.failing_since.unwrap_or_else(Instant::now);
            if since.elapsed() > SHUTDOWN_RETRY_LIMIT {
                return Err(KafkaSinkError::NotDrained {
                    pending: self.window.len(),
                    last_error: self
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "no Kafka broker reachable".into()),
                });
            }
        }
        Ok(())
    }

    /// Adds a change's records to the window and produces them (unless recovering: then they
    /// are produced with the rest of the window).
    async fn push_entry(
        &mut self,
        table: String,
        records: Vec<Record>,
        commit_lsn: Lsn,
    ) -> Result<Ticket, KafkaSinkError> {
        let bytes = records
            .iter()
            .map(|r| r.value.as_ref().map_or(0, Bytes::len) as u64)
            .sum();
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let n = records.len();
        self.window.push_back(Entry {
            ticket,
            table,
            pending: n,
            records,
            bytes,
            commit_lsn,
            end: None,
        });
        self.window_bytes += bytes;
        self.admitted(ticket, false, bytes);
        let at = self.window.len() - 1;
        for index in 0..n {
            if self.recovering {
                break;
            }
            self.produce(at, index);
        }
        self.reroute().await?;
        match self.fatal.take() {
            Some(e) => Err(e),
            None => Ok(ticket),
        }
    }

    /// A change already in Kafka (exactly once): an entry without records, delivered as soon
    /// as everything before it is.
    fn push_skipped(&mut self, table: String, commit_lsn: Lsn) -> Ticket {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.window.push_back(Entry {
            ticket,
            table,
            pending: 0,
            records: Vec::new(),
            bytes: 0,
            commit_lsn,
            end: None,
        });
        self.admitted(ticket, true, 0);
        ticket
    }

    /// Room for one more change, by the window's bounds.
    fn window_has_room(&self) -> bool {
        self.window.len() < self.settings.max_in_flight
            && (self.window_bytes < self.settings.max_in_flight_bytes || self.window.is_empty())
    }

    /// Removes the delivered changes at the front of the window: fully reported ones, or
    /// under exactly-once delivery committed ones.
    fn complete(&mut self) -> Progress {
        let mut bytes = 0;
        if let Some(below) = self.eos.as_ref().map(|t| t.committed_below) {
            bytes = self.committed_front(below);
        }
        while self.eos.is_none() && self.window.front().is_some_and(|e| e.pending == 0) {
            if let Some(done) = self.window.pop_front() {
                bytes += done.bytes;
                self.window_bytes -= done.bytes;
            }
        }
        if bytes > 0 && self.failing_since.take().is_some() {
            self.backoff = RETRY_MIN;
            self.last_error = None;
            self.settings.stats.stalled.store(false, Ordering::Relaxed);
            log::info!("Kafka confirms deliveries again");
        }
        Progress {
            below: self.window.front().map_or(self.next_ticket, |e| e.ticket),
            duplicates: 0,
            bytes,
        }
    }
}

/// The bytes of a record's key, value and headers.
fn record_size(r: &Record) -> usize {
    r.key.as_ref().map_or(0, Bytes::len)
        + r.value.as_ref().map_or(0, Bytes::len)
        + ID_HEADER.len()
        + r.id.len()
        + r.op.map_or(0, |op| OP_HEADER.len() + op.len())
        + r.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

fn is_too_large(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
}

impl KafkaDelivery {
    /// Waits for delivery reports and applies every one that arrived. `long`: up to
    /// [`REPORT_WAIT`]; otherwise, when no report is to be expected (the producer still holds
    /// the last one, or the commit failed), only [`COMMIT_WAIT`].
    async fn await_reports(&mut self, long: bool) {
        let wait = if long || (self.outstanding > 0 && !self.recovering) {
            REPORT_WAIT
        } else {
            COMMIT_WAIT
        };
        tokio::select! {
            biased;
            report = self.reports.recv() => {
                if let Some(r) = report {
                    self.apply(r);
                    while let Ok(r) = self.reports.try_recv() {
                        self.apply(r);
                    }
                }
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

impl Delivery for KafkaDelivery {
    type Error = KafkaSinkError;

    async fn open(&mut self) -> Result<(), KafkaSinkError> {
        Ok(())
    }

    fn ready(&self) -> bool {
        !self.recovering && self.fatal.is_none()
    }

    fn room(&self) -> bool {
        if self.recovering || self.fatal.is_some() {
            return false;
        }
        match &self.eos {
            // A Kafka transaction ends only with a PostgreSQL one: the window takes all of it.
            Some(t) if t.in_pg_txn => true,
            Some(t) => self.window_has_room() && !t.full() && !t.closing(),
            None => self.window_has_room(),
        }
    }

    async fn send(&mut self, ev: &ChangeEvent) -> Result<Ticket, KafkaSinkError> {
        let table = format!("{}.{}", ev.table.schema, ev.table.table);
        if let Admit::Skip = self.admit(ev.commit_lsn).await? {
            return Ok(self.push_skipped(table, ev.commit_lsn));
        }
        let (topic, partitions) = self.topic_of(ev).await?;
        let records = self.records(ev, &topic, partitions);
        self.push_entry(table, records, ev.commit_lsn).await
    }

    async fn send_outbox(&mut self, ev: &OutboxEvent) -> Result<Ticket, KafkaSinkError> {
        if let Admit::Skip = self.admit(ev.commit_lsn).await? {
            return Ok(self.push_skipped("outbox".into(), ev.commit_lsn));
        }
        let (origin, record) = self.outbox_record(ev).await?;
        self.push_entry(origin, vec![record], ev.commit_lsn).await
    }

    fn transaction_end(&mut self, end_lsn: Lsn) {
        self.eos_transaction_end(end_lsn);
    }

    async fn delivered(&mut self, feed: Feed<'_>) -> Result<Progress, KafkaSinkError> {
        if let Some(e) = self.fatal.take() {
            return Err(e);
        }
        // The brokers refused the bridge's user: resending cannot help until that changes.
        check_refusal(&self.settings.connection)?;
        self.check_shutdown()?;
        if !self.settings.connection.is_connected() && !self.window.is_empty() {
            self.failing_since.get_or_insert_with(Instant::now);
        }
        let committing = self.commit_due(feed.waiting()) || (!feed.open() && self.commit_due(0));
        if self.eos.is_some() && self.recovering {
            self.recover_transaction().await?;
        } else if committing && self.commit_ready() {
            self.commit();
        } else if committing {
            // The transaction's records are still on their way: their reports are awaited
            // here, not inside the commit call, which would block for 100 ms at a time.
            self.await_reports(false).await;
        } else if self.eos.is_some() && feed.waiting() > 0 && self.room() {
            // Changes wait that notify no more: the driver takes them first.
        } else if self.recovering && self.outstanding == 0 {
            self.reproduce().await?;
        } else if !self.window.is_empty() || self.recovering {
            let can_feed = !self.recovering && feed.open() && self.room();
            tokio::select! {
                biased;
                () = self.await_reports(true) => {}
                () = feed.more(), if can_feed => {}
            }
        }
        self.reroute().await?;
        if let Some(e) = self.fatal.take() {
            return Err(e);
        }
        Ok(self.complete())
    }

    async fn close(&mut self) -> Result<(), KafkaSinkError> {
        if let Some(p) = &self.producer {
            let _ = p.flush(Duration::from_secs(10));
        }
        Ok(())
    }

    fn stats(&self) -> &Arc<PublisherStats> {
        &self.settings.stats
    }
}
