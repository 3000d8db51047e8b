//! The ring between the wal thread and the sink: a bounded single-producer single-consumer
//! queue of [`RingItem`]s, a byte budget, the way back for published events, and the wake-up.
//!
//! [`channel`] makes both ends: the wal side holds the [`RingWriter`], the sink the
//! [`RingReader`]. Dropping the reader (the sink's thread ended) is what the wal side sees as
//! `RingWriter::reader_gone`.
//!
//! The ring is bounded by a count of items, which bounds memory only as long as rows are
//! small: 4 096 changes of 100 KB rows would be 400 MB. So the bytes that the queued changes
//! hold are counted too, and the wal thread waits (as it does when the ring is full) while
//! they are over the budget, so PostgreSQL keeps the WAL instead of the bridge's memory.
//!
//! Each side counts only what it moved itself, on its own cache line: the wal thread the bytes
//! it pushed, the sink the bytes it popped (stored once per batch, not per change), so the
//! hot path pays no shared read-modify-write.
//!
//! A wal thread waiting for room sleeps on a descriptor (`RingWriter::room_fd`) that the
//! sink makes readable once a few hundred slots are free and the ring holds at most half its
//! bytes (or it is empty), and only when the wal thread said it waits: one wake-up per few
//! hundred changes at full speed, none while the broker takes nothing.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use tokio::sync::Notify;

use crate::pg::value::Value;
use crate::pg::Lsn;

use crate::wire::event::{ChangeEvent, ColumnValue};
use crate::wire::outbox::OutboxEvent;

/// Most published events kept for the wal thread to reuse.
const RECYCLE_CAPACITY: usize = 1024;

/// Free slots at which the sink wakes a wal thread waiting for room (at most half the ring):
/// enough that one wake-up serves a burst of changes, few enough that the events given back
/// while it slept still fit the way back for reuse instead of being freed and made again.
const ROOM_MARK: usize = RECYCLE_CAPACITY / 2;

/// What travels through the ring from the wal thread to the sink.
#[derive(Debug)]
pub enum RingItem {
    /// One change to publish, and the heap bytes it holds (`event_bytes`), counted once
    /// when the item is made (see [`RingItem::change`]): the wal side adds them to the budget,
    /// the sink takes them off, and the sink decides by them whether to recycle the event.
    Change {
        /// The change.
        event: Box<ChangeEvent>,
        /// Its heap bytes.
        bytes: u64,
    },
    /// One outbox event to publish, in its place among its transaction's changes.
    Outbox(Box<OutboxEvent>),
    /// The end of a transaction: durable once everything before it is delivered.
    Commit {
        /// The commit record's end: the position to report as flushed.
        end_lsn: Lsn,
    },
    /// No more items: the wal thread is stopping.
    End,
}

/// The two ends of a ring of `capacity` items holding at most `max_bytes` of changes (one
/// change larger than that still goes, alone).
pub fn channel(capacity: usize, max_bytes: u64) -> (RingWriter, RingReader) {
    let (producer, consumer) = rtrb::RingBuffer::<RingItem>::new(capacity);
    // Published events go back to the wal thread to be reused (bounded: at most this many
    // wait there, the rest are dropped).
    let (recycle, recycled) =
        rtrb::RingBuffer::<Box<ChangeEvent>>::new(capacity.min(RECYCLE_CAPACITY));
    let budget = Arc::new(RingBudget::new(max_bytes));
    let notify = Arc::new(Notify::new());
    // The reader's end closes with it, which makes the writer's end readable: the wal
    // thread learns that the sink is gone while it sleeps in `poll`.
    let (gone, alive) = match UnixStream::pair() {
        Ok((gone, alive)) => (Some(gone), Some(alive)),
        Err(_) => (None, None),
    };
    let waiting = Arc::new(CachePadded::new(AtomicBool::new(false)));
    let (room, made_room) = room_pair();
    (
        RingWriter {
            producer,
            recycled,
            budget: Arc::clone(&budget),
            notify: Arc::clone(&notify),
            gone,
            waiting: Arc::clone(&waiting),
            room,
        },
        RingReader {
            consumer,
            recycle,
            budget,
            notify,
            _alive: alive,
            waiting,
            made_room,
            room_mark: (capacity / 2).min(ROOM_MARK),
        },
    )
}

/// The wal side's and the sink's ends of the room signal, both non-blocking: the sink never
/// waits to signal (a full socket buffer already holds a wake-up), the wal side drains
/// without waiting. `None` when no socket pair could be made (the wal side then sleeps and
/// looks again).
fn room_pair() -> (Option<UnixStream>, Option<UnixStream>) {
    match UnixStream::pair() {
        Ok((room, made_room))
            if room.set_nonblocking(true).is_ok() && made_room.set_nonblocking(true).is_ok() =>
        {
            (Some(room), Some(made_room))
        }
        _ => (None, None),
    }
}

/// The wal side of the ring.
pub struct RingWriter {
    producer: rtrb::Producer<RingItem>,
    /// Events the sink is done with, to be filled again: their vectors and strings keep their
    /// allocations, so a change in the steady state allocates nothing.
    recycled: rtrb::Consumer<Box<ChangeEvent>>,
    budget: Arc<RingBudget>,
    notify: Arc<Notify>,
    /// Readable once the reader is dropped (see [`RingWriter::gone_fd`]).
    gone: Option<UnixStream>,
    /// Set while the wal side waits for room (see [`RingWriter::expect_room`]).
    waiting: Arc<CachePadded<AtomicBool>>,
    /// Readable once the sink made room while [`RingWriter::waiting`] was set.
    room: Option<UnixStream>,
}

impl RingWriter {
    /// Pushes `item`, which holds `bytes` (see [`item_bytes`]), unless the ring is full or,
    /// not being empty, over its byte budget: then the item comes back.
    pub(crate) fn try_push(&mut self, item: RingItem, bytes: u64) -> Result<(), RingItem> {
        if self.over_budget(bytes) {
            return Err(item);
        }
        match self.producer.push(item) {
            Ok(()) => {
                self.budget.pushed(bytes);
                Ok(())
            }
            Err(rtrb::PushError::Full(back)) => Err(back),
        }
    }

    /// True when `bytes` more would go over the byte budget and the ring is not empty (one
    /// change larger than the budget still goes, alone).
    fn over_budget(&self, bytes: u64) -> bool {
        bytes > 0
            && self.budget.would_exceed(bytes)
            && self.producer.slots() < self.producer.buffer().capacity()
    }

    /// True when [`RingWriter::try_push`] would take an item of `bytes` now.
    fn fits(&self, bytes: u64) -> bool {
        self.producer.slots() > 0 && !self.over_budget(bytes)
    }

    /// A descriptor that becomes readable when the sink made room after
    /// [`RingWriter::expect_room`]; `None` when no socket pair could be made.
    pub(crate) fn room_fd(&self) -> Option<RawFd> {
        self.room.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Before sleeping on [`RingWriter::room_fd`]: asks the sink to signal room, then looks
    /// once more. False when an item of `bytes` fits already (then do not sleep: the signal
    /// may never come). Either the sink sees the request after it popped, or this look sees
    /// what it popped.
    pub(crate) fn expect_room(&self, bytes: u64) -> bool {
        self.waiting.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.fits(bytes) {
            self.waiting.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// After the sleep on [`RingWriter::room_fd`]: takes the signal (and a late one from an
    /// earlier wait) and withdraws the request.
    pub(crate) fn end_room_wait(&self) {
        self.waiting.store(false, Ordering::Relaxed);
        if let Some(mut room) = self.room.as_ref() {
            let mut buf = [0u8; 64];
            while matches!(room.read(&mut buf), Ok(n) if n > 0) {}
        }
    }

    /// `RingWriter::try_push` with the item's bytes counted here.
    pub fn push(&mut self, item: RingItem) -> Result<(), RingItem> {
        let bytes = item_bytes(&item);
        self.try_push(item, bytes)
    }

    /// Wakes the sink.
    pub(crate) fn notify(&self) {
        self.notify.notify_one();
    }

    /// Items the ring holds at most.
    pub(crate) fn capacity(&self) -> usize {
        self.producer.buffer().capacity()
    }

    /// Items on the ring now (reads the sink's position: not for every change).
    pub(crate) fn used(&self) -> usize {
        self.capacity() - self.producer.slots()
    }

    /// True once the sink dropped its end: nothing more can be delivered.
    pub(crate) fn reader_gone(&self) -> bool {
        self.producer.is_abandoned()
    }

    /// An event the sink gave back, to be filled again.
    pub(crate) fn recycled(&mut self) -> Option<Box<ChangeEvent>> {
        self.recycled.pop().ok()
    }

    /// A descriptor that becomes readable when the sink dropped its end, to `poll` beside
    /// the wal thread's socket; `None` when no socket pair could be made (then only
    /// [`RingWriter::reader_gone`] tells, and the caller must look at it now and then).
    pub(crate) fn gone_fd(&self) -> Option<RawFd> {
        self.gone.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Closes the ring and wakes the sink, which ends once it has taken what is left.
    pub(crate) fn close(self) {
        drop(self);
    }
}

impl Drop for RingWriter {
    /// The sink sleeps until it is woken: dropping this end (also on an early return or
    /// while unwinding) wakes it to see the ring closed. The producer goes first (swapped
    /// for an empty one), so the woken sink finds the ring abandoned.
    fn drop(&mut self) {
        drop(std::mem::replace(
            &mut self.producer,
            rtrb::RingBuffer::new(1).0,
        ));
        self.notify.notify_one();
    }
}

/// The sink side of the ring.
pub struct RingReader {
    consumer: rtrb::Consumer<RingItem>,
    recycle: rtrb::Producer<Box<ChangeEvent>>,
    budget: Arc<RingBudget>,
    notify: Arc<Notify>,
    /// Closed with the reader: the writer's [`RingWriter::gone_fd`] then becomes readable.
    _alive: Option<UnixStream>,
    /// Set by the wal side while it waits for room.
    waiting: Arc<CachePadded<AtomicBool>>,
    /// Written to make the wal side's [`RingWriter::room_fd`] readable.
    made_room: Option<UnixStream>,
    /// Free slots at which a waiting wal side is woken.
    room_mark: usize,
}

impl RingReader {
    /// The next item, if one is waiting.
    pub(crate) fn pop(&mut self) -> Option<RingItem> {
        self.consumer.pop().ok()
    }

    /// True when no item is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.consumer.is_empty()
    }

    /// Items waiting.
    pub(crate) fn len(&self) -> usize {
        self.consumer.slots()
    }

    /// True once the wal side dropped its end and every item was taken.
    pub(crate) fn is_closed(&self) -> bool {
        self.consumer.is_abandoned() && self.consumer.is_empty()
    }

    /// What the wal side wakes the sink with.
    pub(crate) fn notify(&self) -> Arc<Notify> {
        Arc::clone(&self.notify)
    }

    /// Gives `bytes` of popped changes back to the budget (once per batch), and wakes the
    /// wal side if it waits for room and the ring has [`ROOM_MARK`] free slots (at most half
    /// the ring) and holds at most half its bytes, or is empty.
    pub(crate) fn popped(&self, bytes: u64) {
        self.budget.popped(bytes);
        // Pairs with the fence in `RingWriter::expect_room`: the pops above are seen there,
        // or the request is seen here.
        fence(Ordering::SeqCst);
        if !self.waiting.load(Ordering::Relaxed) {
            return;
        }
        let free = self.consumer.buffer().capacity() - self.consumer.slots();
        let room = free >= self.room_mark && self.budget.at_most_half();
        if (room || self.consumer.is_empty()) && self.waiting.swap(false, Ordering::Relaxed) {
            if let Some(mut made_room) = self.made_room.as_ref() {
                // A full socket buffer already holds a wake-up.
                let _ = made_room.write(&[1]);
            }
        }
    }

    /// Hands a delivered event back to the wal thread for reuse (dropped when the way back
    /// is full).
    pub(crate) fn recycle(&mut self, ev: Box<ChangeEvent>) {
        let _ = self.recycle.push(ev);
    }
}

impl RingItem {
    /// The item of a change, with its bytes counted.
    pub fn change(event: Box<ChangeEvent>) -> Self {
        let bytes = event_bytes(&event);
        RingItem::Change { event, bytes }
    }
}

/// The bytes `item` counts against the budget.
pub(crate) fn item_bytes(item: &RingItem) -> u64 {
    match item {
        RingItem::Change { bytes, .. } => *bytes,
        RingItem::Outbox(ev) => outbox_bytes(ev),
        _ => 0,
    }
}

/// Bytes pushed and popped, and the limit on their difference.
#[derive(Debug)]
pub(crate) struct RingBudget {
    pushed: CachePadded<AtomicU64>,
    popped: CachePadded<AtomicU64>,
    limit: u64,
}

impl RingBudget {
    /// A budget of `limit` bytes.
    pub(crate) fn new(limit: u64) -> Self {
        RingBudget {
            pushed: CachePadded::new(AtomicU64::new(0)),
            popped: CachePadded::new(AtomicU64::new(0)),
            limit,
        }
    }

    /// Bytes held by the changes on the ring now.
    pub(crate) fn used(&self) -> u64 {
        self.pushed
            .load(Ordering::Relaxed)
            .saturating_sub(self.popped.load(Ordering::Acquire))
    }

    /// True when the changes on the ring hold at most half the limit.
    pub(crate) fn at_most_half(&self) -> bool {
        self.used() <= self.limit / 2
    }

    /// True when `bytes` more would go over the limit.
    pub(crate) fn would_exceed(&self, bytes: u64) -> bool {
        self.used().saturating_add(bytes) > self.limit
    }

    /// Wal side: `bytes` were pushed.
    pub(crate) fn pushed(&self, bytes: u64) {
        // Only the wal thread writes this counter.
        let total = self.pushed.load(Ordering::Relaxed) + bytes;
        self.pushed.store(total, Ordering::Relaxed);
    }

    /// Publisher side: `bytes` more were popped since the last call.
    pub(crate) fn popped(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        // Only the publisher writes this counter.
        let total = self.popped.load(Ordering::Relaxed) + bytes;
        self.popped.store(total, Ordering::Release);
    }
}

/// The heap memory a change holds (its buffers' capacities, which is what recycling keeps),
/// not counting the names and table shared with the relation cache.
fn event_bytes(ev: &ChangeEvent) -> u64 {
    let columns = |cols: &Vec<ColumnValue>| -> usize {
        cols.capacity() * std::mem::size_of::<ColumnValue>()
            + cols.iter().map(|c| value_bytes(&c.value)).sum::<usize>()
    };
    let mut n = std::mem::size_of::<ChangeEvent>() + columns(&ev.columns);
    if let Some(old) = &ev.old_columns {
        n += columns(old);
    }
    n += ev.unchanged_toast.capacity() * std::mem::size_of::<std::sync::Arc<str>>();
    n as u64
}

/// The heap memory an outbox event holds.
pub(crate) fn outbox_bytes(ev: &OutboxEvent) -> u64 {
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
    (std::mem::size_of::<OutboxEvent>()
        + ev.payload.capacity()
        + text(&ev.id)
        + text(&ev.aggregate_type)
        + text(&ev.aggregate_id)
        + text(&ev.event_type)) as u64
}

fn value_bytes(v: &Value) -> usize {
    match v {
        Value::Text(s) => s.capacity(),
        Value::Bytes(b) => b.capacity(),
        Value::Array(items) => {
            items.capacity() * std::mem::size_of::<Value>()
                + items.iter().map(value_bytes).sum::<usize>()
        }
        Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pg::Lsn;
    use crate::wire::event::{Operation, TableRef};

    fn event(columns: Vec<ColumnValue>) -> ChangeEvent {
        ChangeEvent {
            table: Arc::new(TableRef {
                columns: Vec::new(),
                schema: Arc::from("public"),
                table: Arc::from("t"),
                relation_id: 1,
                key_columns: Vec::new(),
            }),
            operation: Operation::Insert,
            lsn: Lsn(1),
            commit_lsn: Lsn(1),
            timeline: 1,
            xid: 1,
            commit_time: 0,
            seq: 0,
            last_in_tx: false,
            columns,
            old_columns: None,
            unchanged_toast: Vec::new(),
        }
    }

    #[test]
    fn wide_values_count_by_capacity() {
        let small = event_bytes(&event(vec![ColumnValue {
            name: Arc::from("id"),
            value: Value::Int(1),
        }]));
        let mut text = String::with_capacity(100_000);
        text.push('x');
        let wide = event_bytes(&event(vec![
            ColumnValue {
                name: Arc::from("id"),
                value: Value::Int(1),
            },
            ColumnValue {
                name: Arc::from("body"),
                value: Value::Array(vec![Value::Text(text), Value::Bytes(vec![0; 10])]),
            },
        ]));
        assert!(small < 1_000, "{small}");
        assert!(wide >= 100_010, "{wide}");
    }

    fn readable(fd: std::os::fd::RawFd) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a timeout of 0 never blocks.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }

    #[test]
    fn the_writer_sees_the_reader_go_on_its_descriptor() {
        let (writer, reader) = channel(4, 1 << 20);
        let fd = writer.gone_fd().expect("a socket pair");
        assert!(!readable(fd));
        assert!(!writer.reader_gone());
        drop(reader);
        assert!(readable(fd));
        assert!(writer.reader_gone());
    }

    #[test]
    fn dropping_the_writer_closes_the_ring_and_leaves_a_wake_up() {
        let (mut writer, reader) = channel(4, 1 << 20);
        assert!(writer.push(RingItem::Commit { end_lsn: Lsn(1) }).is_ok());
        let notify = reader.notify();
        drop(writer);
        assert!(!reader.is_closed(), "an item is left");
        let rt = crate::runtime::current_thread().unwrap();
        // The permit stored by the drop completes the wait at once.
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), notify.notified()).await
        })
        .expect("woken");
        let mut reader = reader;
        assert!(matches!(reader.pop(), Some(RingItem::Commit { .. })));
        assert!(reader.is_closed());
    }

    #[test]
    fn a_waiting_writer_is_woken_once_half_a_small_ring_is_free() {
        let (mut writer, mut reader) = channel(8, 1 << 20);
        let room = writer.room_fd().expect("a socket pair");
        for i in 0..8 {
            assert!(writer.push(RingItem::Commit { end_lsn: Lsn(i) }).is_ok());
        }
        // Popped without a request: no signal.
        reader.pop();
        reader.popped(0);
        assert!(!readable(room));
        assert!(writer.push(RingItem::Commit { end_lsn: Lsn(8) }).is_ok());
        assert!(writer.expect_room(0), "full: the writer must sleep");
        for _ in 0..3 {
            reader.pop();
        }
        reader.popped(0);
        assert!(!readable(room), "5 of 8 left: not yet");
        reader.pop();
        reader.popped(0);
        assert!(readable(room), "4 of 8 left: woken");
        writer.end_room_wait();
        assert!(!readable(room), "the signal is taken");
        // The request was withdrawn with the signal: later pops signal nothing.
        reader.pop();
        reader.popped(0);
        assert!(!readable(room));
    }

    #[test]
    fn a_writer_whose_item_fits_does_not_wait() {
        let (mut writer, mut reader) = channel(8, 1000);
        let room = writer.room_fd().expect("a socket pair");
        assert!(!writer.expect_room(0), "empty ring");
        assert!(writer
            .try_push(RingItem::Commit { end_lsn: Lsn(1) }, 600)
            .is_ok());
        assert!(!writer.expect_room(400), "within the budget");
        assert!(writer.expect_room(401), "over the budget");
        // Down to half the items but not half the bytes: the request stays.
        assert!(writer.push(RingItem::Commit { end_lsn: Lsn(2) }).is_ok());
        reader.pop();
        reader.popped(0);
        assert!(!readable(room));
        // Empty: woken whatever the bytes.
        reader.pop();
        reader.popped(600);
        assert!(readable(room));
        writer.end_room_wait();
        assert!(!writer.expect_room(401));
    }

    #[test]
    fn the_budget_is_the_difference_of_both_sides() {
        let b = RingBudget::new(1000);
        assert!(!b.would_exceed(1000));
        assert!(b.would_exceed(1001));
        b.pushed(600);
        b.pushed(300);
        assert_eq!(b.used(), 900);
        assert!(b.would_exceed(101));
        b.popped(600);
        assert_eq!(b.used(), 300);
        assert!(!b.would_exceed(700));
        b.popped(0);
        b.popped(300);
        assert_eq!(b.used(), 0);
    }
}
