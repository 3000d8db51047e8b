//! Counters the pipeline and the sink write and telemetry reads: the durable position, the
//! publisher's counters and its NATS connection's. They live here, below both writers, so
//! that telemetry needs nothing of the pipeline or the sink.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::pg::Lsn;

/// Shared, monotonic durable position (an atomic on its own cache line: written by the
/// publisher, read by the wal thread).
#[derive(Clone, Debug, Default)]
pub struct DurableLsn(Arc<CachePadded<AtomicU64>>);

impl DurableLsn {
    /// Starts at `lsn` (the position streaming resumes from: everything before it is durable).
    pub fn new(lsn: Lsn) -> Self {
        DurableLsn(Arc::new(CachePadded::new(AtomicU64::new(lsn.0))))
    }

    /// The current durable position.
    pub fn get(&self) -> Lsn {
        Lsn(self.0.load(Ordering::Acquire))
    }

    /// Moves the position forward; never backwards.
    pub fn advance(&self, lsn: Lsn) {
        self.0.fetch_max(lsn.0, Ordering::AcqRel);
    }
}

/// Publisher counters.
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
    /// NATS: fast-ingest batches committed (backlogs sent with one flow acknowledgement per
    /// few hundred messages instead of a PubAck each).
    pub batches: AtomicU64,
    /// Messages waiting for a PubAck now.
    pub in_flight: AtomicU64,
    /// True while JetStream does not acknowledge (the oldest publish is being retried).
    pub stalled: AtomicBool,
    /// Commit time → PubAck latency, observed per acknowledged message.
    pub commit_to_ack: Option<prometheus::Histogram>,
    /// Events sent to the dead-letter stream, by reason (in the order of `DeadReason::ALL`).
    pub dead_letters: [AtomicU64; DEAD_LETTER_REASONS],
    /// Kafka: records handed to the producer whose delivery report has not come yet.
    pub queue_depth: AtomicU64,
    /// Kafka: delivery reports received.
    pub delivery_reports: AtomicU64,
    /// Kafka: microseconds from producing a record to its delivery report, summed.
    pub delivery_report_micros: AtomicU64,
}

/// How many reasons dead letters are counted by.
pub const DEAD_LETTER_REASONS: usize = crate::wire::outbox::DeadReason::ALL.len();

/// Shortest time between two log lines about refused permissions on one connection.
pub const REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Connection state and counters of one NATS connection, updated from the client's event
/// callback and read by metrics and `/status`. Share it across attempts of the same logical
/// connection (e.g. when the caller retries a connect), not between connections.
#[derive(Debug, Default)]
pub struct NatsStats {
    /// True while the client holds a connection to a server.
    pub connected: AtomicBool,
    /// Times the connection came back after it was lost (`bridge_nats_reconnects_total`).
    pub reconnects: AtomicU64,
    /// Times the connection was lost.
    pub disconnects: AtomicU64,
    /// Woken at every connect and disconnect, for the publisher to wait on instead of polling.
    pub changed: tokio::sync::Notify,
    /// The first refusal of a publish or subscription for lack of permissions, as logged.
    pub refused: std::sync::OnceLock<String>,
    /// Refusals for lack of permissions so far.
    refusals: AtomicU64,
    /// When a refusal was last logged, and the count then: every refused publish gets one,
    /// so they are logged at most every [`REFUSAL_LOG_INTERVAL`].
    refusal_logged: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
    /// Woken at that refusal, for a command that ends on it.
    pub refusal: tokio::sync::Notify,
}

impl NatsStats {
    /// True while connected.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Disconnects so far.
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }

    /// Records a refusal of the connection's user, `line` saying what was refused and what
    /// the user needs: logged as an error at most once per [`REFUSAL_LOG_INTERVAL`], kept for
    /// [`NatsStats::first_refusal`].
    pub fn record_refusal(&self, line: String) {
        match self.count_refusal(std::time::Instant::now()) {
            Some(0) => log::error!("{line}"),
            Some(unlogged) => {
                log::error!("{line} ({unlogged} refusals not logged since the last such line)")
            }
            None => {}
        }
        let _ = self.refused.set(line);
        self.refusal.notify_one();
    }

    /// Counts a refusal for lack of permissions; `Some(n)` when it is to be logged, with `n`
    /// the refusals not logged since the last line.
    fn count_refusal(&self, now: std::time::Instant) -> Option<u64> {
        let total = self.refusals.fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = self
            .refusal_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match *logged {
            Some((at, _)) if now.duration_since(at) < REFUSAL_LOG_INTERVAL => None,
            previous => {
                *logged = Some((now, total));
                Some(previous.map_or(0, |(_, n)| total - n - 1))
            }
        }
    }

    /// Waits for the first permissions refusal and returns its line.
    pub async fn first_refusal(&self) -> String {
        loop {
            if let Some(line) = self.refused.get() {
                return line.clone();
            }
            self.refusal.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_at_most_once_a_minute_with_the_count_left_out() {
        let stats = NatsStats::default();
        let t0 = std::time::Instant::now();
        assert_eq!(stats.count_refusal(t0), Some(0));
        assert_eq!(stats.count_refusal(t0), None);
        assert_eq!(stats.count_refusal(t0 + REFUSAL_LOG_INTERVAL / 2), None);
        assert_eq!(stats.count_refusal(t0 + REFUSAL_LOG_INTERVAL), Some(2));
        assert_eq!(stats.count_refusal(t0 + REFUSAL_LOG_INTERVAL), None);
        assert_eq!(stats.refusals.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn durable_lsn_never_moves_back() {
        let d = DurableLsn::new(Lsn(100));
        d.advance(Lsn(50));
        assert_eq!(d.get(), Lsn(100));
        d.advance(Lsn(200));
        assert_eq!(d.clone().get(), Lsn(200));
    }
}
