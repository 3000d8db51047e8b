//! The broker-neutral half of delivering changes: takes them off the ring in order, hands each
//! to a [`Delivery`] (the broker's half), and turns the broker's delivery progress into the
//! durable position, the ring's byte budget, recycled events, counters and commit latency.
//!
//! A broker only encodes, sends, tracks its own window and resends; it never sees
//! transactions, the ring or the durable position, so a new broker repeats none of this.
//!
//! The driver is generic over the delivery: every call per change is monomorphized, and the
//! only state kept per change is a small fixed-size record in a preallocated queue.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::pg::pgoutput::pg_to_unix_micros;
use crate::pg::Lsn;
use crate::sink::ring::{outbox_bytes, RingItem, RingReader};
use crate::telemetry::counters::{DurableLsn, PublisherStats};
use crate::wire::event::ChangeEvent;
use crate::wire::outbox::OutboxEvent;

/// A delivered change holding more heap than this is dropped instead of going back to the
/// wal thread for reuse: reused, its buffers would keep a burst of wide rows' memory for good.
const RECYCLE_MAX_EVENT_BYTES: u64 = 8 * 1024;

/// What a broker calls one change it took: consecutive from the first [`Delivery::send`],
/// one per change, in the order the changes were sent.
pub(crate) type Ticket = u64;

/// What [`Delivery::delivered`] reports: the broker's watermark and what it took to reach it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Every change whose ticket is below this is stored by the broker, for good. Never
    /// moves back.
    pub(crate) below: Ticket,
    /// Of the changes newly below the watermark, how many the broker reported as already
    /// stored (a resend of one whose answer was lost).
    pub(crate) duplicates: u64,
    /// Payload bytes of the changes newly below the watermark.
    pub(crate) bytes: u64,
}

/// What the driver tells [`Delivery::delivered`] about the changes behind the ones sent.
pub(crate) struct Feed<'a> {
    ring: &'a RingReader,
    notify: &'a Notify,
    open: bool,
}

impl Feed<'_> {
    /// False once the ring's end was taken: no change will come any more.
    pub(crate) fn open(&self) -> bool {
        self.open
    }

    /// Changes (and transaction ends) waiting on the ring.
    pub(crate) fn waiting(&self) -> usize {
        self.ring.len()
    }

    /// Completes when the wal side pushed more (or closed the ring).
    pub(crate) async fn more(&self) {
        self.notify.notified().await;
    }
}

/// The broker's half of a sink: delivers single changes and reports, as a watermark, how far
/// delivery got. Run by [`run`] on the sink's thread.
///
/// What a broker must guarantee (the durable position, and so what PostgreSQL may discard,
/// rests on it):
///
/// - **In order, as a watermark.** [`Progress::below`] may pass a ticket only once that change
///   and every change sent before it are stored for good (acknowledged by the broker, not
///   merely written to a socket). A change stored out of order must not be reported until the
///   gap before it is filled; a broker whose storage could take changes out of order must
///   prevent it (NATS: `Nats-Expected-Last-Msg-Id`; Kafka: the idempotent producer with
///   `max.in.flight` ≤ 5, or one in flight) or resend the whole tail in order.
/// - **Delivery reports.** Progress comes from the broker's own answers (PubAcks, delivery
///   reports), never from a timer or a successful write.
/// - **At least once.** A change that failed, timed out or was in flight on a lost connection
///   is sent again, in order, by the broker itself, with the same identity (message id, key)
///   so that a broker-side duplicate check can drop copies; [`Delivery::delivered`] keeps
///   waiting meanwhile. Errors are returned only for what no retry can fix, or when shutdown
///   has waited long enough.
pub(crate) trait Delivery {
    /// Why delivering stopped.
    type Error: std::error::Error + Send + 'static;

    /// Called once before the first change: set up what sending needs (subscriptions).
    async fn open(&mut self) -> Result<(), Self::Error>;

    /// True when new changes may be sent now (connected, not resending a failed tail).
    /// Asked once per batch of changes.
    fn ready(&self) -> bool;

    /// True while the window has room for one more change. Asked before every change.
    fn room(&self) -> bool;

    /// Encodes `event` and starts delivering it; returns its ticket. The broker must not keep
    /// a reference to `event` (it is reused once this returns). A failure a resend can fix is
    /// not an error: the broker keeps the change and resends it.
    async fn send(&mut self, event: &ChangeEvent) -> Result<Ticket, Self::Error>;

    /// Starts delivering an outbox event, like [`Delivery::send`] (its ticket comes from the
    /// same sequence, so it is delivered in its place among the changes). The routing
    /// ([`crate::outbox::route`]) says where it goes or why it is a dead letter; a dead letter
    /// is delivered too, to the broker's dead-letter destination, so the position can move on.
    async fn send_outbox(&mut self, event: &OutboxEvent) -> Result<Ticket, Self::Error>;

    /// Waits for something to happen (answers, timeouts and resends, a reconnect, or more
    /// changes in `feed` while there is room) and returns the progress so far. May return
    /// without progress; the driver then sends what is waiting and calls again. Called while
    /// changes are in flight, and while none are but [`Delivery::ready`] is false (then it
    /// waits, boundedly, for the broker to become ready).
    async fn delivered(&mut self, feed: Feed<'_>) -> Result<Progress, Self::Error>;

    /// The changes sent so far end a transaction whose commit ends at `end_lsn` (called right
    /// after the `send` of its last change, and for transactions none of whose changes are
    /// published too). A broker that writes whole transactions atomically (a transactional
    /// Kafka producer) can close its own transaction here; the others ignore it.
    fn transaction_end(&mut self, _end_lsn: Lsn) {}

    /// Everything sent is delivered and nothing more comes: flush and let go.
    async fn close(&mut self) -> Result<(), Self::Error>;

    /// The counters the driver keeps up to date alongside the broker's own.
    fn stats(&self) -> &Arc<PublisherStats>;
}

/// A change sent and not yet delivered.
struct Sent {
    ticket: Ticket,
    /// Set on the last change of a transaction: the transaction's commit `end_lsn`, durable
    /// once this change is delivered.
    commit_end: Option<Lsn>,
    /// The transaction's commit time, µs since 2000-01-01 (0: unknown).
    commit_time: i64,
}

/// Delivers what comes through `ring` with `delivery` until the ring is closed and everything
/// taken is delivered (or delivering fails for good), advancing `durable` past each
/// transaction once all of its changes and every change before them are delivered.
pub(crate) async fn run<D: Delivery>(
    mut delivery: D,
    mut ring: RingReader,
    durable: DurableLsn,
) -> Result<(), D::Error> {
    delivery.open().await?;
    let stats = Arc::clone(delivery.stats());
    let notify = ring.notify();
    let mut sent: VecDeque<Sent> = VecDeque::with_capacity(1024);
    let mut ended = false;
    let mut progress = Progress::default();
    loop {
        complete(&mut sent, progress, &durable, &stats);
        // Sent while the broker cannot take them, changes would only queue in its client.
        if delivery.ready() {
            let mut popped = 0;
            let result = fill(
                &mut delivery,
                &mut ring,
                &mut sent,
                &durable,
                &mut ended,
                &mut popped,
            )
            .await;
            ring.popped(popped);
            result?;
        }
        stats.in_flight.store(sent.len() as u64, Ordering::Relaxed);
        if sent.is_empty() {
            if ended {
                return delivery.close().await;
            }
            if delivery.ready() {
                // Asleep until the wal side pushes or closes the ring (it wakes this side
                // once per batch it read, in long transactions every few hundred changes,
                // and when it drops its end); a wake-up sent meanwhile is kept as a permit.
                if ring.is_empty() && !ring.is_closed() {
                    notify.notified().await;
                }
                continue;
            }
            // Nothing more will come, and nothing could be sent now.
            if ring.is_closed() {
                return Ok(());
            }
        }
        progress = delivery
            .delivered(Feed {
                ring: &ring,
                notify: &notify,
                open: !ended,
            })
            .await?;
    }
}

/// Moves changes from the ring to the broker while it has room, the ring has changes and
/// no send failed.
async fn fill<D: Delivery>(
    delivery: &mut D,
    ring: &mut RingReader,
    sent: &mut VecDeque<Sent>,
    durable: &DurableLsn,
    ended: &mut bool,
    popped: &mut u64,
) -> Result<(), D::Error> {
    while !*ended && delivery.room() {
        match ring.pop() {
            Some(RingItem::Change { event: ev, bytes }) => {
                *popped += bytes;
                let ticket = delivery.send(&ev).await?;
                sent.push_back(Sent {
                    ticket,
                    commit_end: None,
                    commit_time: ev.commit_time,
                });
                if bytes <= RECYCLE_MAX_EVENT_BYTES {
                    ring.recycle(ev);
                }
            }
            Some(RingItem::Outbox(ev)) => {
                *popped += outbox_bytes(&ev);
                let ticket = delivery.send_outbox(&ev).await?;
                sent.push_back(Sent {
                    ticket,
                    commit_end: None,
                    commit_time: ev.commit_time,
                });
            }
            Some(RingItem::Commit { end_lsn }) => {
                delivery.transaction_end(end_lsn);
                match sent.back_mut() {
                    Some(last) => last.commit_end = Some(end_lsn),
                    None => durable.advance(end_lsn),
                }
            }
            Some(RingItem::End) => *ended = true,
            None => {
                if ring.is_closed() {
                    *ended = true;
                }
                break;
            }
        }
    }
    Ok(())
}

/// Lets go of the changes below the watermark: advances the durable position past each
/// completed transaction, counts them and observes their commit latency.
fn complete(
    sent: &mut VecDeque<Sent>,
    progress: Progress,
    durable: &DurableLsn,
    stats: &PublisherStats,
) {
    let mut done = 0u64;
    // Read once for all changes delivered together.
    let mut now_micros = None;
    while let Some(front) = sent.front() {
        if front.ticket >= progress.below {
            break;
        }
        if let Some(end) = front.commit_end {
            durable.advance(end);
        }
        observe_latency(stats, front.commit_time, &mut now_micros);
        sent.pop_front();
        done += 1;
    }
    if done == 0 {
        return;
    }
    stats
        .published
        .fetch_add(done - progress.duplicates, Ordering::Relaxed);
    stats
        .duplicates
        .fetch_add(progress.duplicates, Ordering::Relaxed);
    stats.bytes.fetch_add(progress.bytes, Ordering::Relaxed);
}

/// Records commit → delivery for one delivered change. Clock skew between the database host
/// and this one can make it negative: counted as zero.
fn observe_latency(stats: &PublisherStats, commit_time: i64, now: &mut Option<i64>) {
    let Some(h) = &stats.commit_to_ack else {
        return;
    };
    if commit_time == 0 {
        return;
    }
    let now = *now.get_or_insert_with(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
    });
    let micros = now.saturating_sub(pg_to_unix_micros(commit_time)).max(0);
    h.observe(micros as f64 / 1e6);
}

#[cfg(test)]
mod tests;
