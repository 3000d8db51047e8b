//! Exactly-once delivery (`--kafka-exactly-once`): a transactional producer whose Kafka
//! transactions each hold one or more whole PostgreSQL transactions plus, on the positions
//! topic, the end position of the last of them. A change counts as delivered only once its
//! Kafka transaction committed.
//!
//! A Kafka transaction alone is not enough: a kill after the Kafka commit and before
//! PostgreSQL confirmed the position replays the transaction. So the first send reads the
//! positions topic (`read_committed`) and every PostgreSQL transaction ending at or below the
//! recorded position is skipped, counted as delivered (its position is then confirmed to
//! PostgreSQL as usual). The same read follows every abort or fresh producer: a commit whose
//! answer was lost may have succeeded.
//!
//! The first read is checked against the server (see [`positions::check`]): a cluster
//! restored from a backup keeps its system identifier, and a record of its former life would
//! make the bridge skip changes it never delivered; such a record stops the bridge.
//!
//! The producer is created at the first change, not at start: a standby bridge waiting for
//! the slot must not fence the active one (both derive the same `transactional.id`).
//!
//! While a PostgreSQL transaction is open the window takes every change of it (a Kafka
//! transaction cannot end inside it); it is bounded again at the transaction's end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};

use crate::pg::timeline::ServerPosition;
use crate::pg::Lsn;
use crate::sink::driver::Ticket;
use crate::sink::kafka::positions::{self, Committed, TRANSACTION_CALL_TIMEOUT};
use crate::sink::kafka::{stop_if_refused, Context, KafkaSinkError};
use crate::wire::kafka::{position_key, positions_topic, PositionRecord, ID_HEADER};

use super::{KafkaDelivery, RETRY_MAX};

/// A Kafka transaction is committed once it holds this many PostgreSQL transactions...
const TXN_MAX_TRANSACTIONS: usize = 1_000;
/// ...or this many bytes of values...
const TXN_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// ...or was opened this long ago (at the next PostgreSQL transaction's end); otherwise when
/// no change waits on the ring.
const TXN_MAX_AGE: Duration = Duration::from_millis(500);

/// What exactly-once delivery needs to know about the bridge.
#[derive(Debug, Clone)]
pub(crate) struct ExactlyOnce {
    /// The cluster's system identifier.
    pub(crate) system_identifier: String,
    /// The replication slot.
    pub(crate) slot: String,
    /// The server's WAL position and timeline history as of the latest (re)connect: the
    /// positions record is checked against them, and gives each record its timeline.
    pub(crate) server: Arc<ServerPosition>,
}

impl ExactlyOnce {
    /// The producer's `transactional.id`: stable across restarts of the bridge on one slot,
    /// so a restarted bridge fences its zombie predecessor.
    pub(crate) fn transactional_id(&self) -> String {
        format!("pgbridge-{}-{}", self.system_identifier, self.slot)
    }
}

/// The state of exactly-once delivery.
pub(super) struct Txns {
    pub(super) ids: ExactlyOnce,
    /// The positions topic.
    topic: Arc<str>,
    /// The record key on it.
    key: String,
    /// The producer is initialized and the positions topic was read.
    ready: bool,
    /// PostgreSQL transactions whose commit record begins below this are in Kafka already.
    skip_below: Lsn,
    /// Transactions skipped so far (logged once, at the first change delivered).
    skipped: u64,
    skip_logged: bool,
    /// A Kafka transaction is open.
    open: bool,
    /// The first ticket of the open Kafka transaction.
    pub(super) first: Option<Ticket>,
    /// Every ticket below this is committed (or skipped).
    pub(super) committed_below: Ticket,
    /// A PostgreSQL transaction's changes are being sent (not ended yet).
    pub(super) in_pg_txn: bool,
    /// The end of the last PostgreSQL transaction of the open Kafka transaction.
    last_end: Option<Lsn>,
    /// PostgreSQL transactions and value bytes in the open Kafka transaction.
    pg_count: usize,
    bytes: u64,
    opened: Instant,
    /// The position record of the open Kafka transaction was produced.
    position_sent: bool,
    /// A commit failed in a way a retry may fix (logged once until one succeeds).
    commit_failing: bool,
}

impl Txns {
    pub(super) fn new(ids: ExactlyOnce, prefix: &str) -> Self {
        Txns {
            topic: Arc::from(positions_topic(prefix)),
            key: position_key(&ids.system_identifier, &ids.slot),
            ids,
            ready: false,
            skip_below: Lsn::INVALID,
            skipped: 0,
            skip_logged: false,
            open: false,
            first: None,
            committed_below: 0,
            in_pg_txn: false,
            last_end: None,
            pg_count: 0,
            bytes: 0,
            opened: Instant::now(),
            position_sent: false,
            commit_failing: false,
        }
    }

    /// At a PostgreSQL transaction's end, the open Kafka transaction is full enough to commit
    /// even while more changes wait.
    pub(super) fn full(&self) -> bool {
        self.first.is_some()
            && !self.in_pg_txn
            && (self.pg_count >= TXN_MAX_TRANSACTIONS
                || self.bytes >= TXN_MAX_BYTES
                || self.opened.elapsed() >= TXN_MAX_AGE)
    }

    /// The position record was written: the Kafka transaction takes no more changes and
    /// is committed once its records are reported.
    pub(super) fn closing(&self) -> bool {
        self.position_sent
    }

    fn reset(&mut self) {
        self.open = false;
        self.first = None;
        self.last_end = None;
        self.pg_count = 0;
        self.bytes = 0;
        self.position_sent = false;
    }
}

/// What a change's send does under exactly-once delivery.
pub(super) enum Admit {
    /// Produce it in the open Kafka transaction.
    Produce,
    /// Already in Kafka: an empty entry, delivered at once.
    Skip,
}

impl KafkaDelivery {
    /// Before a change is sent: the producer and the skip position are ready (retried while
    /// Kafka cannot answer), and the change is skipped or the Kafka transaction opened.
    pub(super) async fn admit(&mut self, commit_lsn: Lsn) -> Result<Admit, KafkaSinkError> {
        let Some(t) = &self.eos else {
            return Ok(Admit::Produce);
        };
        if !t.ready {
            self.start_transactions().await?;
        }
        let Some(t) = &mut self.eos else {
            return Ok(Admit::Produce);
        };
        if commit_lsn < t.skip_below {
            return Ok(Admit::Skip);
        }
        if !t.skip_logged {
            t.skip_logged = true;
            if t.skip_below == Lsn::INVALID {
                log::info!("exactly once: skipped 0 transactions (no position recorded yet)");
            } else {
                log::info!(
                    "exactly once: skipped {} transactions up to {} (in Kafka already: committed before the last stop, not yet confirmed to PostgreSQL)",
                    t.skipped,
                    t.skip_below
                );
            }
        }
        t.in_pg_txn = true;
        if !t.open && !self.recovering {
            self.begin();
        }
        Ok(Admit::Produce)
    }

    /// Opens a Kafka transaction; a refusal starts recovery.
    fn begin(&mut self) {
        let (Some(t), Some(p)) = (&mut self.eos, &self.producer) else {
            return;
        };
        match p.begin_transaction() {
            Ok(()) => {
                t.open = true;
                t.opened = Instant::now();
            }
            Err(e) => self.failed(&e),
        }
    }

    /// A change was added to the window as `ticket` (`skipped`: as an empty entry).
    pub(super) fn admitted(&mut self, ticket: Ticket, skipped: bool, bytes: u64) {
        let Some(t) = &mut self.eos else {
            return;
        };
        if skipped {
            // Nothing uncommitted before it: delivered at once.
            if t.first.is_none() {
                t.committed_below = ticket + 1;
            }
            return;
        }
        t.first.get_or_insert(ticket);
        t.bytes += bytes;
    }

    /// A PostgreSQL transaction ended at `end_lsn` (see [`crate::sink::driver::Delivery::transaction_end`]).
    pub(super) fn eos_transaction_end(&mut self, end_lsn: Lsn) {
        let Some(t) = &mut self.eos else {
            return;
        };
        if !t.ready {
            return;
        }
        if end_lsn <= t.skip_below {
            t.skipped += 1;
            return;
        }
        if t.in_pg_txn {
            t.in_pg_txn = false;
            if let Some(last) = self.window.back_mut() {
                last.end = Some(end_lsn);
            }
        }
        if t.first.is_some() {
            t.last_end = Some(end_lsn);
            t.pg_count += 1;
        }
    }

    /// True when the open Kafka transaction should be committed now: it ends with a whole
    /// PostgreSQL transaction, and no change waits or it is full, or it is closing already
    /// (changes that arrive while its reports are awaited do not reopen it).
    pub(super) fn commit_due(&self, waiting: usize) -> bool {
        self.eos.as_ref().is_some_and(|t| {
            t.first.is_some()
                && !t.in_pg_txn
                && t.last_end.is_some()
                && (t.closing() || waiting == 0 || t.full() || !self.window_has_room())
        })
    }

    /// Writes the position record (once), then true when every record of the Kafka
    /// transaction has its report and the producer holds none of them any more: the commit
    /// then only sends `EndTxn`. (rdkafka's `commit_transaction` flushes first, and while a
    /// record is outstanding its flush waits in steps of 100 ms: every commit took 100 ms or
    /// more.) No change joins the transaction meanwhile (see [`Txns::closing`]).
    pub(super) fn commit_ready(&mut self) -> bool {
        let Some(t) = &self.eos else {
            return false;
        };
        let Some(end) = t.last_end else {
            return false;
        };
        if !t.position_sent {
            let value = PositionRecord {
                system_identifier: t.ids.system_identifier.clone(),
                slot: t.ids.slot.clone(),
                timeline: t.ids.server.timeline_of(end),
                end_lsn: end.to_string(),
                written_ms: crate::wire::text::now_unix_micros() / 1000,
            };
            let value = serde_json::to_vec(&value).unwrap_or_default();
            let id = format!("position:{end}");
            let headers = OwnedHeaders::new().insert(Header {
                key: ID_HEADER,
                value: Some(id.as_bytes()),
            });
            // Its report is about no change (a ticket no window holds); a failure fails the commit.
            let tag = Box::new((self.generation, Ticket::MAX, 0, Instant::now()));
            let record: BaseRecord<'_, [u8], [u8], _> = BaseRecord::with_opaque_to(&t.topic, tag)
                .partition(0)
                .key(t.key.as_bytes())
                .payload(&value[..])
                .headers(headers);
            let Some(p) = &self.producer else {
                return false;
            };
            match p.send(record) {
                Ok(()) => self.outstanding += 1,
                Err((e, _)) => {
                    self.failed(&e);
                    return false;
                }
            }
            if let Some(t) = &mut self.eos {
                t.position_sent = true;
            }
        }
        if self.recovering || self.outstanding > 0 {
            return false;
        }
        // With every report in, the producer's count of records reaches zero as soon as
        // the last report's event is released: a flush that does not wait says so.
        self.producer
            .as_ref()
            .is_some_and(|p| p.flush(Duration::ZERO).is_ok())
    }

    /// Commits the Kafka transaction (after [`Self::commit_ready`]). A commit a retry may fix
    /// is tried again at the next call; one that needs an abort starts recovery.
    pub(super) fn commit(&mut self) {
        let Some(p) = &self.producer else {
            return;
        };
        match p.commit_transaction(TRANSACTION_CALL_TIMEOUT) {
            Ok(()) => {
                let next = self.next_ticket;
                if let Some(t) = &mut self.eos {
                    if t.commit_failing {
                        log::info!("Kafka commits transactions again");
                    }
                    t.commit_failing = false;
                    t.committed_below = next;
                    t.reset();
                }
            }
            Err(e) if needs_abort(&e) => self.failed(&e),
            Err(e) => {
                if let Some(t) = &mut self.eos {
                    if !t.commit_failing {
                        log::warn!(
                            "Kafka did not confirm the commit of a transaction: {e}; retrying (PostgreSQL keeps the WAL meanwhile)"
                        );
                    }
                    t.commit_failing = true;
                }
                self.last_error = Some(e.to_string());
                self.failing_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Creates the transactional producer (fencing any predecessor with the same
    /// `transactional.id`), makes sure the positions topic exists and reads this bridge's
    /// position from it; retried while Kafka cannot answer.
    async fn start_transactions(&mut self) -> Result<(), KafkaSinkError> {
        let mut warned = false;
        let since = Instant::now();
        loop {
            match self.try_start().await {
                Ok(found) => return self.trust_start(found),
                Err(e) => {
                    if let Some(fatal) = self.fatal.take() {
                        return Err(fatal);
                    }
                    stop_if_refused(
                        &self.settings.connection,
                        &e,
                        "starting the transactional producer",
                    )?;
                    if !warned {
                        log::warn!("exactly once: cannot start the transactional producer: {e}; retrying (PostgreSQL keeps the WAL meanwhile)");
                        warned = true;
                    }
                    if self.settings.shutdown.is_triggered()
                        && since.elapsed() > super::SHUTDOWN_RETRY_LIMIT
                    {
                        return Err(KafkaSinkError::NotDrained {
                            pending: self.window.len(),
                            last_error: e.to_string(),
                        });
                    }
                    if self.settings.shutdown.sleep(RETRY_MAX).await {
                        continue;
                    }
                }
            }
        }
    }

    /// Makes sure the positions topic exists, creates the producer and reads the record.
    async fn try_start(&mut self) -> Result<Option<Committed>, KafkaError> {
        let Some(t) = &self.eos else {
            return Ok(None);
        };
        let topic = Arc::clone(&t.topic);
        let created = self.admin.ensure_positions(&topic).await;
        created?;
        self.fresh_producer()?;
        self.read_position()
    }

    /// The first read of the positions topic: a record that fits the server (see
    /// [`positions::check`]) is skipped up to; one that does not stops the bridge.
    fn trust_start(&mut self, found: Option<Committed>) -> Result<(), KafkaSinkError> {
        let Some(t) = &mut self.eos else {
            return Ok(());
        };
        let Some(Committed { end: lsn, timeline }) = found else {
            t.ready = true;
            log::info!(
                "exactly once: transactional id {}; positions topic {} holds no position for key {} yet",
                t.ids.transactional_id(),
                t.topic,
                t.key
            );
            return Ok(());
        };
        let (server_wal, history) = t.ids.server.get();
        if let Err(why) = positions::check(lsn, timeline, server_wal, &history) {
            return Err(KafkaSinkError::UntrustedPosition {
                topic: t.topic.to_string(),
                key: t.key.clone(),
                end_lsn: lsn,
                timeline,
                why: why.explain(server_wal, &history),
            });
        }
        t.ready = true;
        t.skip_below = t.skip_below.max(lsn);
        log::info!(
            "exactly once: transactional id {}; positions topic {} key {} holds {lsn} (timeline {}, server at {server_wal} on timeline {}): transactions ending at or below it are in Kafka already and are skipped",
            t.ids.transactional_id(),
            t.topic,
            t.key,
            timeline,
            history.current()
        );
        Ok(())
    }

    /// A new transactional producer, initialized (which aborts the open transaction of any
    /// earlier producer with the same id, and fences it).
    fn fresh_producer(&mut self) -> Result<(), KafkaError> {
        self.new_producer().map_err(|e| match e {
            KafkaSinkError::Config(k) => k,
            other => KafkaError::ClientCreation(other.to_string()),
        })?;
        if let Some(t) = &mut self.eos {
            t.reset();
        }
        let Some(p) = &self.producer else {
            return Ok(());
        };
        if let Err(e) = p.init_transactions(TRANSACTION_CALL_TIMEOUT) {
            // Not usable: the next attempt creates another.
            self.producer = None;
            return Err(e);
        }
        Ok(())
    }

    /// This bridge's committed position record on the positions topic.
    fn read_position(&self) -> Result<Option<Committed>, KafkaError> {
        let Some(t) = &self.eos else {
            return Ok(None);
        };
        positions::read(
            &self.settings.kafka,
            Context {
                connection: Arc::clone(&self.settings.connection),
            },
            &t.topic,
            &t.ids.system_identifier,
            &t.ids.slot,
        )
    }

    /// After a failed record, a failed commit or a fenced producer: aborts the Kafka
    /// transaction (or replaces the producer), reads what committed meanwhile, lets those
    /// changes go as delivered and produces the rest again in a new transaction. Leaves
    /// `recovering` set when Kafka cannot answer yet (the next call tries again).
    pub(super) async fn recover_transaction(&mut self) -> Result<(), KafkaSinkError> {
        if self.settings.shutdown.sleep(self.backoff).await {
            self.check_shutdown()?;
        }
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
        if let Some(e) = self.fatal.take() {
            return Err(e);
        }
        let aborted = match &self.producer {
            Some(p) if p.client().fatal_error().is_none() => {
                match p.abort_transaction(TRANSACTION_CALL_TIMEOUT) {
                    Ok(()) => true,
                    Err(e) if is_retriable(&e) => {
                        self.last_error = Some(e.to_string());
                        return Ok(());
                    }
                    Err(_) => false,
                }
            }
            _ => false,
        };
        if aborted {
            // The aborted records' reports are no longer about the window.
            self.generation += 1;
            self.outstanding = 0;
            if let Some(t) = &mut self.eos {
                t.reset();
            }
        } else if let Err(e) = self.fresh_producer() {
            self.last_error = Some(e.to_string());
            return Ok(());
        }
        // Not checked against the server again: what committed since the first read was
        // written by this bridge (or a fenced predecessor holding the slot before it).
        let found = match self.read_position() {
            Ok(found) => found.map(|c| c.end),
            Err(e) => {
                self.last_error = Some(e.to_string());
                return Ok(());
            }
        };
        let Some(t) = &mut self.eos else {
            return Ok(());
        };
        if let Some(lsn) = found {
            t.skip_below = t.skip_below.max(lsn);
        }
        // Whole PostgreSQL transactions that committed although the answer was lost.
        let from_ticket = t.committed_below;
        let mut committed = from_ticket;
        for e in self.window.iter().filter(|e| e.ticket >= from_ticket) {
            if e.commit_lsn >= t.skip_below {
                break;
            }
            committed = e.ticket + 1;
        }
        t.committed_below = committed;
        let in_pg_txn = t.in_pg_txn;
        self.recovering = false;
        log::info!(
            "exactly once: Kafka transaction aborted; producing the {} uncommitted changes again in a new transaction",
            self.window
                .iter()
                .filter(|e| e.ticket >= committed)
                .count()
        );
        let from = self.window.iter().position(|e| e.ticket >= committed);
        let Some(from) = from else {
            return Ok(());
        };
        self.begin();
        let mut last_end = None;
        let mut pg_count = 0;
        let mut bytes = 0;
        for at in from..self.window.len() {
            for r in &mut self.window[at].records {
                r.done = false;
            }
            let n = self.window[at].records.len();
            self.window[at].pending = n;
            bytes += self.window[at].bytes;
            if let Some(end) = self.window[at].end {
                last_end = Some(end);
                pg_count += 1;
            }
            for index in 0..n {
                if self.recovering {
                    return Ok(());
                }
                self.produce(at, index);
            }
        }
        if let Some(t) = &mut self.eos {
            t.first = Some(self.window[from].ticket);
            t.last_end = if in_pg_txn {
                last_end
            } else {
                last_end.or(t.last_end)
            };
            t.pg_count = pg_count;
            t.bytes = bytes;
        }
        Ok(())
    }

    /// Under exactly-once delivery: removes the committed changes at the front of the window.
    pub(super) fn committed_front(&mut self, t_below: Ticket) -> u64 {
        let mut bytes = 0;
        while self.window.front().is_some_and(|e| e.ticket < t_below) {
            if let Some(done) = self.window.pop_front() {
                bytes += done.bytes;
                self.window_bytes -= done.bytes;
            }
        }
        bytes
    }
}

/// An error after which the transaction can only be aborted (or the producer replaced).
fn needs_abort(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(r) => r.txn_requires_abort() || r.is_fatal(),
        _ => true,
    }
}

/// An error a later retry of the same call may fix (a timeout, a coordinator moving).
fn is_retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(r) if r.is_retriable())
}
