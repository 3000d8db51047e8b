//! The wal thread's I/O loop: reads the replication stream, has `Translator` turn pgoutput
//! into [`ChangeEvent`]s, hands them through the ring to the publisher, answers keepalives
//! and reports the durable position to PostgreSQL.
//!
//! Transactions reach the ring as their changes followed by a [`RingItem::Commit`] carrying
//! the commit's `end_lsn`; the publisher advances the durable position to it once every
//! message before it has a PubAck. Streamed (in-progress) transactions are spooled to disk and
//! only put on the ring at Stream Commit. When the ring is full this thread waits (PostgreSQL
//! keeps the WAL) but keeps sending status updates so the walsender does not time out.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::pg::conn::{poll_readable, PgError};
use crate::pg::framing::{parse_copy_data, FramingError, ReplicationMessage};
use crate::pg::invalidation;
use crate::pg::replication::{PgOutputOptions, ReplicationConnection};
use crate::pg::Lsn;
use crate::shutdown::Shutdown;
use crate::telemetry::counters::DurableLsn;
use crate::telemetry::Telemetry;

use super::durable::{StateFileError, StateWriter};
use super::spool::{Spool, SpoolError};
use super::translate::{Emit, TranslateError, Translator};
use crate::outbox::OutboxTables;
use crate::pg::timeline::TimelineHistory;
use crate::sink::ring::{item_bytes, RingItem, RingWriter};
use crate::wire::event::{ChangeEvent, TableRef};
use crate::wire::outbox::OutboxEvent;

/// Longest wait for the server when the shutdown signal or the publisher's end cannot wake
/// the wait (no descriptor for them): then the flags are looked at this often.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Least time between two status updates sent only because the durable position moved; also
/// how often the thread looks at the durable position while something waits to be confirmed
/// (the publisher moves it without waking this thread).
const STATUS_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest wait for room on the ring for the End marker once shutdown was requested.
const SHUTDOWN_PUSH_LIMIT: Duration = Duration::from_secs(30);
/// The same while the durable position keeps moving: each update also writes and syncs the
/// state file, and at a steady rate ten of them a second cost more CPU than the changes' own
/// publishing. Once the position stands still for [`STATUS_MIN_INTERVAL`] (the stream
/// paused, or the sink stopped acknowledging), the quicker cadence confirms it.
const STATUS_BUSY_INTERVAL: Duration = Duration::from_secs(1);
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
    /// A message could not be turned into change events (decoding, relations, the spool).
    #[error(transparent)]
    Translate(#[from] TranslateError),
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
    /// The server refuses to stream from the slot: it was invalidated. The one-line advice.
    #[error("{0}")]
    SlotInvalidated(String),
}

impl From<SpoolError> for StreamError {
    fn from(e: SpoolError) -> Self {
        StreamError::Translate(TranslateError::Spool(e))
    }
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
    pub schema_changes: Option<tokio::sync::mpsc::UnboundedSender<TableRef>>,
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

/// The replication stream of one connection.
pub struct WalStream<'c> {
    link: Link<'c>,
    /// pgoutput to events: everything the stream described so far.
    translate: Translator,
    /// XLogData messages received, for sampling the processing time.
    xlog_messages: u64,
    /// Where streamed transactions are spooled.
    spool_dir: std::path::PathBuf,
    server_version: i32,
}

/// The connection's side of the wal thread: the replication connection and what its status
/// updates need.
struct Link<'c> {
    repl: ReplicationConnection,
    config: &'c Config,
    shutdown: Shutdown,
    last_received: Lsn,
    idle_candidate: Lsn,
    /// The translator's [`Translator::hold_point`]: no confirmation past a waiting PREPARE.
    hold: Option<Lsn>,
    last_status: Instant,
    /// Silence after which the connection is given up ([`StreamError::Silent`]); at half of
    /// it a status update asks the server for an answer.
    receive_timeout: Duration,
    /// When something last arrived from the server.
    last_heard: Instant,
    /// Whether an answer was asked for since then.
    pinged: bool,
    /// The flush position last wanted, and since when: one that keeps moving is reported
    /// at [`STATUS_BUSY_INTERVAL`], after the first update once it started to move.
    /// `None` before the first: it counts as having stood still.
    wanted: Option<(Lsn, Instant)>,
    /// The position started to move after standing still, and no write was asked for since.
    started_moving: bool,
    /// When the state file was last asked to store a position.
    last_request: Instant,
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
            link: Link {
                repl,
                config,
                shutdown,
                last_received: Lsn::INVALID,
                idle_candidate: Lsn::INVALID,
                hold: None,
                last_status: Instant::now(),
                receive_timeout: config.replication.wal_receive_timeout(Duration::ZERO),
                last_heard: Instant::now(),
                pinged: false,
                wanted: None,
                started_moving: false,
                last_request: Instant::now(),
            },
            translate: {
                let mut t = Translator::new(tables, timelines);
                t.set_outbox(OutboxTables::new(&config.outbox));
                t
            },
            xlog_messages: 0,
            spool_dir,
            server_version,
        }
    }

    /// Gives the connection up after `timeout` of silence (see [`StreamError::Silent`]).
    pub fn with_receive_timeout(mut self, timeout: Duration) -> Self {
        self.link.receive_timeout = timeout;
        self
    }

    /// Streams from `start` (the server starts at the later of it and the slot's
    /// confirmed position) until shutdown, then drains the ring and reports the final flush.
    pub fn run(&mut self, start: Lsn, ctx: &mut WalContext) -> Result<(), StreamError> {
        let link = &mut self.link;
        let options = PgOutputOptions::for_server(
            self.server_version,
            vec![link.config.replication.publication.clone()],
        );
        let slot = &link.config.replication.slot;
        link.repl
            .start_logical(slot, start, &options)
            .map_err(|e| match invalidation::reason_from_error(&e) {
                Some(reason) => StreamError::SlotInvalidated(invalidation::advice(slot, &reason)),
                None => StreamError::Pg(e),
            })?;
        log::info!("pgoutput {} from {start}", options.describe());
        // Only now is the slot ours: a standby waiting for it must not touch the spool, and
        // what an earlier (crashed) run left there is stale, so it is emptied.
        self.translate.set_spool(Spool::new(&self.spool_dir)?);
        ctx.telemetry.wal.set_connected(true);
        ctx.telemetry.set_pg_problem(None);
        // Logged once START_REPLICATION succeeded: a standby waiting for the slot never says it.
        if ctx.telemetry.mark_stream_established() {
            log::info!(
                "streaming started in {} ms",
                ctx.telemetry.uptime().as_millis()
            );
        }
        link.last_received = start;
        link.last_heard = Instant::now();
        link.pinged = false;
        let status_interval = link.config.replication.standby_status_interval();
        // Between messages the thread sleeps in `poll` until data, a deadline of its own, the
        // shutdown signal or the publisher's end: no periodic wake-ups when idle.
        let wake: Vec<std::os::fd::RawFd> = [link.shutdown.wake_fd(), ctx.ring.gone_fd()]
            .into_iter()
            .flatten()
            .collect();
        let max_wait = if wake.len() == 2 {
            Duration::MAX
        } else {
            POLL_INTERVAL
        };
        let batch_wait = link.config.replication.batch_wait();
        // When the last wait for the server ended with data: the next read that would wait
        // first lets more gather until `batch_wait` after it.
        let mut read_at: Option<Instant> = None;
        // Changes and transactions pushed when the publisher was last woken.
        let mut notified = ctx.stats.changes + ctx.stats.transactions;
        // A message was handled since the end of the last batch.
        let mut heard = false;
        while !link.shutdown.is_triggered() {
            if ctx.ring.reader_gone() {
                return Err(StreamError::PublisherGone);
            }
            // What libpq holds already is handled without a system call.
            let mut received = link.repl.recv_or_wake(Duration::ZERO, &[])?;
            if received.is_none() {
                // Everything received is handled: once per batch, not per message, wake the
                // publisher for all of it, update the counters and send a due status update.
                let now = Instant::now();
                if heard {
                    heard = false;
                    link.last_heard = now;
                    link.pinged = false;
                    ctx.publish_counters(link.last_received);
                }
                let pushed = ctx.stats.changes + ctx.stats.transactions;
                if pushed != notified {
                    notified = pushed;
                    ctx.ring.notify();
                }
                let due = now.duration_since(link.last_status) >= status_interval;
                link.send_status(ctx, due, self.translate.is_idle())?;
                // Let more gather while the server has nothing more yet, so that one wake-up
                // of this thread and of the publisher serves several transactions; never
                // while data waits (a backlog is read at full speed).
                if let Some(until) = read_at.take().map(|t| t + batch_wait) {
                    if now < until && !link.repl.readable_now()? {
                        // Sleeps unless the shutdown signal or the publisher's end wakes it.
                        poll_readable(&wake, (until - now).min(max_wait)).map_err(PgError::Io)?;
                        continue;
                    }
                }
                let wait = link
                    .next_wait(ctx, self.translate.is_idle(), status_interval)
                    .min(max_wait);
                received = link.repl.recv_or_wake(wait, &wake)?;
                if received.is_some() && !batch_wait.is_zero() {
                    read_at = Some(Instant::now());
                }
            }
            let Some(buf) = received else {
                ctx.sample_ring();
                link.check_silence(ctx)?;
                continue;
            };
            heard = true;
            ctx.stats.wal_messages += 1;
            match parse_copy_data(&buf)? {
                ReplicationMessage::XLogData(x) => {
                    self.xlog_messages += 1;
                    let timed = (self.xlog_messages % TIME_EVERY == 1).then(Instant::now);
                    link.last_received = link.last_received.max(x.wal_end);
                    let mut ring = Ring {
                        link: &mut *link,
                        ctx: &mut *ctx,
                    };
                    let translated = self.translate.message(x.data, x.wal_start, &mut ring);
                    link.hold = self.translate.hold_point();
                    match translated {
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
                    link.last_received = link.last_received.max(k.wal_end);
                    link.idle_candidate = link.idle_candidate.max(k.wal_end);
                    if k.reply_requested {
                        link.send_status(ctx, true, self.translate.is_idle())?;
                    }
                }
            }
        }
        self.finish(ctx)
    }

    /// Shutdown: tell the publisher no more items come, wait for it to drain (bounded),
    /// report the final flush and end the stream.
    fn finish(&mut self, ctx: &mut WalContext) -> Result<(), StreamError> {
        // A half-received transaction is dropped: PostgreSQL sends it again next time.
        self.translate.drop_open();
        let idle = self.translate.is_idle();
        let link = &mut self.link;
        push_wait(ctx, RingItem::End, &link.shutdown, true, &mut |_| {
            Ok(SHUTDOWN_PUSH_LIMIT)
        })?;
        ctx.ring.notify();
        let deadline = Instant::now() + SHUTDOWN_DRAIN_TIMEOUT;
        while ctx.durable.get() < ctx.last_pushed_end
            && !ctx.ring.reader_gone()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
            let due = link.last_status.elapsed() >= Duration::from_secs(1);
            link.send_status(ctx, due, idle)?;
        }
        link.send_status_with(ctx, true, true, idle)?;
        link.repl.stop(STOP_TIMEOUT)?;
        Ok(())
    }
}

impl Link<'_> {
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

    /// How long the thread may wait for the server before it has something to do by itself:
    /// soon while a position waits to be confirmed, otherwise until the next status update
    /// or silence check is due.
    fn next_wait(&self, ctx: &WalContext, idle: bool, status_interval: Duration) -> Duration {
        if ctx.durable.get() < ctx.last_pushed_end
            || self.wanted_flush(ctx, idle) > ctx.reported_flush
        {
            return STATUS_MIN_INTERVAL;
        }
        let status_due = status_interval.saturating_sub(self.last_status.elapsed());
        let silence_limit = if self.pinged {
            self.receive_timeout
        } else {
            self.receive_timeout / 2
        };
        let silence_due = silence_limit.saturating_sub(self.last_heard.elapsed());
        status_due.min(silence_due)
    }

    /// The flush position to report: the durable one, or, when everything received is
    /// durable and no transaction is open, the last keepalive's WAL end; never past a
    /// waiting PREPARE, never back.
    fn wanted_flush(&self, ctx: &WalContext, idle: bool) -> Lsn {
        let durable = ctx.durable.get();
        let drained = durable >= ctx.last_pushed_end;
        let mut flush = durable;
        if drained && idle {
            flush = flush.max(self.idle_candidate);
        }
        if let Some(hold) = self.hold {
            flush = flush.min(hold);
        }
        flush.max(ctx.reported_flush)
    }

    /// Sends a standby status update when forced, or when the flush position moved (at most
    /// every [`STATUS_MIN_INTERVAL`], or [`STATUS_BUSY_INTERVAL`] while it keeps moving). The
    /// flush position is the durable one, or, when everything received is durable and no
    /// transaction is open, the last keepalive's WAL end, so an idle or filtered database does
    /// not pile up WAL.
    /// `idle`: the translator has nothing open ([`Translator::is_idle`]).
    fn send_status(
        &mut self,
        ctx: &mut WalContext,
        force: bool,
        idle: bool,
    ) -> Result<(), StreamError> {
        self.send_status_with(ctx, force, false, idle)
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
        idle: bool,
    ) -> Result<(), StreamError> {
        let flush = self.wanted_flush(ctx, idle);
        let moved = flush > ctx.reported_flush;
        let (mut write_due, mut confirm_due) = (false, false);
        if moved {
            let now = Instant::now();
            let since = match self.wanted {
                Some((lsn, since)) if lsn == flush => since,
                previous => {
                    let stood_still =
                        previous.is_none_or(|(_, t)| now.duration_since(t) >= STATUS_MIN_INTERVAL);
                    self.started_moving |= stood_still;
                    self.wanted = Some((flush, now));
                    now
                }
            };
            let settled = now.duration_since(since) >= STATUS_MIN_INTERVAL;
            let least = if settled || self.started_moving {
                STATUS_MIN_INTERVAL
            } else {
                STATUS_BUSY_INTERVAL
            };
            let quick = now.duration_since(self.last_status) >= STATUS_MIN_INTERVAL;
            write_due = quick && now.duration_since(self.last_request) >= least;
            // What the state file holds already is confirmed at the quick cadence, without
            // asking for another write.
            confirm_due = quick && flush.min(ctx.state.stored()) > ctx.reported_flush;
        }
        if !force && !write_due && !confirm_due {
            return Ok(());
        }
        let stored = if wait_stored {
            ctx.state.store_now(flush, FINAL_STORE_TIMEOUT)?
        } else {
            if moved && (force || write_due) {
                ctx.state.request(flush);
                self.last_request = Instant::now();
                self.started_moving = false;
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

    /// While the ring is full: status updates keep the walsender from timing out. Returns
    /// how long the wait may last until the next one: the status interval, or
    /// [`STATUS_MIN_INTERVAL`] while a position waits to be confirmed (the publisher moves
    /// the durable position while this thread waits).
    fn keep_alive_while_waiting(
        &mut self,
        ctx: &mut WalContext,
        idle: bool,
    ) -> Result<Duration, StreamError> {
        let interval = self.config.replication.standby_status_interval();
        let due = self.last_status.elapsed() >= interval;
        self.send_status(ctx, due, idle)?;
        if ctx.durable.get() > ctx.reported_flush {
            return Ok(STATUS_MIN_INTERVAL);
        }
        Ok(interval.saturating_sub(self.last_status.elapsed()))
    }
}

/// The ring as the translator's output: a full ring is waited on with status updates, so
/// the walsender does not time out meanwhile.
struct Ring<'a, 'c> {
    link: &'a mut Link<'c>,
    ctx: &'a mut WalContext,
}

impl Ring<'_, '_> {
    /// Pushes one message (a change or an outbox event), keeping the connection alive while
    /// the ring is full.
    fn push_message(&mut self, item: RingItem, idle: bool) -> Result<(), StreamError> {
        let shutdown = self.link.shutdown.clone();
        let link = &mut *self.link;
        let mut keepalive = |ctx: &mut WalContext| link.keep_alive_while_waiting(ctx, idle);
        push_wait(self.ctx, item, &shutdown, false, &mut keepalive)?;
        self.ctx.stats.changes += 1;
        Ok(())
    }
}

impl Emit for Ring<'_, '_> {
    type Error = StreamError;

    fn change(&mut self, ev: Box<ChangeEvent>, idle: bool) -> Result<(), StreamError> {
        let seq = ev.seq;
        self.push_message(RingItem::change(ev), idle)?;
        if seq % NOTIFY_EVERY == NOTIFY_EVERY - 1 {
            self.ctx.ring.notify();
        }
        Ok(())
    }

    fn outbox(&mut self, ev: Box<OutboxEvent>, idle: bool) -> Result<(), StreamError> {
        self.push_message(RingItem::Outbox(ev), idle)
    }

    fn commit(&mut self, end_lsn: Lsn, idle: bool) -> Result<(), StreamError> {
        // A full ring can hold the commit back as long as a change: keep the walsender alive.
        let shutdown = self.link.shutdown.clone();
        let link = &mut *self.link;
        let mut keepalive = |ctx: &mut WalContext| link.keep_alive_while_waiting(ctx, idle);
        push_wait(
            self.ctx,
            RingItem::Commit { end_lsn },
            &shutdown,
            false,
            &mut keepalive,
        )?;
        let ctx = &mut *self.ctx;
        ctx.last_pushed_end = ctx.last_pushed_end.max(end_lsn);
        ctx.stats.transactions += 1;
        // The publisher is woken once the batch that holds this commit is read (the run
        // loop), not for every transaction.
        Ok(())
    }

    fn relation(&mut self, table: &TableRef) {
        if let Some(tx) = &self.ctx.schema_changes {
            // The schema writer compares with the stored revision; a closed channel only
            // means schemas are unavailable.
            let _ = tx.send(table.clone());
        }
    }

    fn recycled(&mut self) -> Option<Box<ChangeEvent>> {
        self.ctx.ring.recycled()
    }
}

/// Pushes onto the ring, waiting while it is full. `at_shutdown` pushes even after shutdown
/// was requested (the End marker); otherwise a requested shutdown aborts the wait.
/// `while_waiting` runs before each sleep and says how long the sleep may last at most.
///
/// The sleep ends when the publisher made room (it signals once a few hundred slots are free,
/// so a full-speed backlog wakes this thread once per few hundred changes), the publisher is
/// gone, the shutdown signal, or the deadline: no periodic wake-ups while the broker takes
/// nothing.
fn push_wait(
    ctx: &mut WalContext,
    item: RingItem,
    shutdown: &Shutdown,
    at_shutdown: bool,
    while_waiting: &mut dyn FnMut(&mut WalContext) -> Result<Duration, StreamError>,
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
        if shutdown.is_triggered() && (!at_shutdown || started.elapsed() > SHUTDOWN_PUSH_LIMIT) {
            return Err(StreamError::ShuttingDown);
        }
        ctx.ring.notify();
        let mut wait = while_waiting(ctx)?;
        let Some(room) = ctx.ring.room_fd() else {
            // No descriptor to wait on: look again after a growing pause.
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
            continue;
        };
        // The shutdown signal's descriptor stays readable once triggered: not watched while
        // the End marker waits after it (then the time limit ends the wait).
        let shutdown_fd = if at_shutdown {
            if shutdown.is_triggered() {
                wait = wait.min(SHUTDOWN_PUSH_LIMIT.saturating_sub(started.elapsed()));
            }
            None
        } else {
            shutdown.wake_fd()
        };
        let gone_fd = ctx.ring.gone_fd();
        // A flag without its descriptor is looked at this often, as in the run loop.
        if gone_fd.is_none() || (!at_shutdown && shutdown_fd.is_none()) {
            wait = wait.min(POLL_INTERVAL);
        }
        let fds: Vec<std::os::fd::RawFd> = [Some(room), gone_fd, shutdown_fd]
            .into_iter()
            .flatten()
            .collect();
        if ctx.ring.expect_room(bytes) {
            poll_readable(&fds, wait.max(Duration::from_millis(1))).map_err(PgError::Io)?;
        }
        ctx.ring.end_room_wait();
    }
}
