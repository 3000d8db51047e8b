//! The publisher: takes changes off the ring, encodes them, publishes them to JetStream with
//! their deterministic message ids, and keeps a bounded window of PubAcks in flight.
//!
//! Acks are collected in publish order. When every message of a transaction (and of every
//! transaction before it) is acknowledged, the transaction's commit `end_lsn` becomes the
//! durable position, which the wal thread reports to PostgreSQL. A failed publish (timeout,
//! NATS down) is retried with the same message id, so JetStream stores it once however often
//! it is sent within the duplicate window.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use async_nats::Subject;
use bytes::Bytes;

use crate::config::Format;
use crate::pg::pgoutput::pg_to_unix_micros;
use crate::pg::Lsn;
use crate::pipeline::durable::DurableLsn;
use crate::pipeline::event::{ChangeEvent, Operation, TableRef};
use crate::pipeline::wal::RingItem;
use crate::shutdown::Shutdown;

use super::encode::encode_change;
use super::subject::change_subject;

/// How long a PubAck (and a JetStream API request) may take before the publish is retried.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before republishing after a failure; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between republish attempts.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long the publisher sleeps when the ring is empty and nobody wakes it.
const IDLE_WAIT: Duration = Duration::from_millis(20);
/// At shutdown, how long to keep retrying when JetStream does not acknowledge.
const SHUTDOWN_RETRY_LIMIT: Duration = Duration::from_secs(30);
/// Most tables whose subjects are kept (a schema change gives a table a new entry).
const SUBJECT_CACHE_TABLES: usize = 4096;

/// Why the publisher stopped.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A change is larger than the server accepts; publishing it would need a bigger
    /// `max_payload`, and skipping it would lose data.
    #[error(
        "a change of {table} ({size} bytes encoded, message id {message_id}) exceeds the NATS server's max_payload of {max} bytes: raise max_payload in the nats-server configuration (the change stays in PostgreSQL's WAL until it can be published)"
    )]
    TooLarge {
        /// `schema.table`.
        table: String,
        /// Encoded size.
        size: usize,
        /// The server's limit.
        max: usize,
        /// The change's message id.
        message_id: String,
    },
    /// Shutdown came while JetStream was not acknowledging; what is not acknowledged was not
    /// confirmed to PostgreSQL and is sent again on the next start.
    #[error("stopped with {pending} messages not acknowledged by JetStream (they will be sent again on the next start): {last_error}")]
    NotDrained {
        /// Messages still waiting for a PubAck.
        pending: usize,
        /// The last publish error.
        last_error: String,
    },
}

/// Publisher counters, shared with telemetry.
#[derive(Debug, Default)]
pub struct PublisherStats {
    /// Messages acknowledged as newly stored.
    pub published: AtomicU64,
    /// Messages acknowledged as duplicates (already stored within the duplicate window).
    pub duplicates: AtomicU64,
    /// Payload bytes acknowledged.
    pub bytes: AtomicU64,
    /// Failed publish attempts (each retried).
    pub publish_errors: AtomicU64,
    /// Messages waiting for a PubAck now.
    pub in_flight: AtomicU64,
    /// True while JetStream does not acknowledge (the oldest publish is being retried).
    pub stalled: AtomicBool,
    /// Commit time → PubAck latency, observed per acknowledged message.
    pub commit_to_ack: Option<prometheus::Histogram>,
}

/// Settings of the publisher.
#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// Wire format.
    pub format: Format,
    /// Most PubAcks awaited at once.
    pub max_in_flight: usize,
    /// Subject prefix of change events (`cdc`).
    pub subject_prefix: String,
}

struct InFlight {
    subject: Subject,
    message_id: String,
    payload: Bytes,
    ack: Option<PublishAckFuture>,
    /// Set on the last message of a transaction: durable once this is acknowledged.
    commit_end: Option<Lsn>,
    /// The transaction's commit time, µs since 2000-01-01 (0: unknown).
    commit_time: i64,
}

/// The publisher loop; runs on its own thread's tokio runtime until the ring is closed
/// (End item, or the wal side dropped) and everything is acknowledged.
pub struct Publisher {
    js: Context,
    consumer: rtrb::Consumer<RingItem>,
    notify: Arc<tokio::sync::Notify>,
    durable: DurableLsn,
    settings: PublisherSettings,
    stats: Arc<PublisherStats>,
    shutdown: Shutdown,
    buf: Vec<u8>,
    window: VecDeque<InFlight>,
    subjects: SubjectCache,
    recycle: Option<rtrb::Producer<Box<ChangeEvent>>>,
}

/// The subjects of each table, built once rather than for every message. Keyed by the
/// address of the table's [`TableRef`], which the wal thread creates anew for each Relation
/// message (so a renamed table gets a new entry); the entry holds the `Arc`, so the address
/// cannot be reused by another table while it is cached.
#[derive(Default)]
struct SubjectCache {
    tables: HashMap<usize, (Arc<TableRef>, [Option<Subject>; 4])>,
}

impl SubjectCache {
    fn get(&mut self, prefix: &str, table: &Arc<TableRef>, op: Operation) -> Subject {
        if self.tables.len() >= SUBJECT_CACHE_TABLES {
            self.tables.clear();
        }
        let key = Arc::as_ptr(table) as usize;
        let (_, subjects) = self
            .tables
            .entry(key)
            .or_insert_with(|| (Arc::clone(table), Default::default()));
        let slot = match op {
            Operation::Insert => 0,
            Operation::Update => 1,
            Operation::Delete => 2,
            Operation::Truncate => 3,
        };
        subjects[slot]
            .get_or_insert_with(|| {
                Subject::from(change_subject(prefix, &table.schema, &table.table, op))
            })
            .clone()
    }
}

impl Publisher {
    /// A publisher reading `consumer` and publishing through `js`.
    pub fn new(
        js: Context,
        consumer: rtrb::Consumer<RingItem>,
        notify: Arc<tokio::sync::Notify>,
        durable: DurableLsn,
        settings: PublisherSettings,
        stats: Arc<PublisherStats>,
        shutdown: Shutdown,
    ) -> Self {
        let window = VecDeque::with_capacity(settings.max_in_flight);
        Publisher {
            js,
            consumer,
            notify,
            durable,
            settings,
            stats,
            shutdown,
            buf: Vec::with_capacity(4096),
            window,
            subjects: SubjectCache::default(),
            recycle: None,
        }
    }

    /// Gives published events back to the wal thread through `ring`, to be filled again
    /// (when the ring is full they are dropped).
    pub fn with_recycling(mut self, ring: rtrb::Producer<Box<ChangeEvent>>) -> Self {
        self.recycle = Some(ring);
        self
    }

    /// Runs until the ring is closed and drained.
    pub async fn run(mut self) -> Result<(), PublishError> {
        let mut ended = false;
        loop {
            // Fill the window from the ring.
            while self.window.len() < self.settings.max_in_flight && !ended {
                match self.consumer.pop() {
                    Ok(RingItem::Change(ev)) => {
                        self.publish_change(&ev).await?;
                        if let Some(ring) = self.recycle.as_mut() {
                            let _ = ring.push(ev);
                        }
                    }
                    Ok(RingItem::Commit { end_lsn }) => match self.window.back_mut() {
                        Some(last) => last.commit_end = Some(end_lsn),
                        None => self.durable.advance(end_lsn),
                    },
                    Ok(RingItem::End) => ended = true,
                    Err(_) => {
                        if self.consumer.is_abandoned() && self.consumer.is_empty() {
                            ended = true;
                        }
                        break;
                    }
                }
            }
            self.stats
                .in_flight
                .store(self.window.len() as u64, Ordering::Relaxed);
            if !self.window.is_empty() {
                self.complete_front().await?;
            } else if ended {
                return Ok(());
            } else {
                let _ = tokio::time::timeout(IDLE_WAIT, self.notify.notified()).await;
            }
        }
    }

    async fn publish_change(&mut self, ev: &ChangeEvent) -> Result<(), PublishError> {
        encode_change(self.settings.format, ev, &mut self.buf);
        let subject = self
            .subjects
            .get(&self.settings.subject_prefix, &ev.table, ev.operation);
        let mut entry = InFlight {
            subject,
            message_id: ev.message_id(),
            payload: Bytes::copy_from_slice(&self.buf),
            ack: None,
            commit_end: None,
            commit_time: ev.commit_time,
        };
        if let Err(e) = self.send(&mut entry).await {
            if let Some(fatal) = self.fatal(&entry, &e) {
                return Err(fatal);
            }
            // Retried when it reaches the front of the window.
            self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.window.push_back(entry);
        Ok(())
    }

    async fn send(
        &self,
        entry: &mut InFlight,
    ) -> Result<(), async_nats::jetstream::context::PublishError> {
        let publish = PublishMessage::build()
            .payload(entry.payload.clone())
            .message_id(&entry.message_id);
        let ack = self.js.send_publish(entry.subject.clone(), publish).await?;
        entry.ack = Some(ack);
        Ok(())
    }

    fn fatal(
        &self,
        entry: &InFlight,
        e: &async_nats::jetstream::context::PublishError,
    ) -> Option<PublishError> {
        (e.kind() == PublishErrorKind::MaxPayloadExceeded).then(|| PublishError::TooLarge {
            table: entry.subject.to_string(),
            size: entry.payload.len(),
            max: self.js.client().server_info().max_payload,
            message_id: entry.message_id.clone(),
        })
    }

    /// Waits for the oldest PubAck, republishing (same message id) until it succeeds.
    async fn complete_front(&mut self) -> Result<(), PublishError> {
        let mut backoff = RETRY_MIN;
        let mut failing_since: Option<Instant> = None;
        loop {
            let Some(front) = self.window.front_mut() else {
                return Ok(());
            };
            let outcome = match front.ack.take() {
                Some(ack) => ack.await,
                None => Err(async_nats::jetstream::context::PublishError::new(
                    PublishErrorKind::Other,
                )),
            };
            match outcome {
                Ok(ack) => {
                    if ack.duplicate {
                        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.stats.published.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(done) = self.window.pop_front() {
                        self.stats
                            .bytes
                            .fetch_add(done.payload.len() as u64, Ordering::Relaxed);
                        if let Some(end) = done.commit_end {
                            self.durable.advance(end);
                        }
                        self.observe_latency(done.commit_time);
                    }
                    if failing_since.is_some() {
                        self.stats.stalled.store(false, Ordering::Relaxed);
                        log::info!("JetStream acknowledges again; publishing resumes");
                    }
                    return Ok(());
                }
                Err(e) => {
                    self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                    self.stats.stalled.store(true, Ordering::Relaxed);
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if backoff == RETRY_MIN {
                        log::warn!(
                            "publish of {} ({}) not acknowledged: {e}; retrying (PostgreSQL keeps the WAL meanwhile)",
                            front.subject,
                            front.message_id
                        );
                    }
                    if self.shutdown.is_triggered() && since.elapsed() > SHUTDOWN_RETRY_LIMIT {
                        return Err(PublishError::NotDrained {
                            pending: self.window.len(),
                            last_error: e.to_string(),
                        });
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    self.republish_all().await?;
                }
            }
        }
    }

    /// Records commit → PubAck for one acknowledged message. Clock skew between the database
    /// host and this one can make it negative: counted as zero.
    fn observe_latency(&self, commit_time: i64) {
        let Some(h) = &self.stats.commit_to_ack else {
            return;
        };
        if commit_time == 0 {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let micros = now.saturating_sub(pg_to_unix_micros(commit_time)).max(0);
        h.observe(micros as f64 / 1e6);
    }

    /// After a failure every message in the window is sent again, in order: their first
    /// attempts most likely failed too, and waiting for each to time out in turn would take
    /// the ack timeout times the window. Those already stored come back as duplicates.
    async fn republish_all(&mut self) -> Result<(), PublishError> {
        let mut window = std::mem::take(&mut self.window);
        let mut result = Ok(());
        for entry in window.iter_mut() {
            entry.ack = None;
            if let Err(e) = self.send(entry).await {
                self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(fatal) = self.fatal(entry, &e) {
                    result = Err(fatal);
                    break;
                }
                // Not connected: the rest would fail the same way; retried next round.
                break;
            }
        }
        self.window = window;
        result
    }
}

/// Set when the publisher thread ends, for the wal thread to notice.
pub type PublisherDone = Arc<AtomicBool>;
