//! The wal thread: reads the replication stream, decodes pgoutput into [`ChangeEvent`]s,
//! hands them through the ring to the publisher, answers keepalives and reports the durable
//! position to PostgreSQL.
//!
//! Transactions reach the ring as their changes followed by a [`RingItem::Commit`] carrying
//! the commit's `end_lsn`; the publisher advances the durable position to it once every
//! message before it has a PubAck. Streamed (in-progress) transactions are spooled to disk and
//! only put on the ring at Stream Commit. When the ring is full this thread waits (PostgreSQL
//! keeps the WAL) but keeps sending status updates so the walsender does not time out.
//!
//! The last published change of each transaction carries `last_in_tx`. That is known only at
//! the commit record, so one decoded change is held back ([`HeldChange`]) and put on the ring
//! when the next change or the commit arrives; the commit record follows the last change at
//! once (pgoutput sends a transaction after it committed), so this adds no latency.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::pg::conn::PgError;
use crate::pg::framing::{parse_copy_data, FramingError, ReplicationMessage};
use crate::pg::pgoutput::{Cell, DecodeError, Decoder, LogicalMessage, OldTuple, TupleData};
use crate::pg::replication::{PgOutputOptions, ReplicationConnection};
use crate::pg::value::{decode_text_into, TypeRegistry, Value, ValueKind};
use crate::pg::Lsn;
use crate::shutdown::Shutdown;
use crate::telemetry::counters::DurableLsn;
use crate::telemetry::Telemetry;

use super::durable::{StateFileError, StateWriter};
use super::position::TimelineHistory;
use super::ring::{item_bytes, RingItem, RingWriter};
use super::spool::{Spool, SpoolError};
use crate::wire::event::{ChangeEvent, ColumnValue, Operation, TableRef};

/// How long one wait for the server may last before other work is checked.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Least time between two status updates sent only because the durable position moved.
const STATUS_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest wait at shutdown for the final position to be stored in the state file.
const FINAL_STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the server to end the stream at shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait at shutdown for the publisher to store what is in the ring.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Wake the publisher at least every this many changes inside a big transaction.
const NOTIFY_EVERY: u32 = 256;
/// One XLogData message in this many is timed for `last_processing_time_us` (two clock reads per
/// message would cost a few percent of the per-change budget).
const TIME_EVERY: u64 = 16;

/// Errors of the wal thread.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection or a command failed.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// A CopyData message was not XLogData or a keepalive.
    #[error("malformed replication message: {0}")]
    Framing(#[from] FramingError),
    /// A pgoutput message could not be decoded.
    #[error("malformed pgoutput message: {0}")]
    Decode(#[from] DecodeError),
    /// A change referred to a relation that was never described.
    #[error("pgoutput change for relation {0} without a preceding Relation message")]
    UnknownRelation(u32),
    /// A tuple did not have as many columns as its Relation message.
    #[error("relation {relation}: tuple has {got} columns, the Relation message {expected}")]
    ColumnCount {
        /// Table.
        relation: String,
        /// Columns in the tuple.
        got: usize,
        /// Columns in the Relation message.
        expected: usize,
    },
    /// The spool of streamed transactions failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The durable position could not be persisted.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The publisher stopped; nothing more can be made durable.
    #[error("the publisher stopped")]
    PublisherGone,
    /// Shutdown was requested while waiting for room in the ring.
    #[error("shutdown requested")]
    ShuttingDown,
    /// Nothing arrived from PostgreSQL for longer than the receive timeout, although a reply
    /// was asked for: the connection is taken as dead (a peer gone without a reset can leave
    /// a socket open for many minutes) and made anew.
    #[error("nothing received from PostgreSQL for {} s (--wal-receive-timeout-secs), not even an answer to a keepalive request; the connection is taken as dead", .0.as_secs())]
    Silent(Duration),
}

/// Counters of the wal thread since start.
#[derive(Debug, Clone, Default)]
pub struct WalStats {
    /// CopyData messages received.
    pub wal_messages: u64,
    /// Committed transactions put on the ring.
    pub transactions: u64,
    /// Changes put on the ring.
    pub changes: u64,
    /// Reconnects to PostgreSQL.
    pub reconnects: u64,
    /// The last flush position reported to PostgreSQL.
    pub flushed: Lsn,
    /// Time since start.
    pub uptime: Duration,
}

/// What outlives one replication connection: the ring's producer side, the durable
/// position, the state file and the spool.
pub struct WalContext {
    /// The wal side of the ring to the publisher.
    pub ring: RingWriter,
    /// Durable position, advanced by the publisher.
    pub durable: DurableLsn,
    /// Where the durable position is persisted (on its own thread).
    pub state: StateWriter,
    /// Counters.
    pub stats: WalStats,
    /// End of the last transaction put on the ring.
    pub last_pushed_end: Lsn,
    /// Flush position last reported (never decreases).
    pub reported_flush: Lsn,
    /// Live state for telemetry.
    pub telemetry: Arc<Telemetry>,
    /// Told about every Relation message (schema, table), to keep the schemas bucket current.
    pub schema_changes: Option<tokio::sync::mpsc::UnboundedSender<(Arc<str>, Arc<str>)>>,
}

impl WalContext {
    /// Copies the counters to the telemetry: a few relaxed stores to lines only this thread
    /// writes.
    fn publish_counters(&self, received: Lsn) {
        let t = &self.telemetry.wal;
        t.wal_messages.store(self.stats.wal_messages, Relaxed);
        t.transactions.store(self.stats.transactions, Relaxed);
        t.changes.store(self.stats.changes, Relaxed);
        t.received_lsn.store(received.0, Relaxed);
    }

    /// Samples the ring's occupancy (reads the publisher's position: not on every message).
    fn sample_ring(&self) {
        let used = self.ring.used();
        self.telemetry.wal.ring_used.store(used as u64, Relaxed);
    }
}

#[derive(Debug)]
struct ColumnInfo {
    name: Arc<str>,
    kind: ValueKind,
    key: bool,
}

#[derive(Debug)]
struct RelationInfo {
    table: Arc<TableRef>,
    qualified: String,
    columns: Vec<ColumnInfo>,
    streamed: bool,
}

/// The change held back until it is known whether it is the last of its transaction.
#[derive(Debug, Default)]
struct HeldChange(Option<Box<ChangeEvent>>);

impl HeldChange {
    /// Holds `ev` and gives back the change held before: a later one exists, so that one is
    /// not the last of its transaction.
    fn hold(&mut self, ev: Box<ChangeEvent>) -> Option<Box<ChangeEvent>> {
        self.0.replace(ev)
    }

    /// At the commit record: the held change, marked as the transaction's last.
    fn release_last(&mut self) -> Option<Box<ChangeEvent>> {
        self.0.take().map(|mut ev| {
            ev.last_in_tx = true;
            ev
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Txn {
    xid: u32,
    commit_lsn: Lsn,
    /// The timeline `commit_lsn` belongs to.
    timeline: u32,
    commit_time: i64,
    seq: u32,
}

/// The replication stream of one connection.
pub struct WalStream<'c> {
    repl: ReplicationConnection,
    config: &'c Config,
    shutdown: Shutdown,
    decoder: Decoder,
    relations: HashMap<u32, RelationInfo>,
    types: TypeRegistry,
    table_filter: Option<HashSet<String>>,
    server_version: i32,
    txn: Option<Txn>,
    /// The latest change of the open transaction, not on the ring yet. It belongs to this
    /// connection: a reconnect starts over from the durable position and sends it again.
    held: HeldChange,
    current_stream: Option<u32>,
    last_received: Lsn,
    idle_candidate: Lsn,
    last_status: Instant,
    warned_values: std::cell::Cell<bool>,
    /// XLogData messages received, for sampling the processing time.
    xlog_messages: u64,
    /// Where streamed transactions are spooled.
    spool_dir: std::path::PathBuf,
    /// Spool of streamed transactions: created once the slot is ours, taken out while a
    /// transaction is replayed.
    spool: Option<Spool>,
    /// Silence after which the connection is given up ([`StreamError::Silent`]); at half of
    /// it a status update asks the server for an answer.
    receive_timeout: Duration,
    /// When something last arrived from the server.
    last_heard: Instant,
    /// Whether an answer was asked for since then.
    pinged: bool,
    /// The server's timeline history: gives each commit its timeline.
    timelines: TimelineHistory,
}

impl<'c> WalStream<'c> {
    /// Wraps a replication connection whose slot exists. `tables` restricts the published
    /// tables (qualified names) when given; streamed transactions are spooled in `spool_dir`;
    /// `timelines` is the server's timeline history.
    pub fn new(
        repl: ReplicationConnection,
        tables: Option<HashSet<String>>,
        server_version: i32,
        config: &'c Config,
        shutdown: Shutdown,
        spool_dir: std::path::PathBuf,
        timelines: TimelineHistory,
    ) -> Self {
        WalStream {
            timelines,
            spool_dir,
            spool: None,
            repl,
            config,
            shutdown,
            decoder: Decoder::new(),
            relations: HashMap::new(),
            types: TypeRegistry::new(),
            table_filter: tables,
            server_version,
            txn: None,
            held: HeldChange::default(),
            current_stream: None,
            last_received: Lsn::INVALID,
            idle_candidate: Lsn::INVALID,
            last_status: Instant::now(),
            warned_values: std::cell::Cell::new(false),
            xlog_messages: 0,
            receive_timeout: config.replication.wal_receive_timeout(Duration::ZERO),
            last_heard: Instant::now(),
            pinged: false,
        }
    }

    /// Gives the connection up after `timeout` of silence (see [`StreamError::Silent`]).
    pub fn with_receive_timeout(mut self, timeout: Duration) -> Self {
        self.receive_timeout = timeout;
        self
    }

    /// Streams from `start` (the server starts at the later of it and the slot's
    /// confirmed position) until shutdown, then drains the ring and reports the final flush.
    pub fn run(&mut self, start: Lsn, ctx: &mut WalContext) -> Result<(), StreamError> {
        let options = PgOutputOptions::for_server(
            self.server_version,
            vec![self.config.replication.publication.clone()],
        );
        self.repl
            .start_logical(&self.config.replication.slot, start, &options)?;
        // Only now is the slot ours: a standby waiting for it must not touch the spool, and
        // what an earlier (crashed) run left there is stale, so it is emptied.
        self.spool = Some(Spool::new(&self.spool_dir)?);
        ctx.telemetry.wal.set_connected(true);
        ctx.telemetry.set_pg_problem(None);
        // Logged once START_REPLICATION succeeded: a standby waiting for the slot never says it.
        if ctx.telemetry.mark_stream_established() {
            log::info!(
                "streaming started in {} ms",
                ctx.telemetry.uptime().as_millis()
            );
        }
        self.last_received = start;
        self.last_heard = Instant::now();
        self.pinged = false;
        let status_interval = self.config.replication.standby_status_interval();
        while !self.shutdown.is_triggered() {
            if ctx.ring.reader_gone() {
                return Err(StreamError::PublisherGone);
            }
            if let Some(buf) = self.repl.recv(POLL_INTERVAL)? {
                self.last_heard = Instant::now();
                self.pinged = false;
                ctx.stats.wal_messages += 1;
                match parse_copy_data(&buf)? {
                    ReplicationMessage::XLogData(x) => {
                        self.xlog_messages += 1;
                        let timed = (self.xlog_messages % TIME_EVERY == 1).then(Instant::now);
                        self.last_received = self.last_received.max(x.wal_end);
                        let msg = self.decoder.decode(x.data)?;
                        match self.handle(msg, x.wal_start, x.data, ctx) {
                            Err(StreamError::ShuttingDown) => break,
                            other => other?,
                        }
                        if let Some(t0) = timed {
                            let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                            ctx.telemetry.wal.last_processing_us.store(us, Relaxed);
                            ctx.sample_ring();
                        }
                    }
                    ReplicationMessage::Keepalive(k) => {
                        self.last_received = self.last_received.max(k.wal_end);
                        self.idle_candidate = self.idle_candidate.max(k.wal_end);
                        if k.reply_requested {
                            self.send_status(ctx, true)?;
                        }
                    }
                }
                ctx.publish_counters(self.last_received);
            } else {
                ctx.sample_ring();
                self.check_silence(ctx)?;
            }
            let due = self.last_status.elapsed() >= status_interval;
            self.send_status(ctx, due)?;
        }
        self.finish(ctx)
    }

    /// After half the receive timeout without a word from the server, asks it for an answer
    /// (a status update with the reply flag: a live walsender answers with a keepalive at
    /// once); after the whole timeout, gives the connection up.
    fn check_silence(&mut self, ctx: &mut WalContext) -> Result<(), StreamError> {
        let silent = self.last_heard.elapsed();
        if silent >= self.receive_timeout {
            return Err(StreamError::Silent(self.receive_timeout));
        }
        if !self.pinged && silent >= self.receive_timeout / 2 {
            self.pinged = true;
            let flush = ctx.reported_flush;
            self.repl
                .send_status(self.last_received.max(flush), flush, flush, true)?;
            self.last_status = Instant::now();
        }
        Ok(())
    }

    /// Shutdown: tell the publisher no more items come, wait for it to drain (bounded),
    /// report the final flush and end the stream.
    fn finish(&mut self, ctx: &mut WalContext) -> Result<(), StreamError> {
        // A half-received transaction is dropped: PostgreSQL sends it again next time.
        self.txn = None;
        self.held = HeldChange::default();
        self.current_stream = None;
        push_wait(ctx, RingItem::End, &self.shutdown, true, &mut |_| Ok(()))?;
        ctx.ring.notify();
        let deadline = Instant::now() + SHUTDOWN_DRAIN_TIMEOUT;
        while ctx.durable.get() < ctx.last_pushed_end
            && !ctx.ring.reader_gone()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
            let due = self.last_status.elapsed() >= Duration::from_secs(1);
            self.send_status(ctx, due)?;
        }
        self.send_status_with(ctx, true, true)?;
        self.repl.stop(STOP_TIMEOUT)?;
        Ok(())
    }

    /// Sends a standby status update when forced, or when the flush position moved (at most
    /// every [`STATUS_MIN_INTERVAL`]). The flush position is the durable one, or, when
    /// everything received is durable and no transaction is open, the last keepalive's WAL
    /// end, so an idle or filtered database does not pile up WAL.
    fn send_status(&mut self, ctx: &mut WalContext, force: bool) -> Result<(), StreamError> {
        self.send_status_with(ctx, force, false)
    }

    /// [`send_status`](Self::send_status); the position is first stored in the state file,
    /// and only what is stored is confirmed. The file is written on its own thread: the
    /// position stored at one update is confirmed at the next. `wait_stored` waits for the
    /// file instead (at shutdown).
    fn send_status_with(
        &mut self,
        ctx: &mut WalContext,
        force: bool,
        wait_stored: bool,
    ) -> Result<(), StreamError> {
        let durable = ctx.durable.get();
        let drained = durable >= ctx.last_pushed_end;
        let idle = drained
            && self.txn.is_none()
            && self.current_stream.is_none()
            // No spool means a streamed transaction is being replayed right now.
            && self.spool.as_ref().is_some_and(Spool::is_empty);
        let mut flush = durable;
        if idle {
            flush = flush.max(self.idle_candidate);
        }
        flush = flush.max(ctx.reported_flush);
        let moved = flush > ctx.reported_flush;
        let due = moved && self.last_status.elapsed() >= STATUS_MIN_INTERVAL;
        if !force && !due {
            return Ok(());
        }
        let stored = if wait_stored {
            ctx.state.store_now(flush, FINAL_STORE_TIMEOUT)?
        } else {
            if moved {
                ctx.state.request(flush);
            }
            if let Some(e) = ctx.state.take_error() {
                return Err(e.into());
            }
            ctx.state.stored()
        };
        // Never confirm past the state file, never move back.
        let flush = flush.min(stored).max(ctx.reported_flush);
        let write = self.last_received.max(flush);
        self.repl.send_status(write, flush, flush, false)?;
        ctx.reported_flush = flush;
        ctx.stats.flushed = flush;
        ctx.telemetry.wal.flushed_lsn.store(flush.0, Relaxed);
        self.last_status = Instant::now();
        Ok(())
    }

    fn handle(
        &mut self,
        msg: LogicalMessage<'_>,
        wal_start: Lsn,
        raw: &[u8],
        ctx: &mut WalContext,
    ) -> Result<(), StreamError> {
        // Inside a stream block everything goes to the transaction's spool file.
        if let Some(top) = self.current_stream {
            let sub = match &msg {
                LogicalMessage::StreamStop => None,
                LogicalMessage::Relation(r) => r.xid,
                LogicalMessage::Type(t) => t.xid,
                LogicalMessage::Insert(i) => i.xid,
                LogicalMessage::Update(u) => u.xid,
                LogicalMessage::Delete(d) => d.xid,
                LogicalMessage::Truncate(t) => t.xid,
                LogicalMessage::Message(m) => m.xid,
                _ => Some(top),
            };
            match sub {
                Some(sub) => {
                    if let Some(spool) = self.spool.as_mut() {
                        spool.append(top, sub, wal_start, raw)?;
                    }
                    return Ok(());
                }
                None => {
                    self.current_stream = None;
                    return Ok(());
                }
            }
        }
        match msg {
            LogicalMessage::Begin(b) => {
                self.txn = Some(Txn {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    timeline: self.timelines.timeline_of(b.final_lsn),
                    commit_time: b.commit_time,
                    seq: 0,
                })
            }
            LogicalMessage::Commit(c) => {
                self.txn = None;
                self.commit(c.end_lsn, ctx)?;
            }
            LogicalMessage::StreamStart(s) => self.current_stream = Some(s.xid),
            LogicalMessage::StreamCommit(c) => {
                let mut txn = Txn {
                    xid: c.xid,
                    commit_lsn: c.commit_lsn,
                    timeline: self.timelines.timeline_of(c.commit_lsn),
                    commit_time: c.commit_time,
                    seq: 0,
                };
                if let Some(mut spool) = self.spool.take() {
                    let replayed = spool.replay(c.xid, |m| {
                        let msg = LogicalMessage::parse(&m.data, true)?;
                        self.apply(msg, m.lsn, &mut txn, ctx)
                    });
                    self.spool = Some(spool);
                    replayed??;
                }
                self.commit(c.end_lsn, ctx)?;
            }
            LogicalMessage::StreamAbort(a) => {
                if let Some(spool) = self.spool.as_mut() {
                    spool.abort(a.xid, a.subxid)?;
                }
            }
            other => {
                let mut txn = self.txn.unwrap_or(Txn {
                    xid: 0,
                    commit_lsn: wal_start,
                    timeline: self.timelines.timeline_of(wal_start),
                    commit_time: 0,
                    seq: 0,
                });
                self.apply(other, wal_start, &mut txn, ctx)?;
                if self.txn.is_some() {
                    self.txn = Some(txn);
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self, end_lsn: Lsn, ctx: &mut WalContext) -> Result<(), StreamError> {
        if let Some(last) = self.held.release_last() {
            self.push_now(last, ctx)?;
        }
        // A full ring can hold the commit back as long as a change: keep the walsender alive.
        let shutdown = self.shutdown.clone();
        let mut keepalive = |ctx: &mut WalContext| self.keep_alive_while_waiting(ctx);
        push_wait(
            ctx,
            RingItem::Commit { end_lsn },
            &shutdown,
            false,
            &mut keepalive,
        )?;
        ctx.last_pushed_end = ctx.last_pushed_end.max(end_lsn);
        ctx.stats.transactions += 1;
        ctx.ring.notify();
        Ok(())
    }

    /// Schema messages update the caches; row messages become events on the ring.
    fn apply(
        &mut self,
        msg: LogicalMessage<'_>,
        lsn: Lsn,
        txn: &mut Txn,
        ctx: &mut WalContext,
    ) -> Result<(), StreamError> {
        match msg {
            LogicalMessage::Relation(r) => {
                let qualified = format!("{}.{}", r.namespace, r.name);
                let columns = r
                    .columns
                    .iter()
                    .map(|c| ColumnInfo {
                        name: Arc::from(c.name),
                        kind: self.types.kind(c.type_oid),
                        key: c.is_key(),
                    })
                    .collect();
                let streamed = self
                    .table_filter
                    .as_ref()
                    .is_none_or(|f| f.contains(&qualified));
                let table = Arc::new(TableRef {
                    schema: Arc::from(r.namespace),
                    table: Arc::from(r.name),
                    relation_id: r.relid,
                });
                if streamed {
                    if let Some(tx) = &ctx.schema_changes {
                        // The schema writer compares with the stored revision; a closed
                        // channel only means schemas are unavailable.
                        let _ = tx.send((Arc::clone(&table.schema), Arc::clone(&table.table)));
                    }
                }
                self.relations.insert(
                    r.relid,
                    RelationInfo {
                        table,
                        qualified,
                        columns,
                        streamed,
                    },
                );
            }
            LogicalMessage::Type(t) => {
                self.types.register(t.oid, t.namespace, t.name);
            }
            LogicalMessage::Insert(i) => {
                let seq = next_seq(txn);
                let rel = self.relation(i.relid)?;
                if rel.streamed {
                    let mut ev = new_event(ctx, rel, Operation::Insert, lsn, txn, seq);
                    ev.old_columns = None;
                    let ChangeEvent {
                        columns,
                        unchanged_toast,
                        ..
                    } = &mut *ev;
                    self.columns(rel, &i.new, false, None, unchanged_toast, columns)?;
                    self.push_change(ev, ctx)?;
                }
            }
            LogicalMessage::Update(u) => {
                let seq = next_seq(txn);
                let rel = self.relation(u.relid)?;
                if rel.streamed {
                    let mut ev = new_event(ctx, rel, Operation::Update, lsn, txn, seq);
                    let (old, full_old) = match &u.old {
                        Some(OldTuple::Key(t)) => (Some((t, true)), None),
                        Some(OldTuple::Full(t)) => (Some((t, false)), Some(t)),
                        None => (None, None),
                    };
                    ev.old_columns = match old {
                        Some((t, keys_only)) => {
                            let mut old = ev.old_columns.take().unwrap_or_default();
                            self.columns(rel, t, keys_only, None, &mut Vec::new(), &mut old)?;
                            Some(old)
                        }
                        None => None,
                    };
                    let ChangeEvent {
                        columns,
                        unchanged_toast,
                        ..
                    } = &mut *ev;
                    self.columns(rel, &u.new, false, full_old, unchanged_toast, columns)?;
                    self.push_change(ev, ctx)?;
                }
            }
            LogicalMessage::Delete(d) => {
                let seq = next_seq(txn);
                let rel = self.relation(d.relid)?;
                if rel.streamed {
                    let mut ev = new_event(ctx, rel, Operation::Delete, lsn, txn, seq);
                    let tuple = d.old.tuple();
                    self.columns(
                        rel,
                        &tuple,
                        d.old.is_key(),
                        None,
                        &mut Vec::new(),
                        &mut ev.columns,
                    )?;
                    ev.old_columns = Some(ev.columns.clone());
                    self.push_change(ev, ctx)?;
                }
            }
            LogicalMessage::Truncate(t) => {
                for relid in &t.relids {
                    let seq = next_seq(txn);
                    let rel = self.relation(*relid)?;
                    if rel.streamed {
                        let mut ev = new_event(ctx, rel, Operation::Truncate, lsn, txn, seq);
                        ev.columns.clear();
                        ev.old_columns = None;
                        self.push_change(ev, ctx)?;
                    }
                }
            }
            // Origins, logical decoding messages and two-phase markers carry no row changes.
            _ => {}
        }
        Ok(())
    }

    fn relation(&self, relid: u32) -> Result<&RelationInfo, StreamError> {
        self.relations
            .get(&relid)
            .ok_or(StreamError::UnknownRelation(relid))
    }

    /// Typed columns of a tuple, written over `out` (reusing its names and text values).
    /// `keys_only` keeps just the replica identity columns (a 'K' tuple carries NULLs
    /// elsewhere). Unchanged TOAST values are taken from the full old row when there is one,
    /// otherwise listed in `unchanged`.
    fn columns(
        &self,
        rel: &RelationInfo,
        tuple: &TupleData<'_>,
        keys_only: bool,
        full_old: Option<&TupleData<'_>>,
        unchanged: &mut Vec<Arc<str>>,
        out: &mut Vec<ColumnValue>,
    ) -> Result<(), StreamError> {
        if tuple.len() != rel.columns.len() {
            return Err(StreamError::ColumnCount {
                relation: rel.qualified.clone(),
                got: tuple.len(),
                expected: rel.columns.len(),
            });
        }
        let mut n = 0;
        for (i, (cell, col)) in tuple.iter().zip(&rel.columns).enumerate() {
            if keys_only && !col.key {
                continue;
            }
            let cell = match cell {
                Cell::Unchanged => match full_old.and_then(|o| o.get(i)) {
                    Some(c) if !c.is_unchanged() => c,
                    _ => {
                        unchanged.push(Arc::clone(&col.name));
                        continue;
                    }
                },
                c => c,
            };
            if n == out.len() {
                out.push(ColumnValue {
                    name: Arc::clone(&col.name),
                    value: Value::Null,
                });
            } else if !Arc::ptr_eq(&out[n].name, &col.name) {
                out[n].name = Arc::clone(&col.name);
            }
            let value = &mut out[n].value;
            n += 1;
            match cell {
                Cell::Null | Cell::Unchanged => *value = Value::Null,
                Cell::Text(b) => {
                    if let Err(e) = decode_text_into(col.kind, b, value) {
                        if !self.warned_values.replace(true) {
                            // Names and kinds only: a row's value may be personal data and
                            // must not end up in logs.
                            log::warn!(
                                "{}.{}: a value is not a valid {} ({} expected{}); publishing the text as it is",
                                rel.qualified,
                                col.name,
                                e.what(),
                                e.expected(),
                                e.element()
                                    .map(|i| format!(", array element {i}"))
                                    .unwrap_or_default()
                            );
                        }
                        *value = Value::Text(String::from_utf8_lossy(b).into_owned());
                    }
                }
                Cell::Binary(b) => *value = Value::Bytes(b.to_vec()),
            }
        }
        out.truncate(n);
        Ok(())
    }

    /// Holds `ev` back and puts the change held before it on the ring.
    fn push_change(
        &mut self,
        ev: Box<ChangeEvent>,
        ctx: &mut WalContext,
    ) -> Result<(), StreamError> {
        match self.held.hold(ev) {
            Some(earlier) => self.push_now(earlier, ctx),
            None => Ok(()),
        }
    }

    fn push_now(&mut self, ev: Box<ChangeEvent>, ctx: &mut WalContext) -> Result<(), StreamError> {
        let seq = ev.seq;
        let shutdown = self.shutdown.clone();
        let mut keepalive = |ctx: &mut WalContext| self.keep_alive_while_waiting(ctx);
        push_wait(ctx, RingItem::Change(ev), &shutdown, false, &mut keepalive)?;
        ctx.stats.changes += 1;
        if seq % NOTIFY_EVERY == NOTIFY_EVERY - 1 {
            ctx.ring.notify();
        }
        Ok(())
    }

    /// While the ring is full: status updates keep the walsender from timing out.
    fn keep_alive_while_waiting(&mut self, ctx: &mut WalContext) -> Result<(), StreamError> {
        let due = self.last_status.elapsed() >= self.config.replication.standby_status_interval();
        self.send_status(ctx, due)
    }
}

/// An event for a change of `rel`: one the publisher gave back, or a new one. The caller
/// sets `columns` and `old_columns`; `unchanged_toast` is emptied.
fn new_event(
    ctx: &mut WalContext,
    rel: &RelationInfo,
    operation: Operation,
    lsn: Lsn,
    txn: &Txn,
    seq: u32,
) -> Box<ChangeEvent> {
    match ctx.ring.recycled() {
        Some(mut ev) => {
            if !Arc::ptr_eq(&ev.table, &rel.table) {
                ev.table = Arc::clone(&rel.table);
            }
            ev.operation = operation;
            ev.lsn = lsn;
            ev.commit_lsn = txn.commit_lsn;
            ev.timeline = txn.timeline;
            ev.xid = txn.xid;
            ev.commit_time = txn.commit_time;
            ev.seq = seq;
            ev.last_in_tx = false;
            ev.unchanged_toast.clear();
            ev
        }
        None => Box::new(ChangeEvent {
            table: Arc::clone(&rel.table),
            operation,
            lsn,
            commit_lsn: txn.commit_lsn,
            timeline: txn.timeline,
            xid: txn.xid,
            commit_time: txn.commit_time,
            seq,
            last_in_tx: false,
            columns: Vec::with_capacity(rel.columns.len()),
            old_columns: None,
            unchanged_toast: Vec::new(),
        }),
    }
}

fn next_seq(txn: &mut Txn) -> u32 {
    let s = txn.seq;
    txn.seq = txn.seq.wrapping_add(1);
    s
}

/// Pushes onto the ring, waiting while it is full. `at_shutdown` pushes even after shutdown
/// was requested (the End marker); otherwise a requested shutdown aborts the wait.
fn push_wait(
    ctx: &mut WalContext,
    item: RingItem,
    shutdown: &Shutdown,
    at_shutdown: bool,
    while_waiting: &mut dyn FnMut(&mut WalContext) -> Result<(), StreamError>,
) -> Result<(), StreamError> {
    let mut item = item;
    let mut pause = Duration::from_micros(50);
    let started = Instant::now();
    let bytes = item_bytes(&item);
    loop {
        // Over the byte budget the ring counts as full, unless it is empty: one change larger
        // than the budget still goes, alone.
        match ctx.ring.try_push(item, bytes) {
            Ok(()) => return Ok(()),
            Err(back) => item = back,
        }
        ctx.telemetry
            .wal
            .ring_used
            .store(ctx.ring.capacity() as u64, Relaxed);
        if ctx.ring.reader_gone() {
            return Err(StreamError::PublisherGone);
        }
        if shutdown.is_triggered() && (!at_shutdown || started.elapsed() > Duration::from_secs(30))
        {
            return Err(StreamError::ShuttingDown);
        }
        ctx.ring.notify();
        while_waiting(ctx)?;
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: u32) -> Box<ChangeEvent> {
        Box::new(ChangeEvent {
            table: Arc::new(TableRef {
                schema: Arc::from("public"),
                table: Arc::from("t"),
                relation_id: 1,
            }),
            operation: Operation::Insert,
            lsn: Lsn(100),
            commit_lsn: Lsn(200),
            timeline: 1,
            xid: 7,
            commit_time: 0,
            seq,
            last_in_tx: false,
            columns: Vec::new(),
            old_columns: None,
            unchanged_toast: Vec::new(),
        })
    }

    /// Runs transactions of the given sizes through a [`HeldChange`] as the wal thread does:
    /// (seq, last_in_tx) of what reaches the ring, with `None` for each commit item.
    fn ring(sizes: &[u32]) -> Vec<Option<(u32, bool)>> {
        let mut held = HeldChange::default();
        let mut out = Vec::new();
        for &n in sizes {
            for seq in 0..n {
                if let Some(ev) = held.hold(change(seq)) {
                    out.push(Some((ev.seq, ev.last_in_tx)));
                }
            }
            if let Some(ev) = held.release_last() {
                out.push(Some((ev.seq, ev.last_in_tx)));
            }
            out.push(None);
        }
        out
    }

    #[test]
    fn only_the_last_change_of_a_transaction_is_marked() {
        assert_eq!(
            ring(&[3, 1, 0, 2]),
            vec![
                Some((0, false)),
                Some((1, false)),
                Some((2, true)),
                None,
                Some((0, true)),
                None,
                // A transaction with no published change (filtered tables) marks nothing.
                None,
                Some((0, false)),
                Some((1, true)),
                None,
            ]
        );
    }

    #[test]
    fn every_change_reaches_the_ring_once_and_before_its_commit() {
        let sizes = [5, 1, 1, 0, 300, 2];
        let out = ring(&sizes);
        let mut at = 0;
        for &n in &sizes {
            let txn = &out[at..at + n as usize + 1];
            let seqs: Vec<u32> = txn[..n as usize].iter().map(|c| c.unwrap().0).collect();
            assert_eq!(seqs, (0..n).collect::<Vec<_>>());
            let marked = txn[..n as usize].iter().filter(|c| c.unwrap().1).count();
            assert_eq!(marked, usize::from(n > 0));
            assert_eq!(txn[n as usize], None);
            at += n as usize + 1;
        }
        assert_eq!(at, out.len());
    }
}
