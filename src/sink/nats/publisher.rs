//! The publisher, the NATS half of delivering changes (a `Delivery`): encodes the changes
//! the driver (`crate::sink::driver`) hands it, publishes them to JetStream with their
//! deterministic message ids, and keeps a bounded window of PubAcks in flight.
//!
//! Publishing is pipelined on the client's own connection rather than going through the
//! client's JetStream request for each message (a new inbox, a oneshot channel and a JSON
//! decoder per message). The publisher subscribes once to `{inbox}.*`, an inbox of its own,
//! and sends every message as a plain publish whose reply subject is `{inbox}.{token}`, the
//! token counting messages. JetStream answers each publish on its reply subject, so the token
//! of the answer finds the message in the window; `super::puback` reads the answer.
//!
//! Acks are applied in publish order: the acknowledged front of the window is what the driver
//! sees as delivered, and from that it advances the durable position past each transaction.
//!
//! Order is enforced by the server, not by timing: every message but the first unacknowledged
//! one carries `Nats-Expected-Last-Msg-Id` with the id of the message before it, so JetStream
//! stores it only right after its predecessor. If one message is not stored (a refusal, a 503
//! during a leader change, a connection lost with it), every message behind it is refused too,
//! instead of being stored ahead of it. The duplicate check comes first on the server, so a
//! message already stored is acknowledged as a duplicate whatever it expects.
//!
//! A failed publish (a refusal, no PubAck within `ACK_TIMEOUT` of reaching the front of the
//! window, NATS down) stops the window from taking new changes. After a backoff, and once the
//! client is connected, every unacknowledged message is sent again in order from the first one,
//! with the same message id, so JetStream stores each once however often it is sent within the
//! duplicate window. New changes are taken again when the window has drained. While the client
//! is disconnected nothing new is published; when it reconnects, what was in flight on the old
//! connection is sent again at once rather than after the ack timeout.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{Client, Message, PublishErrorKind, Subscriber};
use futures_util::{FutureExt, StreamExt};

use tokio::time::Sleep;

use crate::config::{Format, OnOversize};
use crate::shutdown::Shutdown;
use crate::sink::driver::{self, Delivery, Feed, Progress, Ticket};
use crate::sink::ring::RingReader;
use crate::telemetry::counters::{DurableLsn, NatsStats, PublisherStats};
use crate::wire::encode::debezium::{encode_debezium_value, DebeziumOptions};
use crate::wire::encode::{encode_change_in, CommitText};
use crate::wire::event::ChangeEvent;
use crate::wire::id::MessageIds;
use crate::wire::outbox::{DeadReason, OutboxEvent};

mod batch;
mod buffers;
mod dead;
mod entry;

pub use batch::server_has_fast_batches;
use batch::{BatchReply, Batches};
use buffers::{Chunks, Replies, SubjectCache};
use entry::{send, InFlight, Lane, CHAINED};

use super::puback::{self, PubAckError};

/// How long the oldest message of the window waits for its PubAck before it is sent again.
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before republishing after a failure; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between republish attempts.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// While NATS is disconnected, how often the publisher looks whether it is back.
const RECONNECT_POLL: Duration = Duration::from_millis(50);
/// While disconnected with nothing in flight and shutdown requested, how often the publisher
/// looks whether it waited long enough.
const DISCONNECTED_CHECK: Duration = Duration::from_secs(1);
/// At shutdown, how long to keep retrying when JetStream does not acknowledge.
pub(crate) const SHUTDOWN_RETRY_LIMIT: Duration = Duration::from_secs(30);
/// Size of the buffers encoded payloads are copied into and cut from: one allocation serves
/// many messages, and it is freed when the last of them is acknowledged and written.
const PAYLOAD_CHUNK: usize = 16 * 1024;

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
    /// The client refuses the subject; no retry can change that.
    #[error("the NATS client refuses the subject {subject:?} of message {message_id} as invalid; the change stays in PostgreSQL's WAL (report this: subjects are built from table names, which should always give valid subjects)")]
    InvalidSubject {
        /// The subject.
        subject: String,
        /// The change's message id.
        message_id: String,
    },
    /// The subscription PubAcks arrive on could not be made.
    #[error("cannot subscribe to the PubAck inbox: {0}")]
    AckInbox(#[source] async_nats::SubscribeError),
    /// The NATS client ended (its connection task stopped), so no PubAck can arrive any more.
    #[error("the NATS client closed with {pending} messages not acknowledged by JetStream (they will be sent again on the next start)")]
    ClientClosed {
        /// Messages still waiting for a PubAck.
        pending: usize,
    },
}

/// Settings of the publisher.
#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// Wire format.
    pub format: Format,
    /// Write change events in Debezium's envelope (JSON) instead of `format`'s event.
    pub debezium: Option<DebeziumOptions>,
    /// Most PubAcks awaited at once.
    pub max_in_flight: usize,
    /// Most payload bytes awaiting a PubAck at once (one message always goes, however big).
    pub max_in_flight_bytes: u64,
    /// Subject prefix of change events (`cdc`).
    pub subject_prefix: String,
    /// Namespace of the message ids (`{namespace}:{timeline}:{commit_lsn}-{seq}`).
    pub id_namespace: String,
    /// What a change event larger than the server accepts does.
    pub on_oversize: OnOversize,
    /// Send backlogs of change events as fast-ingest batches: set only when the server
    /// (2.14 or later) and the CDC stream (`allow_batched`) take them.
    pub batch_publish: bool,
}

/// Where a message of the window stands.
enum AckState {
    /// Sent; no answer yet.
    Pending,
    /// Stored (or, when `duplicate`, found already stored).
    Acked { duplicate: bool },
    /// Not stored as far as the publisher knows: to be sent again. Boxed: rare, and every
    /// entry of the window would otherwise carry its size.
    Failed(Box<Failure>),
}

impl AckState {
    fn failed(f: Failure) -> Self {
        AckState::Failed(Box::new(f))
    }
}

/// Why a message has to be sent again.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// JetStream (or the server on its behalf) answered with an error.
    #[error(transparent)]
    Refused(#[from] PubAckError),
    /// No answer in time (a lost connection shows as this too).
    #[error("no PubAck within {}s", ACK_TIMEOUT.as_secs())]
    TimedOut,
    /// The client did not take the message.
    #[error("not sent: {0}")]
    NotSent(String),
    /// In flight when the connection was lost; its answer may never come.
    #[error("the NATS connection was lost while it was in flight")]
    Reconnected,
    /// Refused for good, and turned into its dead letter: to be sent as that.
    #[error("refused for good; sent to the dead-letter stream instead")]
    DeadLettered,
    /// Its fast-ingest batch ended before it (a message before it was refused or lost), so it
    /// was not stored.
    #[error("its fast-ingest batch ended before it")]
    BatchEnded,
}

/// The NATS `Delivery`: publishes what the driver hands it and reports the acknowledged
/// front of its window. Runs on its own thread's tokio runtime ([`Publisher::deliver`]).
pub struct Publisher {
    client: Client,
    settings: PublisherSettings,
    /// Writes the message ids; its prefix `{namespace}:` starts every one.
    ids: MessageIds,
    stats: Arc<PublisherStats>,
    shutdown: Shutdown,
    /// Encoding buffer, reused for every change.
    buf: Vec<u8>,
    /// The commit text of the transaction being encoded.
    commit_text: CommitText,
    /// Where payloads are copied to and cut from.
    payloads: Chunks,
    replies: Replies,
    next_token: u64,
    window: VecDeque<InFlight>,
    /// Since when the front of the window is the front (or was last sent): its PubAck is due
    /// [`ACK_TIMEOUT`] later.
    front_since: Instant,
    /// Set at the first failure: no new changes enter the window until it has drained.
    recovering: bool,
    /// When the current run of failures began (`None`: JetStream acknowledges).
    failing_since: Option<Instant>,
    backoff: Duration,
    subjects: SubjectCache,
    /// Connection events of the client (`None`: the connection state is asked directly).
    connection: Option<Arc<NatsStats>>,
    /// Reconnects seen so far: a new one means what was in flight has to be sent again.
    reconnects_seen: u64,
    /// Per chained stream (CDC, OUTBOX), the message id of its last message put in the
    /// window, which its next one expects to follow in the stream (`None` when the window was
    /// empty).
    last_id: [Option<String>; CHAINED],
    /// Set once another writer's message was found between two of ours.
    foreign_writer_seen: bool,
    /// Set when a message of the window became a dead letter after the ones behind it were
    /// sent: they expected it in their stream and are refused once, which is no other writer.
    rerouted: bool,
    /// Payload bytes in the window.
    window_bytes: u64,
    /// Where PubAcks arrive; subscribed by [`Delivery::open`].
    acks: Option<Subscriber>,
    /// One timer for the front's deadline, made at the first wait. Deadlines only move later,
    /// so the timer is re-armed only when it fires early, not each time the front changes.
    timer: Option<Pin<Box<Sleep>>>,
    /// Fast-ingest batches (`None`: every message gets its own PubAck).
    batches: Option<Batches>,
    /// Set once JetStream stored a message of this publisher as new. Until then messages go
    /// plainly: after a restart the first ones are replays, and only a PubAck each tells a
    /// duplicate apart (a batch's acknowledgements do not).
    armed: bool,
}

impl Publisher {
    /// A publisher publishing through `client`.
    pub fn new(
        client: Client,
        settings: PublisherSettings,
        stats: Arc<PublisherStats>,
        shutdown: Shutdown,
    ) -> Self {
        let window = VecDeque::with_capacity(settings.max_in_flight);
        let inbox = client.new_inbox();
        let replies = Replies::new(&inbox);
        // The batch ids must differ from any other publisher's, now and after a restart.
        let batches = settings.batch_publish.then(|| {
            let token = inbox.rsplit('.').next().unwrap_or("b").to_owned();
            Batches::new(&inbox, &token, settings.max_in_flight)
        });
        Publisher {
            client,
            ids: MessageIds::new(&settings.id_namespace),
            settings,
            stats,
            shutdown,
            buf: Vec::with_capacity(4096),
            commit_text: CommitText::default(),
            payloads: Chunks::new(PAYLOAD_CHUNK),
            replies,
            next_token: 0,
            window,
            front_since: Instant::now(),
            recovering: false,
            failing_since: None,
            backoff: RETRY_MIN,
            subjects: SubjectCache::default(),
            connection: None,
            reconnects_seen: 0,
            last_id: Default::default(),
            foreign_writer_seen: false,
            rerouted: false,
            window_bytes: 0,
            acks: None,
            timer: None,
            batches,
            armed: false,
        }
    }

    /// Delivers what comes through `ring` until it is closed and drained (End item, or the
    /// wal side dropped) and everything is acknowledged, advancing `durable`: the driver over
    /// this publisher.
    pub async fn deliver(self, ring: RingReader, durable: DurableLsn) -> Result<(), PublishError> {
        driver::run(self, ring, durable).await
    }

    /// Follows the client's connection events through `stats` (the ones its connect function
    /// keeps): nothing is published while disconnected, and what was in flight is sent again
    /// at once after a reconnect.
    pub(crate) fn with_connection_events(mut self, stats: Arc<NatsStats>) -> Self {
        self.reconnects_seen = stats.reconnects();
        self.connection = Some(stats);
        self
    }

    /// The client's own view: the event flag in [`NatsStats`] is set by a callback task
    /// that may run a little later, and a publisher waiting for it must not stall.
    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Takes note of the reconnects so far, when nothing is in flight that they could concern.
    fn sync_reconnects(&mut self) {
        if let Some(stats) = &self.connection {
            self.reconnects_seen = stats.reconnects();
        }
    }

    /// After a reconnect, marks every message still waiting for its answer as failed: it was
    /// sent on the lost connection, and its answer may never come.
    fn check_reconnect(&mut self) {
        let Some(stats) = &self.connection else {
            return;
        };
        let reconnects = stats.reconnects();
        if reconnects == self.reconnects_seen {
            return;
        }
        self.reconnects_seen = reconnects;
        if let Some(b) = self.batches.as_mut() {
            b.abandon();
        }
        let mut lost = 0;
        for entry in self.window.iter_mut() {
            if matches!(entry.state, AckState::Pending) {
                entry.state = AckState::failed(Failure::Reconnected);
                lost += 1;
            }
        }
        if lost > 0 {
            self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
            self.recovering = true;
            // Not the server's fault: resend at once.
            self.backoff = RETRY_MIN;
            self.failing_since.get_or_insert_with(Instant::now);
            log::info!(
                "NATS reconnected; sending the {lost} unacknowledged messages again, in order"
            );
        }
    }

    /// One wait of the delivery loop with messages in the window: sends the front again when
    /// it failed or timed out, otherwise waits for an answer, the front's deadline, a
    /// connection change or (when there is room) more changes.
    async fn wait_window(
        &mut self,
        acks: &mut Subscriber,
        feed: &Feed<'_>,
        connected: bool,
    ) -> Result<(), PublishError> {
        let Some(front) = self.window.front_mut() else {
            return Ok(());
        };
        let deadline = self.front_since + ACK_TIMEOUT;
        if matches!(front.state, AckState::Pending) && Instant::now() >= deadline {
            front.state = AckState::failed(Failure::TimedOut);
            self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
            self.recovering = true;
        }
        if matches!(front.state, AckState::Failed(_)) {
            return self.retry(acks).await;
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        if timer.is_elapsed() {
            timer.as_mut().reset(deadline.into());
        }
        let can_feed = connected
            && !self.recovering
            && feed.open()
            && self.window.len() < self.settings.max_in_flight
            && self.window_bytes < self.settings.max_in_flight_bytes;
        let connection = self.connection.clone();
        tokio::select! {
            biased;
            reply = acks.next() => match reply {
                Some(reply) => self.take_replies(&reply, acks),
                None => return Err(self.client_closed()),
            },
            () = timer.as_mut() => {}
            () = wait_connection_change(connection.as_deref()) => {}
            () = feed.more(), if can_feed => {}
        }
        Ok(())
    }

    /// The wait of the delivery loop with nothing in flight and the client disconnected:
    /// nothing is published meanwhile, so wait for the connection, unless shutdown has waited
    /// long enough.
    async fn wait_disconnected(&mut self, feed: &Feed<'_>) -> Result<(), PublishError> {
        if self.shutdown.is_triggered() {
            let since = *self.failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() > SHUTDOWN_RETRY_LIMIT {
                return Err(PublishError::NotDrained {
                    pending: feed.waiting(),
                    last_error: "the NATS connection is lost".into(),
                });
            }
        }
        // Woken by the connection or the shutdown signal; once shutdown is on, the limit above
        // is looked at again every DISCONNECTED_CHECK.
        let shutting_down = self.shutdown.is_triggered();
        let connection = self.connection.clone();
        tokio::select! {
            _ = tokio::time::timeout(
                DISCONNECTED_CHECK,
                wait_connection_change(connection.as_deref()),
            ) => {}
            () = self.shutdown.triggered(), if !shutting_down => {}
        }
        Ok(())
    }

    async fn publish_change(&mut self, ev: &ChangeEvent) -> Result<Ticket, PublishError> {
        match &self.settings.debezium {
            Some(opts) => encode_debezium_value(
                opts,
                ev,
                crate::wire::text::now_unix_micros(),
                &mut self.buf,
            ),
            None => encode_change_in(
                self.settings.format,
                ev,
                &mut self.commit_text,
                &mut self.buf,
            ),
        }
        let subject = self
            .subjects
            .get(&self.settings.subject_prefix, &ev.table, ev.operation);
        let token = self.next_token;
        self.next_token += 1;
        let (reply, batch, batch_seq) = match self.batch_place(&subject) {
            Some((number, seq, reply)) => (reply, number, seq),
            None => (self.replies.subject(token), 0, 0),
        };
        let entry = InFlight {
            token,
            subject,
            reply,
            batch,
            batch_seq,
            commit_lsn: ev.commit_lsn,
            timeline: ev.timeline,
            seq: ev.seq,
            last_in_tx: ev.last_in_tx,
            lane: Lane::Cdc,
            extra: None,
            payload: self.payloads.copy(&self.buf),
            state: AckState::Pending,
        };
        self.publish_entry(entry).await
    }

    /// The batch place of the next change event, when it goes in a fast-ingest batch: once
    /// JetStream stored one of ours as new, and while enough is in flight (or a batch is open).
    fn batch_place(
        &mut self,
        subject: &async_nats::Subject,
    ) -> Option<(u64, u64, async_nats::Subject)> {
        if !self.armed || self.recovering {
            return None;
        }
        let in_flight = self.window.len();
        self.batches.as_mut()?.next(in_flight, subject)
    }

    /// Ends the open batch with its end-of-batch marker: the server commits it and
    /// acknowledges everything in it at once. Called when no change is waiting to join it.
    async fn end_batch(&mut self) {
        let Some((subject, reply)) = self.batches.as_mut().and_then(Batches::close) else {
            return;
        };
        if let Err(e) = self
            .client
            .publish_with_reply(subject, reply, bytes::Bytes::new())
            .await
        {
            // Its messages then wait for their acknowledgement in vain and are sent again.
            log::debug!("could not end a fast-ingest batch: {e}");
        }
    }

    /// Puts `entry` into the window and sends it, after the previous message of its stream.
    async fn publish_entry(&mut self, mut entry: InFlight) -> Result<Ticket, PublishError> {
        let token = entry.token;
        let mut id = entry.message_id_from(&mut self.ids);
        // The first message of a stream in an empty window follows what is already stored;
        // every other one must follow the message of its stream before it.
        let chain = entry.lane.chain();
        let mut expect = match chain {
            Some(c) if !self.window.is_empty() => self.last_id[c].take(),
            _ => None,
        };
        let mut sent = send(&self.client, &entry, id.clone(), expect.clone()).await;
        if sent.is_err() && entry.batch != 0 {
            // Not sent, so not part of the batch: the next message takes its place, and this
            // one (or its dead letter) goes plainly.
            if let Some(b) = self.batches.as_mut() {
                b.unsend(entry.batch);
            }
            entry.batch = 0;
            entry.batch_seq = 0;
            entry.reply = self.replies.subject(entry.token);
        }
        if let Err(e) = &sent {
            if e.kind() == PublishErrorKind::MaxPayloadExceeded && self.may_dead_letter(&entry) {
                let detail = format!(
                    "{} bytes and headers exceed the server's max_payload of {} bytes",
                    entry.payload.len(),
                    super::max_payload(&self.client)
                );
                self.dead_letter(&mut entry, DeadReason::TooLarge, &detail);
                // Its own stream's chain goes on from the message before it.
                if let Some(c) = chain {
                    self.last_id[c] = expect.take();
                }
                id = entry.message_id(self.ids.prefix());
                sent = send(&self.client, &entry, id.clone(), None).await;
            }
        }
        if let Some(c) = entry.lane.chain() {
            self.last_id[c] = Some(id);
        }
        if let Err(e) = sent {
            if let Some(fatal) = self.fatal(&entry, &e) {
                return Err(fatal);
            }
            self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
            entry.state = AckState::failed(Failure::NotSent(e.to_string()));
            self.recovering = true;
        }
        if self.window.is_empty() {
            self.front_since = Instant::now();
        }
        self.window_bytes += entry.payload.len() as u64;
        self.window.push_back(entry);
        Ok(token)
    }

    fn fatal(&self, entry: &InFlight, e: &async_nats::PublishError) -> Option<PublishError> {
        match e.kind() {
            PublishErrorKind::MaxPayloadExceeded => Some(PublishError::TooLarge {
                table: entry.subject.to_string(),
                size: entry.payload.len(),
                max: super::max_payload(&self.client),
                message_id: entry.message_id(self.ids.prefix()),
            }),
            // Retrying cannot make a subject valid.
            PublishErrorKind::InvalidSubject => Some(PublishError::InvalidSubject {
                subject: entry.subject.to_string(),
                message_id: entry.message_id(self.ids.prefix()),
            }),
            PublishErrorKind::Send => None,
        }
    }

    /// Applies `first` and every further reply already waiting, without waiting for more.
    fn take_replies(&mut self, first: &Message, acks: &mut Subscriber) {
        self.take_reply(first);
        // Bounded, so a flood of replies cannot starve the ring.
        for _ in 0..self.settings.max_in_flight.max(64) {
            match acks.next().now_or_never() {
                Some(Some(reply)) => self.take_reply(&reply),
                _ => break,
            }
        }
    }

    /// Records JetStream's answer for the message its reply subject names. Answers for
    /// messages no longer in the window (late answers to an earlier attempt) are ignored; for a
    /// message sent several times, any positive answer means it is stored.
    fn take_reply(&mut self, reply: &Message) {
        let Some(token) = self.replies.token(reply.subject.as_str()) else {
            self.take_batch_reply(reply);
            return;
        };
        let Some(front) = self.window.front() else {
            return;
        };
        let Some(at) = token
            .checked_sub(front.token)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        let Some(entry) = self.window.get_mut(at) else {
            return;
        };
        if matches!(entry.state, AckState::Acked { .. }) {
            return;
        }
        match puback::read_reply(reply) {
            Ok(ack) => {
                entry.state = AckState::Acked {
                    duplicate: ack.duplicate,
                };
                self.armed |= !ack.duplicate;
            }
            Err(e) => {
                self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                // Whatever follows this message must not be stored before it.
                self.recovering = true;
                let lane = entry.lane;
                entry.state = AckState::failed(Failure::Refused(e.clone()));
                if e.is_permanent() && self.lane_may_dead_letter(lane) {
                    self.dead_letter_at(at, &e.to_string());
                }
            }
        }
    }

    /// Records the server's answer about one of this publisher's fast-ingest batches: a flow
    /// acknowledgement or the commit acknowledges its messages up to a point; a refusal, or a
    /// commit short of what was sent, fails the rest, to be sent again plainly, in order.
    fn take_batch_reply(&mut self, reply: &Message) {
        let Some((number, seq)) = self
            .batches
            .as_ref()
            .and_then(|b| b.place(reply.subject.as_str()))
        else {
            return;
        };
        match batch::read_reply(reply, seq) {
            BatchReply::Stored { seq } => self.ack_batch(number, seq),
            BatchReply::Committed { count } => {
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.ack_batch(number, count);
                self.fail_batch(number, count + 1, None);
            }
            // Informational: the commit that follows says what was stored.
            BatchReply::Gap => {}
            // The server dropped the batch (no message for its batch timeout: the bridge was
            // paused, or its connection stalled). What it stored of the batch beyond the last
            // flow acknowledgement will never be acknowledged, so everything of the batch still
            // waiting goes again at once, plainly and in order: JetStream drops what it has as
            // duplicates.
            // Said once: the batch's later refusals find nothing of it waiting.
            BatchReply::Refused { error, .. } if error.is_unknown_batch() => {
                if self.fail_batch(number, 1, None) > 0 {
                    log::warn!(
                        "nats-server no longer knows this bridge's fast-ingest batch ({error}): it \
                         drops a batch that gets no message for its batch timeout (10 s by default; \
                         was the bridge paused, or the connection stalled?); sending the batch's \
                         unacknowledged changes again, in order"
                    );
                }
            }
            BatchReply::Refused { seq, error } => {
                self.fail_batch(number, seq, Some(error));
            }
        }
    }

    /// Batch `number`'s messages up to `seq` are stored.
    fn ack_batch(&mut self, number: u64, seq: u64) {
        if let Some(b) = self.batches.as_mut() {
            b.acked(number, seq);
        }
        for entry in self.window.iter_mut().filter(|e| e.batch == number) {
            if entry.batch_seq > seq {
                break;
            }
            if !matches!(entry.state, AckState::Acked { .. }) {
                entry.state = AckState::Acked { duplicate: false };
            }
        }
    }

    /// Batch `number` ended before its message `seq`: that one is refused with `error` (if
    /// given), and none after it is stored. Marks those still waiting as failed, to be sent
    /// again plainly. A reply about messages no longer waiting (late, or about the end
    /// marker) changes nothing. Returns how many waiting messages it failed.
    fn fail_batch(&mut self, number: u64, seq: u64, error: Option<PubAckError>) -> usize {
        let mut refused_at = None;
        let mut failed = 0;
        for (at, entry) in self.window.iter_mut().enumerate() {
            if entry.batch != number
                || entry.batch_seq < seq
                || !matches!(entry.state, AckState::Pending)
            {
                continue;
            }
            let failure = match &error {
                Some(e) if entry.batch_seq == seq => {
                    refused_at = Some(at);
                    Failure::Refused(e.clone())
                }
                _ => Failure::BatchEnded,
            };
            entry.state = AckState::failed(failure);
            failed += 1;
        }
        if failed == 0 {
            return 0;
        }
        if let Some(b) = self.batches.as_mut() {
            if b.open.as_ref().is_some_and(|o| o.number == number) {
                b.abandon();
            }
        }
        self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
        self.recovering = true;
        if let Some(e) = error.as_ref().filter(|e| e.refuses_batches()) {
            log::warn!(
                "the CDC stream refuses fast-ingest batches ({e}): sending every change with a PubAck of its own from now on"
            );
            self.batches = None;
        }
        if let (Some(e), Some(at)) = (error, refused_at) {
            let lane = self.window[at].lane;
            if e.is_permanent() && self.lane_may_dead_letter(lane) {
                self.dead_letter_at(at, &e.to_string());
            }
        }
        failed
    }

    /// Removes the acknowledged messages at the front of the window: what the driver sees as
    /// delivered.
    fn complete_acked(&mut self) -> Progress {
        let (mut duplicates, mut bytes, mut popped) = (0u64, 0u64, 0u64);
        while let Some(AckState::Acked { duplicate }) = self.window.front().map(|e| &e.state) {
            duplicates += u64::from(*duplicate);
            let Some(done) = self.window.pop_front() else {
                break;
            };
            popped += 1;
            bytes += done.payload.len() as u64;
            self.window_bytes -= done.payload.len() as u64;
        }
        let progress = Progress {
            below: self.window.front().map_or(self.next_token, |e| e.token),
            duplicates,
            bytes,
        };
        if popped == 0 {
            return progress;
        }
        if self.window.is_empty() {
            // Drained: new changes may enter again, the first one following what is stored.
            self.recovering = false;
            self.rerouted = false;
            self.last_id = Default::default();
        }
        self.front_since = Instant::now();
        if self.failing_since.take().is_some() {
            self.backoff = RETRY_MIN;
            self.stats.stalled.store(false, Ordering::Relaxed);
            log::info!("JetStream acknowledges again; publishing resumes");
        }
        progress
    }

    /// The front of the window failed: waits out the backoff (still taking answers in, since a
    /// late PubAck makes the resend unnecessary) and until the client is connected, then sends
    /// every unacknowledged message again, in order.
    async fn retry(&mut self, acks: &mut Subscriber) -> Result<(), PublishError> {
        self.recovering = true;
        let mut immediate = false;
        if let Some(InFlight {
            state: AckState::Failed(e),
            subject,
            ..
        }) = self.window.front()
        {
            match &**e {
                // Another writer stored a message between the front's predecessor (stored
                // and acknowledged) and the front: nothing failed, send it again at once.
                Failure::Refused(r) if r.is_wrong_last_msg_id() => {
                    immediate = true;
                    if !self.foreign_writer_seen && !self.rerouted {
                        self.foreign_writer_seen = true;
                        log::warn!(
                            "another writer stores messages into the stream of {subject} ({r}); \
                             pgbridge keeps its own changes in commit order, but each interleaved \
                             message costs a resend: give each bridge a stream of its own"
                        );
                    }
                }
                // Sent again plainly, which the stream takes.
                Failure::Refused(r) if r.refuses_batches() => immediate = true,
                Failure::Reconnected | Failure::DeadLettered | Failure::BatchEnded => {
                    immediate = true
                }
                _ => {}
            }
        }
        if immediate {
            return self.republish().await;
        }
        self.stats.stalled.store(true, Ordering::Relaxed);
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if self.backoff == RETRY_MIN {
            if let Some(front) = self.window.front() {
                if let AckState::Failed(e) = &front.state {
                    log::warn!(
                        "publish of {} ({}) not acknowledged: {e}; retrying (PostgreSQL keeps the WAL meanwhile)",
                        front.subject,
                        front.message_id(self.ids.prefix())
                    );
                }
            }
        }
        let backoff_end = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
        let connection = self.connection.clone();
        loop {
            match self.window.front() {
                Some(InFlight {
                    state: AckState::Failed(e),
                    ..
                }) => {
                    if self.shutdown.is_triggered() && since.elapsed() > SHUTDOWN_RETRY_LIMIT {
                        return Err(PublishError::NotDrained {
                            pending: self.window.len(),
                            last_error: e.to_string(),
                        });
                    }
                }
                // Answered meanwhile: nothing to resend from here.
                _ => return Ok(()),
            }
            let now = Instant::now();
            // Sent while disconnected, messages would only pile up in the client's queue.
            let connected = self.is_connected();
            if now >= backoff_end && connected {
                break;
            }
            let wake = if now >= backoff_end {
                now + RECONNECT_POLL
            } else {
                backoff_end
            };
            tokio::select! {
                biased;
                reply = acks.next() => match reply {
                    Some(reply) => self.take_replies(&reply, acks),
                    None => return Err(self.client_closed()),
                },
                () = wait_connection_change(connection.as_deref()) => {}
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        // A reconnect during the wait: what was in flight on the old connection goes again.
        self.check_reconnect();
        self.republish().await
    }

    /// Sends every message of the window that is not acknowledged again, in order, each but
    /// the first expecting the one before it. Stops at the first one the client does not take:
    /// what follows it must not overtake it.
    async fn republish(&mut self) -> Result<(), PublishError> {
        let mut window = std::mem::take(&mut self.window);
        let mut result = Ok(());
        // Resent messages go plainly, each with its own PubAck, until the window drained.
        if let Some(b) = self.batches.as_mut() {
            b.abandon();
        }
        // Per stream, every message before its first unacknowledged one is stored: that one
        // needs no expectation. Dead letters are not chained.
        let mut prev: [Option<String>; CHAINED] = Default::default();
        let mut first = [true; CHAINED];
        for entry in window.iter_mut() {
            let id = entry.message_id(self.ids.prefix());
            let chain = entry.lane.chain();
            if matches!(entry.state, AckState::Acked { .. }) {
                if let Some(c) = chain.filter(|&c| !first[c]) {
                    prev[c] = Some(id);
                }
                continue;
            }
            let expect = chain.and_then(|c| {
                let expect = if first[c] { None } else { prev[c].take() };
                first[c] = false;
                prev[c] = Some(id.clone());
                expect
            });
            if entry.batch != 0 {
                entry.batch = 0;
                entry.batch_seq = 0;
                entry.reply = self.replies.subject(entry.token);
            }
            match send(&self.client, entry, id, expect).await {
                Ok(()) => entry.state = AckState::Pending,
                Err(e) => {
                    self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(fatal) = self.fatal(entry, &e) {
                        result = Err(fatal);
                    }
                    entry.state = AckState::failed(Failure::NotSent(e.to_string()));
                    break;
                }
            }
        }
        // The next new message of each stream follows the last one of the window.
        self.last_id = Default::default();
        for e in window.iter().rev() {
            if let Some(c) = e.lane.chain() {
                if self.last_id[c].is_none() {
                    self.last_id[c] = Some(e.message_id(self.ids.prefix()));
                }
            }
        }
        self.window = window;
        self.front_since = Instant::now();
        result
    }

    fn client_closed(&self) -> PublishError {
        PublishError::ClientClosed {
            pending: self.window.len(),
        }
    }
}

impl Delivery for Publisher {
    type Error = PublishError;

    async fn open(&mut self) -> Result<(), PublishError> {
        // Subscribed before the first publish: both go through the client's command queue in
        // order, so the server knows the inbox before any reply is due.
        let acks = self
            .client
            .subscribe(self.replies.filter())
            .await
            .map_err(PublishError::AckInbox)?;
        self.acks = Some(acks);
        Ok(())
    }

    /// Published while disconnected, changes would only queue in the client, to be sent after
    /// whatever the reconnect resends.
    fn ready(&self) -> bool {
        !self.recovering && self.is_connected()
    }

    fn room(&self) -> bool {
        self.window.len() < self.settings.max_in_flight
            && (self.window_bytes < self.settings.max_in_flight_bytes || self.window.is_empty())
            && !self.recovering
    }

    async fn send(&mut self, event: &ChangeEvent) -> Result<Ticket, PublishError> {
        if self.window.is_empty() {
            // Nothing was in flight on a connection lost before now.
            self.sync_reconnects();
        }
        self.publish_change(event).await
    }

    async fn send_outbox(&mut self, event: &OutboxEvent) -> Result<Ticket, PublishError> {
        if self.window.is_empty() {
            self.sync_reconnects();
        }
        self.publish_outbox(event).await
    }

    async fn delivered(&mut self, feed: Feed<'_>) -> Result<Progress, PublishError> {
        // Taken out for the wait, so that answers can be applied to the window meanwhile.
        let Some(mut acks) = self.acks.take() else {
            return Err(self.client_closed());
        };
        let connected = self.is_connected();
        // Nothing waits to join the open batch, or the window is full with too few of its
        // messages unacknowledged for the server to send a flow acknowledgement (plain
        // messages or the byte budget filled it): end the batch, so that its last messages are
        // acknowledged now rather than after the ack timeout.
        if connected
            && self.batches.as_ref().is_some_and(Batches::is_open)
            && (feed.waiting() == 0
                || !feed.open()
                || (!self.room() && self.batches.as_ref().is_some_and(Batches::starved)))
        {
            self.end_batch().await;
        }
        let waited = if self.window.is_empty() {
            if connected {
                Ok(())
            } else {
                self.wait_disconnected(&feed).await
            }
        } else {
            self.wait_window(&mut acks, &feed, connected).await
        };
        self.acks = Some(acks);
        waited?;
        self.check_reconnect();
        // Acknowledged messages leave first, so the driver fills their room at once.
        let progress = self.complete_acked();
        // Flow acknowledgements covered the whole open batch and nothing waits: end it now.
        // The driver sleeps until the next change, and the server forgets a batch that stays
        // idle (10 s by default), which would refuse the next message sent into it.
        if self.window.is_empty() && feed.waiting() == 0 && self.is_connected() {
            self.end_batch().await;
        }
        Ok(progress)
    }

    async fn close(&mut self) -> Result<(), PublishError> {
        Ok(())
    }

    fn stats(&self) -> &Arc<PublisherStats> {
        &self.stats
    }
}

/// Returns when the client connects or disconnects; without connection events, after a short
/// wait (the caller then asks the client for its state).
async fn wait_connection_change(connection: Option<&NatsStats>) {
    match connection {
        Some(stats) => stats.changed.notified().await,
        None => tokio::time::sleep(RECONNECT_POLL).await,
    }
}
