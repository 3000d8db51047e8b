//! The periodic `METRICS` log line, in logfmt, for operators who read logs rather than scrape:
//!
//! ```text
//! METRICS uptime=120 wal_messages=5301 cdc_events=3180 lsn=0/1A2B3C8 connected=true reconnects=0 nats_reconnects=0 lag_bytes=0 slot_active=true
//! ```

use std::fmt::Write as _;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::shutdown::Shutdown;

use super::state::{Snapshot, Telemetry};

/// The `METRICS` line for a snapshot (`lsn` is the last position received from PostgreSQL,
/// `cdc_events` the events JetStream stored).
pub fn metrics_line(s: &Snapshot) -> String {
    let mut line = String::with_capacity(192);
    // Writing to a String cannot fail.
    let _ = write!(
        line,
        "METRICS uptime={} wal_messages={} cdc_events={} lsn={} connected={} reconnects={} nats_reconnects={} lag_bytes={} slot_active={}",
        s.uptime.as_secs(),
        s.wal_messages,
        s.published,
        s.received_lsn,
        s.pg_connected,
        s.pg_reconnects,
        s.nats_reconnects,
        s.lag_bytes,
        s.slot_active
    );
    line
}

/// Starts the thread that logs [`metrics_line`] every `interval` until `stop` is triggered.
pub fn spawn_metrics_log(
    telemetry: Arc<Telemetry>,
    interval: Duration,
    stop: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("metrics-log".into())
        .spawn(move || {
            let mut next = Instant::now() + interval;
            while !stop.wait_timeout(next.saturating_duration_since(Instant::now())) {
                let now = Instant::now();
                if now >= next {
                    log::info!("{}", metrics_line(&telemetry.snapshot()));
                    next += interval;
                    // After a stall (suspended process), keep the rhythm without a burst.
                    if next <= now {
                        next = now + interval;
                    }
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::counters::{NatsStats, PublisherStats};
    use std::sync::atomic::Ordering;

    #[test]
    fn line_has_the_documented_fields_in_order() {
        let t = Telemetry::new(
            Shutdown::new(),
            Arc::new(PublisherStats::default()),
            Arc::new(NatsStats::default()),
            4,
        );
        t.wal.wal_messages.store(5, Ordering::Relaxed);
        t.wal.received_lsn.store(0x16B3748, Ordering::Relaxed);
        t.wal.set_connected(true);
        t.publisher.published.store(3, Ordering::Relaxed);
        t.slot.lag_bytes.store(42, Ordering::Relaxed);
        let line = metrics_line(&t.snapshot());
        let keys: Vec<&str> = line
            .split(' ')
            .skip(1)
            .map(|kv| kv.split_once('=').unwrap().0)
            .collect();
        assert_eq!(
            keys,
            [
                "uptime",
                "wal_messages",
                "cdc_events",
                "lsn",
                "connected",
                "reconnects",
                "nats_reconnects",
                "lag_bytes",
                "slot_active"
            ]
        );
        assert!(line.starts_with("METRICS uptime=0 wal_messages=5 cdc_events=3 lsn=0/16B3748 connected=true reconnects=0 nats_reconnects=0 lag_bytes=42 slot_active=false"), "{line}");
    }
}
