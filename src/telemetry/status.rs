//! The documents of `GET /status` and `GET /health`, built from a [`Snapshot`].
//!
//! `/health` is a readiness check: 200 only while the bridge streams with PostgreSQL and its
//! sink (NATS or Kafka) reachable, 503 with the reason otherwise. The bridge recovers from those outages by itself,
//! so a 503 is a reason to alert or to route elsewhere, not to restart it. For liveness (is the
//! process alive and answering), use `/status`, which answers 200 whatever the state.

use serde_json::{json, Value};

use super::state::{Phase, Snapshot};

/// The answer of `/health`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Streaming, with PostgreSQL and the sink reachable.
    Ok,
    /// Not ready, and why (several reasons joined with `; `).
    Unavailable(String),
}

impl Health {
    /// True for [`Health::Ok`].
    pub fn is_ok(&self) -> bool {
        matches!(self, Health::Ok)
    }

    /// HTTP status code: 200 or 503.
    pub fn http_status(&self) -> u16 {
        if self.is_ok() {
            200
        } else {
            503
        }
    }

    /// The JSON body: `{"status":"ok"}` or `{"status":"unavailable","reason":...}`.
    pub fn to_json(&self) -> Value {
        match self {
            Health::Ok => json!({ "status": "ok" }),
            Health::Unavailable(reason) => json!({ "status": "unavailable", "reason": reason }),
        }
    }
}

/// Readiness from a snapshot.
pub fn health(s: &Snapshot) -> Health {
    let mut reasons: Vec<String> = Vec::new();
    match s.phase {
        Phase::Stopping => reasons.push("shutting down".into()),
        Phase::Starting => reasons.push(if s.kafka_sink {
            "starting: checking PostgreSQL, connecting to Kafka".into()
        } else {
            "starting: checking PostgreSQL, connecting to NATS".into()
        }),
        Phase::Streaming => {}
    }
    if s.phase != Phase::Stopping {
        if !s.pg_connected && (s.phase == Phase::Streaming || s.pg_problem.is_some()) {
            reasons.push(match &s.pg_problem {
                Some(p) => p.clone(),
                None => "PostgreSQL unavailable: replication connection down, reconnecting".into(),
            });
        }
        if !s.nats_connected && s.phase == Phase::Streaming {
            reasons.push(if s.kafka_sink {
                "Kafka unavailable: no broker reachable, retrying".into()
            } else {
                "NATS unavailable: connection lost, reconnecting".into()
            });
        } else if s.publisher_stalled {
            reasons.push(if s.kafka_sink {
                "Kafka is not confirming deliveries; retrying".into()
            } else {
                "JetStream is not acknowledging publishes; retrying".into()
            });
        }
        if s.slot_missing {
            reasons.push("replication slot missing".into());
        } else if s.slot_lost {
            reasons.push(format!(
                "replication slot invalidated (wal_status = lost, reason {})",
                s.slot_invalidation_reason
                    .as_deref()
                    .unwrap_or("wal_removed")
            ));
        }
    }
    if reasons.is_empty() {
        Health::Ok
    } else {
        Health::Unavailable(reasons.join("; "))
    }
}

/// The `status` field of `/status`: `streaming`, `degraded` (streaming phase but not healthy),
/// `starting` or `stopping`.
pub fn status_word(s: &Snapshot) -> &'static str {
    match s.phase {
        Phase::Streaming if !health(s).is_ok() => "degraded",
        p => p.as_str(),
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// The sink's name in `/status`: `nats` or `kafka`.
pub fn sink_name(s: &Snapshot) -> &'static str {
    if s.kafka_sink {
        "kafka"
    } else {
        "nats"
    }
}

/// The `/status` document: the keys of the original bridge plus `durable_lsn`, `version` and
/// the sink's (`sink`, `sink_connected`, `sink_reconnect_count`). `nats_reconnect_count`, kept
/// for NATS users, is left out with Kafka, where it would describe no NATS connection.
pub fn status_json(s: &Snapshot) -> Value {
    let mut doc = json!({
        "status": status_word(s),
        "uptime_seconds": round(s.uptime.as_secs_f64(), 3),
        "wal_messages_received": s.wal_messages,
        "cdc_events_published": s.published,
        "current_lsn": s.received_lsn.to_string(),
        "is_connected": s.pg_connected,
        "reconnect_count": s.pg_reconnects,
        "sink": sink_name(s),
        "sink_connected": s.nats_connected,
        "sink_reconnect_count": s.nats_reconnects,
        "last_processing_time_us": s.last_processing_us,
        "slot_active": s.slot_active,
        "slot_invalidation_reason": s.slot_invalidation_reason,
        "slot_inactive_since": s.slot_inactive_since,
        "wal_lag_bytes": s.lag_bytes,
        "wal_lag_mb": round(s.lag_bytes as f64 / (1024.0 * 1024.0), 2),
        "durable_lsn": s.durable_lsn.to_string(),
        "id_namespace": s.id_namespace,
        "dead_letters": s.dead_letters.iter().sum::<u64>(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    if !s.kafka_sink {
        doc["nats_reconnect_count"] = s.nats_reconnects.into();
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::Lsn;
    use std::time::Duration;

    fn streaming() -> Snapshot {
        Snapshot {
            phase: Phase::Streaming,
            uptime: Duration::from_millis(12_345),
            wal_messages: 10,
            transactions: 2,
            changes: 4,
            received_lsn: Lsn(0x1_0000_00A0),
            flushed_lsn: Lsn(0x90),
            durable_lsn: Lsn(0x1_0000_0090),
            pg_connected: true,
            pg_reconnects: 1,
            pg_problem: None,
            id_namespace: Some("3f9a1c2e".into()),
            last_processing_us: 12,
            ring_used: 0,
            ring_capacity: 8,
            published: 4,
            duplicates: 0,
            bytes_published: 400,
            publish_errors: 0,
            batches: 0,
            in_flight: 0,
            queue_depth: 0,
            delivery_reports: 0,
            delivery_report_micros: 0,
            kafka_sink: false,
            publisher_stalled: false,
            nats_connected: true,
            nats_reconnects: 2,
            slot_checked: true,
            slot_active: true,
            slot_lost: false,
            slot_missing: false,
            slot_invalidation_reason: None,
            slot_inactive_since: None,
            lag_bytes: 3 * 1024 * 1024 + 512 * 1024,
            retained_bytes: 0,
            snapshot_progress: 0.0,
            snapshot_requests_ignored: 0,
            dead_letters: [0; 4],
        }
    }

    #[test]
    fn status_has_exactly_the_documented_keys() {
        let v = status_json(&streaming());
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = vec![
            "status",
            "uptime_seconds",
            "wal_messages_received",
            "cdc_events_published",
            "current_lsn",
            "is_connected",
            "reconnect_count",
            "sink",
            "sink_connected",
            "sink_reconnect_count",
            "nats_reconnect_count",
            "last_processing_time_us",
            "slot_active",
            "slot_invalidation_reason",
            "slot_inactive_since",
            "wal_lag_bytes",
            "wal_lag_mb",
            "durable_lsn",
            "id_namespace",
            "dead_letters",
            "version",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(v["status"], "streaming");
        assert_eq!(v["uptime_seconds"], 12.345);
        assert_eq!(v["current_lsn"], "1/A0");
        assert_eq!(v["durable_lsn"], "1/90");
        assert_eq!(v["id_namespace"], "3f9a1c2e");
        assert_eq!(v["is_connected"], true);
        assert_eq!(v["wal_lag_mb"], 3.5);
        assert_eq!(v["nats_reconnect_count"], 2);
        assert_eq!(v["sink"], "nats");
        assert_eq!(v["sink_connected"], true);
        assert_eq!(v["sink_reconnect_count"], 2);
    }

    #[test]
    fn status_and_health_name_kafka_when_it_is_the_sink() {
        let kafka = Snapshot {
            kafka_sink: true,
            nats_connected: false,
            ..streaming()
        };
        let v = status_json(&kafka);
        assert_eq!(v["sink"], "kafka");
        assert_eq!(v["sink_connected"], false);
        assert_eq!(v["sink_reconnect_count"], 2);
        // No NATS connection to describe.
        assert!(v.get("nats_reconnect_count").is_none(), "{v}");
        assert!(
            !v.as_object().unwrap().keys().any(|k| k.contains("nats")),
            "{v}"
        );
        let h = health(&kafka);
        assert!(
            matches!(&h, Health::Unavailable(r) if r.contains("Kafka") && !r.contains("NATS")),
            "{h:?}"
        );
        let starting = Snapshot {
            phase: Phase::Starting,
            ..kafka
        };
        assert!(
            matches!(health(&starting), Health::Unavailable(r) if r.contains("connecting to Kafka")),
        );
    }

    #[test]
    fn healthy_only_while_streaming_with_both_servers() {
        let s = streaming();
        assert_eq!(health(&s), Health::Ok);
        assert_eq!(health(&s).to_json(), json!({"status": "ok"}));

        let nats_down = Snapshot {
            nats_connected: false,
            ..streaming()
        };
        let h = health(&nats_down);
        assert_eq!(h.http_status(), 503);
        assert!(matches!(&h, Health::Unavailable(r) if r.contains("NATS unavailable")));
        assert_eq!(h.to_json()["status"], "unavailable");
        assert_eq!(status_word(&nats_down), "degraded");

        let pg_down = Snapshot {
            pg_connected: false,
            pg_problem: Some("PostgreSQL unavailable: could not connect".into()),
            ..streaming()
        };
        assert!(
            matches!(health(&pg_down), Health::Unavailable(r) if r == "PostgreSQL unavailable: could not connect")
        );

        let both = Snapshot {
            pg_connected: false,
            nats_connected: false,
            ..streaming()
        };
        assert!(
            matches!(health(&both), Health::Unavailable(r) if r.contains("PostgreSQL") && r.contains("NATS"))
        );

        let starting = Snapshot {
            phase: Phase::Starting,
            pg_connected: false,
            nats_connected: false,
            ..streaming()
        };
        assert!(matches!(health(&starting), Health::Unavailable(r) if r.starts_with("starting")));
        assert_eq!(status_word(&starting), "starting");

        let stopping = Snapshot {
            phase: Phase::Stopping,
            ..streaming()
        };
        assert_eq!(
            health(&stopping),
            Health::Unavailable("shutting down".into())
        );

        let lost = Snapshot {
            slot_lost: true,
            ..streaming()
        };
        assert!(matches!(health(&lost), Health::Unavailable(r) if r.contains("invalidated")));

        let stalled = Snapshot {
            publisher_stalled: true,
            ..streaming()
        };
        assert!(matches!(health(&stalled), Health::Unavailable(r) if r.contains("JetStream")));
    }
}
