//! The slot monitor: every `monitor.interval` it reads the replication slot over a normal
//! connection, exports its lag and state, and logs a warning or an error when the lag passes
//! the configured thresholds or the slot is about to be, or was, invalidated.
//!
//! The lag is `pg_current_wal_lsn() - confirmed_flush_lsn`: WAL written since the last
//! position the bridge confirmed. It grows while the bridge cannot store changes (NATS down)
//! and shrinks when it catches up; PostgreSQL keeps that WAL on disk meanwhile.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::{Config, MonitorConfig};
use crate::pg::conn::{ConnectionKind, PgConnection, PgError};
use crate::pg::invalidation;
use crate::pg::Lsn;
use crate::shutdown::Shutdown;

use super::state::Telemetry;

/// `application_name` of the monitor's connection, as `pg_stat_activity` shows it.
pub const MONITOR_APPLICATION_NAME: &str = "pgbridge-monitor";

/// The slot's row, with the lag computed by the server; the invalidation columns only exist
/// on 17+.
fn slot_query(server_version: i32) -> String {
    format!(
        "SELECT active, wal_status, restart_lsn::text AS restart_lsn, \
            confirmed_flush_lsn::text AS confirmed_flush_lsn, \
            pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS lag, \
            pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained, {} \
       FROM pg_replication_slots WHERE slot_name = $1",
        invalidation::slot_columns(server_version)
    )
}

/// One reading of `pg_replication_slots` for the bridge's slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotReading {
    /// A walsender streams from the slot.
    pub active: bool,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Oldest WAL the slot needs.
    pub restart_lsn: Option<Lsn>,
    /// Last position the consumer confirmed.
    pub confirmed_flush: Option<Lsn>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`, bytes.
    pub lag_bytes: Option<u64>,
    /// `pg_current_wal_lsn() - restart_lsn`, bytes.
    pub retained_bytes: Option<u64>,
    /// Why the slot was invalidated (`invalidation_reason`, 17+; `wal_removed` before when
    /// `wal_status` is `lost`).
    pub invalidation_reason: Option<String>,
    /// Since when no walsender uses the slot (`inactive_since`, 17+).
    pub inactive_since: Option<String>,
}

/// Reads the slot; `None` when it does not exist.
pub fn read_slot(conn: &mut PgConnection, slot: &str) -> Result<Option<SlotReading>, PgError> {
    let r = conn.query_params(&slot_query(conn.server_version()), &[slot])?;
    if r.rows.is_empty() {
        return Ok(None);
    }
    let bytes = |col: &str| {
        r.get(0, col)
            .and_then(|v| v.parse::<i64>().ok())
            .map(|v| v.max(0) as u64)
    };
    Ok(Some(SlotReading {
        active: r.get(0, "active") == Some("t"),
        wal_status: r.get(0, "wal_status").map(str::to_owned),
        restart_lsn: r.get(0, "restart_lsn").and_then(|v| v.parse().ok()),
        confirmed_flush: r.get(0, "confirmed_flush_lsn").and_then(|v| v.parse().ok()),
        lag_bytes: bytes("lag"),
        retained_bytes: bytes("retained"),
        invalidation_reason: invalidation::reason_of(
            r.get(0, "wal_status"),
            r.get(0, "invalidation_reason"),
        ),
        inactive_since: r.get(0, "inactive_since").map(str::to_owned),
    }))
}

/// Something the monitor logs about a reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// `Warn` or `Error`.
    pub level: log::Level,
    /// One line saying what happened and what to do.
    pub message: String,
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// What to log about a reading (`None`: the slot does not exist). Pure, so the wording and
/// the thresholds are unit-tested.
pub fn assess(reading: Option<&SlotReading>, slot: &str, config: &MonitorConfig) -> Vec<Finding> {
    let error = |message: String| Finding {
        level: log::Level::Error,
        message,
    };
    let warn = |message: String| Finding {
        level: log::Level::Warn,
        message,
    };
    let Some(r) = reading else {
        return vec![error(format!(
            "replication slot '{slot}' does not exist any more: it was dropped while the bridge runs, so \
             PostgreSQL no longer keeps WAL for it and changes made since its last confirmed position \
             can be missing from the stream; restart the bridge (it creates a new slot) and bootstrap \
             consumers from a new snapshot"
        ))];
    };
    let mut out = Vec::new();
    let confirmed = r
        .confirmed_flush
        .map(|l| l.to_string())
        .unwrap_or_else(|| "its last confirmed position".into());
    match r.wal_status.as_deref() {
        Some("lost") => {
            let reason = r.invalidation_reason.as_deref().unwrap_or("wal_removed");
            out.push(error(format!(
                "replication slot '{slot}' was invalidated (wal_status = lost, reason {reason}): {}. Changes after \
                 {confirmed} can no longer be streamed. To recover: stop the bridge, drop the slot \
                 (SELECT pg_drop_replication_slot('{slot}');), start the bridge to create a new one, and \
                 bootstrap consumers from a new snapshot; {}",
                invalidation::cause(reason),
                invalidation::prevention(reason)
            )))
        }
        Some("unreserved") => out.push(warn(format!(
            "replication slot '{slot}' needs WAL beyond max_slot_wal_keep_size (wal_status = unreserved): \
             it will be invalidated at the next checkpoint unless the bridge catches up; check that NATS \
             and JetStream accept messages"
        ))),
        _ => {}
    }
    if let Some(lag) = r.lag_bytes {
        if lag >= config.lag_critical_bytes {
            out.push(error(format!(
                "replication slot '{slot}' lags {} behind the server (critical above {}): PostgreSQL keeps \
                 this WAL on disk until the bridge confirms it; check that NATS and JetStream accept \
                 messages and that the bridge is streaming (/health)",
                human_bytes(lag),
                human_bytes(config.lag_critical_bytes)
            )));
        } else if lag >= config.lag_warn_bytes {
            out.push(warn(format!(
                "replication slot '{slot}' lags {} behind the server (warning above {}); PostgreSQL keeps \
                 this WAL until the bridge confirms it",
                human_bytes(lag),
                human_bytes(config.lag_warn_bytes)
            )));
        }
    }
    out
}

/// Stores a reading in the telemetry.
fn record(telemetry: &Telemetry, reading: Option<&SlotReading>) {
    let s = &telemetry.slot;
    s.checked.store(true, Relaxed);
    s.missing.store(reading.is_none(), Relaxed);
    if let Some(r) = reading {
        s.active.store(r.active, Relaxed);
        s.lost
            .store(r.wal_status.as_deref() == Some("lost"), Relaxed);
        s.set_details(r.invalidation_reason.clone(), r.inactive_since.clone());
        if let Some(lag) = r.lag_bytes {
            s.lag_bytes.store(lag, Relaxed);
        }
        if let Some(ret) = r.retained_bytes {
            s.retained_bytes.store(ret, Relaxed);
        }
    } else {
        s.active.store(false, Relaxed);
    }
}

/// Starts the monitor thread; it reads the slot once the bridge tried PostgreSQL's set-up
/// ([`Telemetry::set_setup_attempted`]), then every `monitor.interval`, until `stop` is
/// triggered (which must trigger that signal too). Connection problems are logged once per outage and retried at the
/// next interval.
pub fn spawn_monitor(
    config: &Config,
    telemetry: Arc<Telemetry>,
    stop: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    let mut params = config.postgres.libpq_params();
    for (k, v) in params.iter_mut() {
        if *k == "application_name" {
            *v = MONITOR_APPLICATION_NAME.to_owned();
        }
    }
    let slot = config.replication.slot.clone();
    let monitor = config.monitor.clone();
    std::thread::Builder::new()
        .name("monitor".into())
        .spawn(move || {
            // Its own login would compete with the set-up's logins for the CPU (start-up
            // time), and the slot may exist only after the set-up.
            let attempted = telemetry.setup_attempted();
            while !attempted.wait_timeout(Duration::from_secs(3600)) {}
            let mut conn: Option<PgConnection> = None;
            let mut failing = false;
            let mut seen = false;
            while !stop.is_triggered() {
                let result = match conn.as_mut() {
                    Some(c) => read_slot(c, &slot),
                    None => PgConnection::connect(&params, ConnectionKind::Normal).and_then(|mut c| {
                        let r = read_slot(&mut c, &slot);
                        conn = Some(c);
                        r
                    }),
                };
                if failing && result.is_ok() {
                    log::info!("slot monitor reads replication slot '{slot}' again");
                    failing = false;
                }
                match result {
                    // The bridge creates the slot at its first start, maybe after this read.
                    Ok(None) if !seen => {
                        log::debug!("replication slot '{slot}' does not exist yet")
                    }
                    Ok(reading) => {
                        seen |= reading.is_some();
                        record(&telemetry, reading.as_ref());
                        for f in assess(reading.as_ref(), &slot, &monitor) {
                            log::log!(f.level, "{}", f.message);
                        }
                    }
                    Err(e) => {
                        // A broken connection is opened again at the next interval.
                        conn = None;
                        if !failing {
                            log::warn!(
                                "slot monitor cannot read replication slot '{slot}': {e}; retrying every {}s",
                                monitor.interval().as_secs()
                            );
                            failing = true;
                        }
                    }
                }
                // Until the bridge has created the slot, look again soon.
                let wait = if seen {
                    monitor.interval()
                } else {
                    monitor.interval().min(Duration::from_secs(1))
                };
                if stop.wait_timeout(wait) {
                    break;
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MonitorConfig {
        MonitorConfig {
            lag_warn_bytes: 1000,
            lag_critical_bytes: 2000,
            ..MonitorConfig::default()
        }
    }

    fn reading(lag: u64, status: &str) -> SlotReading {
        SlotReading {
            active: true,
            wal_status: Some(status.into()),
            restart_lsn: Some(Lsn(10)),
            confirmed_flush: Some(Lsn(0x16B3748)),
            lag_bytes: Some(lag),
            retained_bytes: Some(lag + 10),
            invalidation_reason: (status == "lost").then(|| "wal_removed".into()),
            inactive_since: None,
        }
    }

    #[test]
    fn lag_below_the_warning_is_quiet() {
        assert!(assess(Some(&reading(999, "reserved")), "s", &config()).is_empty());
    }

    #[test]
    fn lag_thresholds_warn_then_error() {
        let f = assess(Some(&reading(1000, "reserved")), "s", &config());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].level, log::Level::Warn);
        assert!(f[0].message.contains("lags 1000 B"), "{}", f[0].message);

        let f = assess(Some(&reading(5 << 30, "extended")), "s", &config());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].level, log::Level::Error);
        assert!(f[0].message.contains("lags 5.0 GiB"), "{}", f[0].message);
    }

    #[test]
    fn lost_slot_says_what_happened_and_what_to_do() {
        let f = assess(Some(&reading(0, "lost")), "cdc_slot", &config());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].level, log::Level::Error);
        let m = &f[0].message;
        assert!(
            m.contains("invalidated (wal_status = lost, reason wal_removed)"),
            "{m}"
        );
        assert!(m.contains("max_slot_wal_keep_size"), "{m}");
        assert!(m.contains("after 0/16B3748"), "{m}");
        assert!(m.contains("pg_drop_replication_slot('cdc_slot')"), "{m}");
        assert!(m.contains("snapshot"), "{m}");
    }

    #[test]
    fn an_idle_timeout_says_which_setting_invalidated_the_slot() {
        let r = SlotReading {
            invalidation_reason: Some("idle_timeout".into()),
            inactive_since: Some("2026-12-02 08:48:56+00".into()),
            ..reading(0, "lost")
        };
        let f = assess(Some(&r), "cdc_slot", &config());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].level, log::Level::Error);
        let m = &f[0].message;
        assert!(m.contains("reason idle_timeout"), "{m}");
        assert!(m.contains("idle_replication_slot_timeout"), "{m}");
        assert!(!m.contains("max_slot_wal_keep_size"), "{m}");
    }

    #[test]
    fn unreserved_and_missing_slots_are_reported() {
        let f = assess(Some(&reading(0, "unreserved")), "s", &config());
        assert_eq!(f[0].level, log::Level::Warn);
        assert!(f[0].message.contains("next checkpoint"));
        let f = assess(None, "s", &config());
        assert_eq!(f[0].level, log::Level::Error);
        assert!(f[0].message.contains("does not exist"));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(512 << 20), "512.0 MiB");
    }
}
