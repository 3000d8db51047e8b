//! Prometheus metrics: one registry with every metric of the bridge, rendered in the text
//! exposition format for `GET /metrics`.
//!
//! Counters and gauges are read from the live [`Telemetry`] when scraped (one [`Snapshot`] per
//! scrape), so the pipeline threads only bump their own atomics. The one metric observed on
//! the hot path is the commit → PubAck latency histogram, which the publisher feeds per
//! acknowledged message.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, Histogram, HistogramOpts, IntGauge, Opts, Registry, TextEncoder};

use super::state::{Snapshot, Telemetry};
use super::status;
use crate::wire::outbox::DeadReason;

/// Name of the commit → PubAck latency histogram.
pub const COMMIT_TO_PUBACK: &str = "bridge_commit_to_puback_seconds";

/// Buckets of the latency histogram, in seconds: fine below 10 ms (the p99 target at steady
/// load), coarse up to the minute a NATS outage can add.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002, 0.003, 0.005, 0.007_5, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Why the metrics could not be set up (a programming error: names and help are constants).
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus client refused a metric.
    #[error("metrics set-up: {0}")]
    Prometheus(#[from] prometheus::Error),
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
}

/// One metric read from a [`Snapshot`] at scrape time.
struct Def {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    value: fn(&Snapshot) -> f64,
}

fn b(v: bool) -> f64 {
    if v {
        1.0
    } else {
        0.0
    }
}

/// Every counter and gauge the bridge exports (the histogram and `bridge_info` aside). The
/// README's metrics reference lists the same, in the same order.
const DEFS: &[Def] = &[
    Def {
        name: "bridge_uptime_seconds",
        help: "Seconds since the bridge started.",
        kind: Kind::Gauge,
        value: |s| s.uptime.as_secs_f64(),
    },
    Def {
        name: "bridge_wal_messages_received_total",
        help: "Replication messages (XLogData and keepalives) received from PostgreSQL.",
        kind: Kind::Counter,
        value: |s| s.wal_messages as f64,
    },
    Def {
        name: "bridge_wal_transactions_total",
        help: "Committed transactions decoded and handed to the publisher.",
        kind: Kind::Counter,
        value: |s| s.transactions as f64,
    },
    Def {
        name: "bridge_wal_changes_total",
        help: "Row changes decoded and handed to the publisher.",
        kind: Kind::Counter,
        value: |s| s.changes as f64,
    },
    Def {
        name: "bridge_cdc_events_published_total",
        help: "Change events JetStream acknowledged as newly stored.",
        kind: Kind::Counter,
        value: |s| s.published as f64,
    },
    Def {
        name: "bridge_cdc_events_duplicate_total",
        help: "Change events JetStream acknowledged as duplicates (already stored; replays after a restart or retry).",
        kind: Kind::Counter,
        value: |s| s.duplicates as f64,
    },
    Def {
        name: "bridge_published_bytes_total",
        help: "Payload bytes of acknowledged change events.",
        kind: Kind::Counter,
        value: |s| s.bytes_published as f64,
    },
    Def {
        name: "bridge_publish_errors_total",
        help: "Publish attempts that failed or timed out (each is retried with the same message id).",
        kind: Kind::Counter,
        value: |s| s.publish_errors as f64,
    },
    Def {
        name: "bridge_publish_batches_total",
        help: "NATS fast-ingest batches committed (backlogs acknowledged every few hundred messages instead of one PubAck each).",
        kind: Kind::Counter,
        value: |s| s.batches as f64,
    },
    Def {
        name: "bridge_pubacks_in_flight",
        help: "Change events published and waiting for their PubAck.",
        kind: Kind::Gauge,
        value: |s| s.in_flight as f64,
    },
    Def {
        name: "bridge_sink_in_flight",
        help: "Change events handed to the sink (NATS or Kafka) and not yet confirmed stored.",
        kind: Kind::Gauge,
        value: |s| s.in_flight as f64,
    },
    Def {
        name: "bridge_sink_connected",
        help: "1 while the sink's broker connection (NATS, or a Kafka broker) is up.",
        kind: Kind::Gauge,
        value: |s| b(s.nats_connected),
    },
    Def {
        name: "bridge_sink_reconnects_total",
        help: "Times the sink's broker connection (NATS, or the Kafka brokers) came back after it was lost.",
        kind: Kind::Counter,
        value: |s| s.nats_reconnects as f64,
    },
    Def {
        name: "bridge_kafka_producer_queue_depth",
        help: "Kafka records in the producer waiting for their delivery report.",
        kind: Kind::Gauge,
        value: |s| s.queue_depth as f64,
    },
    Def {
        name: "bridge_kafka_delivery_reports_total",
        help: "Kafka delivery reports received (successful or not).",
        kind: Kind::Counter,
        value: |s| s.delivery_reports as f64,
    },
    Def {
        name: "bridge_kafka_delivery_report_seconds_total",
        help: "Seconds from producing each Kafka record to its delivery report, summed (divide the rate by that of bridge_kafka_delivery_reports_total for the mean).",
        kind: Kind::Counter,
        value: |s| s.delivery_report_micros as f64 / 1e6,
    },
    Def {
        name: "bridge_ring_occupancy",
        help: "Items waiting in the ring between the wal thread and the publisher (sampled).",
        kind: Kind::Gauge,
        value: |s| s.ring_used as f64,
    },
    Def {
        name: "bridge_ring_capacity",
        help: "Capacity of the ring between the wal thread and the publisher.",
        kind: Kind::Gauge,
        value: |s| s.ring_capacity as f64,
    },
    Def {
        name: "bridge_current_lsn",
        help: "Last WAL position received from PostgreSQL, as a number.",
        kind: Kind::Gauge,
        value: |s| s.received_lsn.0 as f64,
    },
    Def {
        name: "bridge_durable_lsn",
        help: "WAL position up to which every change is stored in JetStream, as a number.",
        kind: Kind::Gauge,
        value: |s| s.durable_lsn.0 as f64,
    },
    Def {
        name: "bridge_last_ack_lsn",
        help: "Last flush position acknowledged to PostgreSQL, as a number.",
        kind: Kind::Gauge,
        value: |s| s.flushed_lsn.0 as f64,
    },
    Def {
        name: "bridge_connected",
        help: "1 while the replication connection to PostgreSQL streams.",
        kind: Kind::Gauge,
        value: |s| b(s.pg_connected),
    },
    Def {
        name: "bridge_reconnects_total",
        help: "Reconnects to PostgreSQL after a connection problem.",
        kind: Kind::Counter,
        value: |s| s.pg_reconnects as f64,
    },
    Def {
        name: "bridge_nats_connected",
        help: "1 while the publisher's NATS connection is up.",
        kind: Kind::Gauge,
        value: |s| b(s.nats_connected),
    },
    Def {
        name: "bridge_nats_reconnects_total",
        help: "Times the NATS connection came back after it was lost.",
        kind: Kind::Counter,
        value: |s| s.nats_reconnects as f64,
    },
    Def {
        name: "bridge_last_processing_time_us",
        help: "Microseconds the wal thread spent on a recent message (decode, convert, enqueue; sampled).",
        kind: Kind::Gauge,
        value: |s| s.last_processing_us as f64,
    },
    Def {
        name: "bridge_slot_active",
        help: "1 when the replication slot is active (a walsender streams from it), per the monitor.",
        kind: Kind::Gauge,
        value: |s| b(s.slot_active),
    },
    Def {
        name: "bridge_slot_invalidated",
        help: "1 when the replication slot was invalidated (wal_status = lost) or is missing.",
        kind: Kind::Gauge,
        value: |s| b(s.slot_lost || s.slot_missing),
    },
    Def {
        name: "bridge_wal_lag_bytes",
        help: "Bytes of WAL between the server's current position and the slot's confirmed_flush_lsn.",
        kind: Kind::Gauge,
        value: |s| s.lag_bytes as f64,
    },
    Def {
        name: "bridge_slot_retained_wal_bytes",
        help: "Bytes of WAL the server keeps for the slot (current position minus restart_lsn).",
        kind: Kind::Gauge,
        value: |s| s.retained_bytes as f64,
    },
    Def {
        name: "bridge_snapshot_progress_ratio",
        help: "Progress of the running table snapshots: rows copied over the rows PostgreSQL estimated (pg_class.reltuples) when each started, below 1 until they complete; 1 once the last one completed, 0 before any, after a failed one, or without an estimate.",
        kind: Kind::Gauge,
        value: |s| s.snapshot_progress,
    },
    Def {
        name: "bridge_snapshot_requests_ignored_total",
        help: "Snapshot requests neither answered nor served because their reply subject is not an inbox (outside snapshot.reply_prefix).",
        kind: Kind::Counter,
        value: |s| s.snapshot_requests_ignored as f64,
    },
    Def {
        name: "bridge_healthy",
        help: "1 when /health answers 200 (streaming, PostgreSQL and NATS reachable).",
        kind: Kind::Gauge,
        value: |s| b(status::health(s).is_ok()),
    },
];

/// The dead-letter counter, labelled by reason.
const DEAD_LETTERS: &str = "bridge_dead_letters_total";
const DEAD_LETTERS_HELP: &str = "Events sent to the dead-letter stream (DLQ) instead of their destination, by reason: empty_routing_value, invalid_subject, too_large, refused.";

/// Builds the metric families of [`DEFS`] (and the dead-letter counter) from one snapshot per
/// scrape.
struct SnapshotCollector {
    telemetry: Arc<Telemetry>,
    descs: Vec<Desc>,
}

impl SnapshotCollector {
    fn new(telemetry: Arc<Telemetry>) -> Result<Self, prometheus::Error> {
        let mut descs: Vec<Desc> = DEFS
            .iter()
            .map(|d| Desc::new(d.name.into(), d.help.into(), Vec::new(), HashMap::new()))
            .collect::<Result<_, _>>()?;
        descs.push(Desc::new(
            DEAD_LETTERS.into(),
            DEAD_LETTERS_HELP.into(),
            vec!["reason".into()],
            HashMap::new(),
        )?);
        Ok(SnapshotCollector { telemetry, descs })
    }
}

impl Collector for SnapshotCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snap = self.telemetry.snapshot();
        DEFS.iter()
            .map(|d| {
                let v = (d.value)(&snap);
                let mut m = Metric::default();
                let mut family = MetricFamily::default();
                match d.kind {
                    Kind::Counter => {
                        let mut c = Counter::default();
                        c.set_value(v);
                        m.set_counter(c);
                        family.set_field_type(MetricType::COUNTER);
                    }
                    Kind::Gauge => {
                        let mut g = Gauge::default();
                        g.set_value(v);
                        m.set_gauge(g);
                        family.set_field_type(MetricType::GAUGE);
                    }
                }
                family.set_name(d.name.to_owned());
                family.set_help(d.help.to_owned());
                family.set_metric(vec![m]);
                family
            })
            .chain(std::iter::once(dead_letters(&snap)))
            .collect()
    }
}

/// `bridge_dead_letters_total{reason}`, one series per reason, zeros included.
fn dead_letters(snap: &Snapshot) -> MetricFamily {
    let metrics = DeadReason::ALL
        .iter()
        .map(|reason| {
            let mut label = LabelPair::default();
            label.set_name("reason".into());
            label.set_value(reason.as_str().into());
            let mut c = Counter::default();
            c.set_value(snap.dead_letters[reason.index()] as f64);
            let mut m = Metric::default();
            m.set_label(vec![label]);
            m.set_counter(c);
            m
        })
        .collect();
    let mut family = MetricFamily::default();
    family.set_name(DEAD_LETTERS.to_owned());
    family.set_help(DEAD_LETTERS_HELP.to_owned());
    family.set_field_type(MetricType::COUNTER);
    family.set_metric(metrics);
    family
}

/// The commit → PubAck latency histogram, unregistered: the publisher observes it, and
/// [`Metrics::new`] registers it.
pub fn commit_to_puback_histogram() -> Result<Histogram, MetricsError> {
    Ok(Histogram::with_opts(
        HistogramOpts::new(
            COMMIT_TO_PUBACK,
            "Seconds from a transaction's commit in PostgreSQL to JetStream's PubAck of each of its change events.",
        )
        .buckets(LATENCY_BUCKETS.to_vec()),
    )?)
}

/// Labels of the constant `bridge_info` metric.
#[derive(Debug, Clone)]
pub struct BridgeInfo {
    /// The bridge's version.
    pub version: String,
    /// Replication slot.
    pub slot: String,
    /// Publication.
    pub publication: String,
}

/// The registry behind `GET /metrics`.
pub struct Metrics {
    registry: Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric: the ones read from `telemetry`, the latency histogram, and
    /// `bridge_info` with `info` as labels.
    pub fn new(
        telemetry: Arc<Telemetry>,
        latency: Histogram,
        info: &BridgeInfo,
    ) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        registry.register(Box::new(SnapshotCollector::new(telemetry)?))?;
        registry.register(Box::new(latency))?;
        let info_gauge = IntGauge::with_opts(
            Opts::new(
                "bridge_info",
                "Constant 1, labelled with the version, slot and publication.",
            )
            .const_label("version", &info.version)
            .const_label("slot", &info.slot)
            .const_label("publication", &info.publication),
        )?;
        info_gauge.set(1);
        registry.register(Box::new(info_gauge))?;
        Ok(Metrics { registry })
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding fails only for invalid names or label values, which are constants here.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::warn!("encoding metrics failed: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Content type of [`Metrics::render`].
    pub fn content_type(&self) -> &'static str {
        prometheus::TEXT_FORMAT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown::Shutdown;
    use crate::telemetry::counters::{NatsStats, PublisherStats};
    use std::sync::atomic::Ordering;

    fn metrics() -> (Arc<Telemetry>, Histogram, Metrics) {
        let hist = commit_to_puback_histogram().unwrap();
        let t = Arc::new(Telemetry::new(
            Shutdown::new(),
            Arc::new(PublisherStats::default()),
            Arc::new(NatsStats::default()),
            8,
        ));
        let m = Metrics::new(
            Arc::clone(&t),
            hist.clone(),
            &BridgeInfo {
                version: "1.2.3".into(),
                slot: "s".into(),
                publication: "p".into(),
            },
        )
        .unwrap();
        (t, hist, m)
    }

    #[test]
    fn every_metric_is_rendered_with_its_type() {
        let (t, hist, m) = metrics();
        t.wal.wal_messages.store(7, Ordering::Relaxed);
        t.publisher.published.store(3, Ordering::Relaxed);
        hist.observe(0.004);
        let text = m.render();
        for d in DEFS {
            let kind = match d.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            assert!(
                text.contains(&format!("# TYPE {} {kind}\n", d.name)),
                "{} missing:\n{text}",
                d.name
            );
        }
        assert!(
            text.contains("bridge_wal_messages_received_total 7\n"),
            "{text}"
        );
        assert!(
            text.contains("bridge_cdc_events_published_total 3\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE bridge_commit_to_puback_seconds histogram"));
        assert!(text.contains("bridge_commit_to_puback_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("bridge_commit_to_puback_seconds_count 1\n"));
        assert!(text.contains("publication=\"p\""), "{text}");
        assert!(text.contains("version=\"1.2.3\""), "{text}");
    }

    #[test]
    fn names_are_unique_and_follow_the_conventions() {
        let mut names: Vec<&str> = DEFS.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DEFS.len());
        for d in DEFS {
            assert!(d.name.starts_with("bridge_"));
            assert_eq!(
                d.name.ends_with("_total"),
                matches!(d.kind, Kind::Counter),
                "{}",
                d.name
            );
        }
    }

    #[test]
    fn buckets_are_increasing() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
