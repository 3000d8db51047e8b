//! The live state of a running bridge: counters and flags that the pipeline threads and the
//! monitor write, and that `/metrics`, `/status`, `/health` and the `METRICS` log line read.
//!
//! Writers use relaxed atomic stores and increments only, so the hot path pays a few
//! nanoseconds per message; readers take a consistent-enough [`Snapshot`] when asked.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::pg::Lsn;
use crate::shutdown::Shutdown;

use super::counters::{DurableLsn, NatsStats, PublisherStats};

/// Counters of the wal thread and the run loop. Only the wal side writes them.
#[derive(Debug, Default)]
pub struct WalTelemetry {
    /// CopyData messages received from the walsender.
    pub wal_messages: AtomicU64,
    /// Committed transactions put on the ring.
    pub transactions: AtomicU64,
    /// Changes put on the ring.
    pub changes: AtomicU64,
    /// Last WAL position received from PostgreSQL.
    pub received_lsn: AtomicU64,
    /// Last flush position reported to PostgreSQL (the slot's `confirmed_flush_lsn` follows).
    pub flushed_lsn: AtomicU64,
    /// True while the replication connection streams.
    pub connected: AtomicBool,
    /// Woken whenever `connected` is set, so the snapshot service awaits the slot instead of
    /// polling it.
    connected_changed: tokio::sync::Notify,
    /// Reconnects to PostgreSQL after a connection problem.
    pub reconnects: AtomicU64,
    /// Time the wal thread took for one recent message (decode, convert, put on the ring), µs.
    pub last_processing_us: AtomicU64,
    /// Items waiting in the ring (sampled).
    pub ring_used: AtomicU64,
}

impl WalTelemetry {
    /// Records that the replication stream is up (true) or down (false).
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Relaxed);
        self.connected_changed.notify_waiters();
    }
}

/// What the monitor last read about the replication slot.
#[derive(Debug, Default)]
pub struct SlotTelemetry {
    /// True once the slot was read at least once.
    pub checked: AtomicBool,
    /// `pg_replication_slots.active`.
    pub active: AtomicBool,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`, bytes.
    pub lag_bytes: AtomicU64,
    /// `pg_current_wal_lsn() - restart_lsn`: WAL the server keeps for the slot, bytes.
    pub retained_bytes: AtomicU64,
    /// `wal_status = 'lost'`: the slot was invalidated.
    pub lost: AtomicBool,
    /// The slot does not exist (any more).
    pub missing: AtomicBool,
    /// `invalidation_reason` and `inactive_since` (17+), as the server shows them.
    details: Mutex<(Option<String>, Option<String>)>,
}

impl SlotTelemetry {
    /// Records the slot's invalidation reason and since when it is inactive.
    pub fn set_details(&self, invalidation_reason: Option<String>, inactive_since: Option<String>) {
        if let Ok(mut d) = self.details.lock() {
            *d = (invalidation_reason, inactive_since);
        }
    }

    fn details(&self) -> (Option<String>, Option<String>) {
        self.details.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

/// Where the bridge is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Checking PostgreSQL, connecting to NATS, creating streams.
    Starting,
    /// Reading WAL and publishing.
    Streaming,
    /// Shutdown requested: draining.
    Stopping,
}

impl Phase {
    /// Lower-case name, as `/status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Streaming => "streaming",
            Phase::Stopping => "stopping",
        }
    }
}

/// Everything telemetry reads, shared by every thread of one run.
#[derive(Debug)]
pub struct Telemetry {
    started: Instant,
    /// The wal thread's counters, on their own cache lines (written per message).
    pub wal: CachePadded<WalTelemetry>,
    /// The publisher's counters.
    pub publisher: Arc<PublisherStats>,
    /// The publisher's NATS connection.
    pub nats: Arc<NatsStats>,
    /// Position up to which everything is stored in JetStream.
    pub durable: DurableLsn,
    /// The monitor's readings.
    pub slot: SlotTelemetry,
    /// Ring capacity, for occupancy.
    pub ring_capacity: u64,
    streaming: AtomicBool,
    shutdown: Shutdown,
    /// Fraction of the running snapshot done, as `f64` bits; 0 when none runs.
    snapshot_progress: AtomicU64,
    /// The last PostgreSQL connection problem, for `/health`; cleared when streaming resumes.
    pg_problem: Mutex<Option<String>>,
    /// Set the first time the replication stream starts on the slot (`streaming started`).
    stream_established: AtomicBool,
    /// Snapshot requests neither answered nor served because their reply subject is outside
    /// the inbox prefix.
    pub snapshot_requests_ignored: AtomicU64,
    /// The message-id namespace, once PostgreSQL set-up has decided it.
    id_namespace: Mutex<Option<String>>,
    /// True when the sink is Kafka: the broker connection in `nats` is a Kafka one.
    kafka_sink: AtomicBool,
    /// Triggered once PostgreSQL's set-up was tried (whatever came of it).
    setup_attempted: Shutdown,
}

impl Telemetry {
    /// State for a run that stops when `shutdown` is triggered.
    pub fn new(
        shutdown: Shutdown,
        publisher: Arc<PublisherStats>,
        nats: Arc<NatsStats>,
        ring_capacity: usize,
    ) -> Self {
        Telemetry {
            started: Instant::now(),
            wal: CachePadded::new(WalTelemetry::default()),
            publisher,
            nats,
            durable: DurableLsn::new(Lsn::INVALID),
            slot: SlotTelemetry::default(),
            ring_capacity: ring_capacity as u64,
            streaming: AtomicBool::new(false),
            shutdown,
            snapshot_progress: AtomicU64::new(0f64.to_bits()),
            pg_problem: Mutex::new(None),
            stream_established: AtomicBool::new(false),
            snapshot_requests_ignored: AtomicU64::new(0),
            id_namespace: Mutex::new(None),
            kafka_sink: AtomicBool::new(false),
            setup_attempted: Shutdown::new(),
        }
    }

    /// Records that PostgreSQL's set-up was tried once, whatever came of it: the slot monitor
    /// reads the slot from then on.
    pub fn set_setup_attempted(&self) {
        if !self.setup_attempted.is_triggered() {
            self.setup_attempted.trigger();
        }
    }

    /// The signal [`Telemetry::set_setup_attempted`] triggers.
    pub(crate) fn setup_attempted(&self) -> Shutdown {
        self.setup_attempted.clone()
    }

    /// Marks the sink as Kafka, so `/health` names it.
    pub fn set_kafka_sink(&self) {
        self.kafka_sink.store(true, Relaxed);
    }

    /// True while this process streams from the replication slot (START_REPLICATION
    /// succeeded and the stream is up): a standby waiting for the slot, or a bridge between
    /// reconnects, is not. Only then does it serve snapshot requests.
    pub fn holds_slot(&self) -> bool {
        self.wal.connected.load(Relaxed)
    }

    /// Completes once [`Telemetry::holds_slot`] is `held` (at once if it already is).
    pub async fn slot_held(&self, held: bool) {
        loop {
            let changed = self.wal.connected_changed.notified();
            tokio::pin!(changed);
            // Registered before the check: a change in between still wakes this waiter.
            changed.as_mut().enable();
            if self.holds_slot() == held {
                return;
            }
            changed.await;
        }
    }

    /// Records that the replication stream started on the slot; true only the first time.
    pub fn mark_stream_established(&self) -> bool {
        !self.stream_established.swap(true, Relaxed)
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Marks the set-up as done: NATS, streams and PostgreSQL are ready.
    pub fn set_streaming(&self) {
        self.streaming.store(true, Relaxed);
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        if self.shutdown.is_triggered() {
            Phase::Stopping
        } else if self.streaming.load(Relaxed) {
            Phase::Streaming
        } else {
            Phase::Starting
        }
    }

    /// Records why the replication stream is not up, as `/health` shows it (`None` once it
    /// streams).
    pub fn set_pg_problem(&self, problem: Option<String>) {
        if let Ok(mut p) = self.pg_problem.lock() {
            *p = problem;
        }
    }

    /// Records the message-id namespace, for `/status`.
    pub fn set_id_namespace(&self, namespace: &str) {
        if let Ok(mut n) = self.id_namespace.lock() {
            *n = Some(namespace.to_string());
        }
    }

    /// Sets the snapshot progress gauge, 0.0 to 1.0 (see `bridge_snapshot_progress_ratio`).
    pub fn set_snapshot_progress(&self, fraction: f64) {
        let f = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.snapshot_progress.store(f.to_bits(), Relaxed);
    }

    /// A point-in-time copy of every value.
    pub fn snapshot(&self) -> Snapshot {
        let w = &self.wal;
        let p = &self.publisher;
        let s = &self.slot;
        Snapshot {
            phase: self.phase(),
            uptime: self.uptime(),
            wal_messages: w.wal_messages.load(Relaxed),
            transactions: w.transactions.load(Relaxed),
            changes: w.changes.load(Relaxed),
            received_lsn: Lsn(w.received_lsn.load(Relaxed)),
            flushed_lsn: Lsn(w.flushed_lsn.load(Relaxed)),
            durable_lsn: self.durable.get(),
            pg_connected: w.connected.load(Relaxed),
            pg_reconnects: w.reconnects.load(Relaxed),
            pg_problem: self.pg_problem.lock().ok().and_then(|p| p.clone()),
            id_namespace: self.id_namespace.lock().ok().and_then(|n| n.clone()),
            kafka_sink: self.kafka_sink.load(Relaxed),
            last_processing_us: w.last_processing_us.load(Relaxed),
            ring_used: w.ring_used.load(Relaxed).min(self.ring_capacity),
            ring_capacity: self.ring_capacity,
            published: p.published.load(Relaxed),
            duplicates: p.duplicates.load(Relaxed),
            bytes_published: p.bytes.load(Relaxed),
            publish_errors: p.publish_errors.load(Relaxed),
            batches: p.batches.load(Relaxed),
            in_flight: p.in_flight.load(Relaxed),
            queue_depth: p.queue_depth.load(Relaxed),
            delivery_reports: p.delivery_reports.load(Relaxed),
            delivery_report_micros: p.delivery_report_micros.load(Relaxed),
            publisher_stalled: p.stalled.load(Relaxed),
            nats_connected: self.nats.is_connected(),
            nats_reconnects: self.nats.reconnects(),
            slot_checked: s.checked.load(Relaxed),
            slot_active: s.active.load(Relaxed),
            slot_lost: s.lost.load(Relaxed),
            slot_missing: s.missing.load(Relaxed),
            slot_invalidation_reason: s.details().0,
            slot_inactive_since: s.details().1,
            lag_bytes: s.lag_bytes.load(Relaxed),
            retained_bytes: s.retained_bytes.load(Relaxed),
            snapshot_progress: f64::from_bits(self.snapshot_progress.load(Relaxed)),
            snapshot_requests_ignored: self.snapshot_requests_ignored.load(Relaxed),
            dead_letters: std::array::from_fn(|i| p.dead_letters[i].load(Relaxed)),
        }
    }
}

/// A copy of the live state at one moment; what `/status`, `/health`, `/metrics` and the
/// `METRICS` line are made of.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Where the bridge is in its life.
    pub phase: Phase,
    /// Time since start.
    pub uptime: Duration,
    /// CopyData messages received.
    pub wal_messages: u64,
    /// Transactions put on the ring.
    pub transactions: u64,
    /// Changes put on the ring.
    pub changes: u64,
    /// Last WAL position received.
    pub received_lsn: Lsn,
    /// Last flush position reported to PostgreSQL.
    pub flushed_lsn: Lsn,
    /// Everything up to here is stored in JetStream.
    pub durable_lsn: Lsn,
    /// Replication connection streaming.
    pub pg_connected: bool,
    /// Reconnects to PostgreSQL.
    pub pg_reconnects: u64,
    /// The last PostgreSQL connection problem while not connected.
    pub pg_problem: Option<String>,
    /// The message-id namespace (`None` until set-up decided it).
    pub id_namespace: Option<String>,
    /// The sink is Kafka (the `nats_*` fields then describe the Kafka brokers' connection;
    /// `/status` shows them as `sink_*`).
    pub kafka_sink: bool,
    /// Processing time of a recent WAL message, µs.
    pub last_processing_us: u64,
    /// Items in the ring.
    pub ring_used: u64,
    /// Ring capacity.
    pub ring_capacity: u64,
    /// Messages JetStream stored.
    pub published: u64,
    /// Messages JetStream acknowledged as duplicates.
    pub duplicates: u64,
    /// Payload bytes acknowledged.
    pub bytes_published: u64,
    /// Failed publish attempts.
    pub publish_errors: u64,
    /// NATS: fast-ingest batches committed.
    pub batches: u64,
    /// PubAcks awaited.
    pub in_flight: u64,
    /// Kafka: records in the producer awaiting their delivery report.
    pub queue_depth: u64,
    /// Kafka: delivery reports received.
    pub delivery_reports: u64,
    /// Kafka: produce → delivery report time of those reports, summed, in µs.
    pub delivery_report_micros: u64,
    /// JetStream does not acknowledge (publishes are being retried).
    pub publisher_stalled: bool,
    /// The publisher's NATS connection is up.
    pub nats_connected: bool,
    /// NATS reconnects.
    pub nats_reconnects: u64,
    /// The monitor read the slot at least once.
    pub slot_checked: bool,
    /// The slot is active (a walsender streams from it).
    pub slot_active: bool,
    /// The slot was invalidated (`wal_status = lost`).
    pub slot_lost: bool,
    /// The slot does not exist.
    pub slot_missing: bool,
    /// Why the slot was invalidated (`invalidation_reason`), when it was.
    pub slot_invalidation_reason: Option<String>,
    /// Since when no walsender uses the slot (`inactive_since`, 17+).
    pub slot_inactive_since: Option<String>,
    /// Slot lag (`pg_current_wal_lsn() - confirmed_flush_lsn`), bytes.
    pub lag_bytes: u64,
    /// WAL kept for the slot (`pg_current_wal_lsn() - restart_lsn`), bytes.
    pub retained_bytes: u64,
    /// Progress of the running snapshot, 0 to 1.
    pub snapshot_progress: f64,
    /// Snapshot requests ignored for their reply subject.
    pub snapshot_requests_ignored: u64,
    /// Events sent to the dead-letter stream, by reason (`DeadReason::ALL`'s order).
    pub dead_letters: [u64; super::counters::DEAD_LETTER_REASONS],
}
