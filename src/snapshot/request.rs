//! Parsing and admission of snapshot requests: what a request may name, the replies, the
//! rules (one snapshot per table, cooldown, cap) and where a reply may go.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::wire::fields;
use crate::wire::names::SNAPSHOT_REQUEST_PREFIX;

/// Longest subject shown in a log line (subjects come from clients).
const SHOWN_SUBJECT_CHARS: usize = 120;

/// Why a request was refused. The text is the reply's `error`; it names the requested table
/// only, never the tables the bridge streams.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The subject or path does not name a table.
    #[error(
        "malformed table {token:?}: {reason} (expected {SNAPSHOT_REQUEST_PREFIX}.{{table}} or \
         {SNAPSHOT_REQUEST_PREFIX}.{{schema}}.{{table}}, with the table token of change subjects)"
    )]
    Malformed {
        /// The table part as received.
        token: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The table is not one this bridge streams.
    #[error(
        "unknown table {0}: this bridge does not stream it (not in the publication, or not \
         selected with --table); check the name and the publication"
    )]
    UnknownTable(String),
    /// A snapshot of the table is running.
    #[error("a snapshot of {table} is already in progress; wait for {meta}")]
    InProgress {
        /// `schema.table`.
        table: String,
        /// Where its meta will be, per sink: the INIT stream's `init.meta.*` message, or
        /// the record on the table's Kafka init topic.
        meta: String,
    },
    /// The table was snapshotted moments ago.
    #[error(
        "a snapshot of {table} started less than {cooldown_secs} s ago (snapshot.cooldown_secs); \
         try again in {retry_after_secs} s"
    )]
    Cooldown {
        /// `schema.table`.
        table: String,
        /// The configured cooldown.
        cooldown_secs: u64,
        /// Seconds until a request is accepted.
        retry_after_secs: u64,
    },
    /// As many snapshots as allowed are running.
    #[error(
        "busy: {0} snapshot(s) are running, the most this bridge runs at once \
         (snapshot.max_concurrent); try again in a moment"
    )]
    Busy(usize),
    /// This process does not stream from the slot.
    #[error(
        "this bridge does not stream from the replication slot (standby, or reconnecting to \
         PostgreSQL); the bridge that holds the slot serves snapshots"
    )]
    NotActive,
    /// The bridge is stopping.
    #[error("the bridge is shutting down; request the snapshot again once a bridge runs")]
    ShuttingDown,
    /// The snapshot thread could not start.
    #[error("cannot start the snapshot: {0}")]
    Internal(String),
}

impl Refusal {
    /// A short machine-readable reason, the reply's `reason`.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Malformed { .. } => "malformed",
            Refusal::UnknownTable(_) => "unknown_table",
            Refusal::InProgress { .. } => "in_progress",
            Refusal::Cooldown { .. } => "cooldown",
            Refusal::Busy(_) => "busy",
            Refusal::NotActive => "standby",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::Internal(_) => "internal",
        }
    }

    /// The HTTP status of `POST /snapshots/{table}` for this refusal.
    pub fn http_status(&self) -> u16 {
        match self {
            Refusal::Malformed { .. } => 400,
            Refusal::UnknownTable(_) => 404,
            Refusal::InProgress { .. } => 409,
            Refusal::Cooldown { .. } | Refusal::Busy(_) => 429,
            Refusal::NotActive | Refusal::ShuttingDown => 503,
            Refusal::Internal(_) => 500,
        }
    }

    /// Seconds after which the same request may be accepted, when that is known.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Refusal::Cooldown {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Refusal::Busy(_) => Some(1),
            _ => None,
        }
    }

    /// The reply document.
    pub fn to_json(&self) -> serde_json::Value {
        let mut doc = serde_json::json!({
            fields::STATUS: fields::STATUS_ERROR,
            fields::REASON: self.code(),
            fields::ERROR: self.to_string(),
        });
        if let Some(s) = self.retry_after_secs() {
            doc[fields::RETRY_AFTER_SECS] = s.into();
        }
        doc
    }
}

/// A started snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The id on its chunks and meta.
    pub snapshot_id: String,
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// PostgreSQL's estimate of the table's rows (`pg_class.reltuples`), when it has one (not
    /// before the table was first vacuumed or analysed).
    pub estimated_rows: Option<u64>,
}

impl Accepted {
    /// The reply document.
    pub fn to_json(&self) -> serde_json::Value {
        let mut doc = serde_json::json!({
            fields::STATUS: fields::STATUS_ACCEPTED,
            fields::SNAPSHOT_ID: self.snapshot_id,
            fields::TABLE: self.table,
            fields::SCHEMA: self.schema,
        });
        if let Some(n) = self.estimated_rows {
            doc[fields::ESTIMATED_ROWS] = n.into();
        }
        doc
    }
}

/// Which snapshots run, and when each table's last one started.
#[derive(Debug, Default)]
pub(super) struct Admission {
    running: HashSet<(String, String)>,
    started: HashMap<(String, String), Instant>,
}

impl Admission {
    /// Marks `key` running at `now` when the rules allow: not running already (today's
    /// answer to a duplicate; `awaited_meta` says what to wait for), not started within
    /// `cooldown`, fewer than `max` running.
    pub(super) fn admit(
        &mut self,
        key: &(String, String),
        cooldown: Duration,
        max: usize,
        now: Instant,
        awaited_meta: impl FnOnce() -> String,
    ) -> Result<(), Refusal> {
        let qualified = || format!("{}.{}", key.0, key.1);
        if self.running.contains(key) {
            return Err(Refusal::InProgress {
                table: qualified(),
                meta: awaited_meta(),
            });
        }
        self.started
            .retain(|_, t| now.saturating_duration_since(*t) < cooldown);
        if let Some(t) = self.started.get(key) {
            let left = cooldown.saturating_sub(now.saturating_duration_since(*t));
            return Err(Refusal::Cooldown {
                table: qualified(),
                cooldown_secs: cooldown.as_secs(),
                // Rounded up: a retry after this many seconds is accepted.
                retry_after_secs: left.as_secs() + u64::from(left.subsec_nanos() > 0),
            });
        }
        if self.running.len() >= max {
            return Err(Refusal::Busy(self.running.len()));
        }
        self.running.insert(key.clone());
        if !cooldown.is_zero() {
            self.started.insert(key.clone(), now);
        }
        Ok(())
    }

    /// Marks `key` no longer running (its cooldown goes on).
    pub(super) fn release(&mut self, key: &(String, String)) {
        self.running.remove(key);
    }
}

/// `s` shortened for a log line, quoted and escaped (it comes from a client).
pub(super) fn shown(s: &str) -> String {
    if s.chars().count() > SHOWN_SUBJECT_CHARS {
        let cut: String = s.chars().take(SHOWN_SUBJECT_CHARS).collect();
        format!("{cut:?}...")
    } else {
        format!("{s:?}")
    }
}

/// True when `reply` may receive a reply: under `prefix`, and a plain subject (no
/// wildcards, whitespace or empty tokens) the server would deliver to one inbox.
pub(super) fn reply_allowed(reply: &str, prefix: &str) -> bool {
    reply.len() > prefix.len()
        && reply.starts_with(prefix)
        && reply
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        && !reply.split('.').any(str::is_empty)
}

/// A new snapshot id: time-ordered, unique per process, one subject token.
pub(super) fn new_snapshot_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(
        "{ms:x}{:04x}{:04x}",
        std::process::id() & 0xffff,
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_reply_has_the_estimate_when_known() {
        let mut a = Accepted {
            snapshot_id: "s1".into(),
            schema: "public".into(),
            table: "t".into(),
            estimated_rows: Some(42),
        };
        assert_eq!(a.to_json()["estimated_rows"], 42);
        a.estimated_rows = None;
        assert!(a.to_json().get("estimated_rows").is_none());
    }

    #[test]
    fn replies_go_only_to_subjects_under_the_prefix() {
        let p = "_INBOX.";
        assert!(reply_allowed("_INBOX.abc.1", p));
        assert!(reply_allowed("_INBOX.x", p));
        for bad in [
            "_INBOX.",
            "_INBOX",
            "cdc.users.insert",
            "$KV.schemas.x",
            "$JS.API.STREAM.PURGE.CDC",
            "_INBOX.*",
            "_INBOX.a.>",
            "_INBOX..a",
            "_INBOX.a b",
            "x_INBOX.a",
        ] {
            assert!(!reply_allowed(bad, p), "{bad} allowed");
        }
        assert!(reply_allowed("replies.bridge.1", "replies.bridge."));
        assert!(!reply_allowed("_INBOX.1", "replies.bridge."));
    }

    #[test]
    fn admission_keeps_the_cap_the_cooldown_and_one_snapshot_per_table() {
        let key = |t: &str| ("public".to_string(), t.to_string());
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(10);
        let meta = || "its meta".to_string();
        let mut a = Admission::default();
        assert_eq!(a.admit(&key("a"), cooldown, 2, t0, meta), Ok(()));
        assert_eq!(
            a.admit(&key("a"), cooldown, 2, t0, meta),
            Err(Refusal::InProgress {
                table: "public.a".into(),
                meta: "its meta".into()
            })
        );
        assert_eq!(a.admit(&key("b"), cooldown, 2, t0, meta), Ok(()));
        let busy = a.admit(&key("c"), cooldown, 2, t0, meta).unwrap_err();
        assert_eq!(busy, Refusal::Busy(2));
        assert_eq!(busy.http_status(), 429);
        // a finishes: c fits, a is in its cooldown.
        a.running.remove(&key("a"));
        assert_eq!(a.admit(&key("c"), cooldown, 3, t0, meta), Ok(()));
        let cool = a
            .admit(
                &key("a"),
                cooldown,
                3,
                t0 + Duration::from_millis(2500),
                meta,
            )
            .unwrap_err();
        assert_eq!(cool.code(), "cooldown");
        assert_eq!(cool.retry_after_secs(), Some(8));
        assert!(cool.to_string().contains("try again in 8 s"), "{cool}");
        assert_eq!(
            a.admit(&key("a"), cooldown, 3, t0 + Duration::from_secs(10), meta),
            Ok(())
        );
        // No cooldown: a new snapshot as soon as the last one ended.
        let mut a = Admission::default();
        assert_eq!(a.admit(&key("a"), Duration::ZERO, 1, t0, meta), Ok(()));
        a.running.remove(&key("a"));
        assert_eq!(a.admit(&key("a"), Duration::ZERO, 1, t0, meta), Ok(()));
    }

    #[test]
    fn refusals_say_why_and_name_only_the_requested_table() {
        let refusals = [
            Refusal::Malformed {
                token: "a.b.c".into(),
                reason: "too many tokens".into(),
            },
            Refusal::UnknownTable("public.nosuch".into()),
            Refusal::InProgress {
                table: "public.users".into(),
                meta: "its meta record on Kafka topic cdc.pgbridge.init.users".into(),
            },
            Refusal::Cooldown {
                table: "public.users".into(),
                cooldown_secs: 10,
                retry_after_secs: 3,
            },
            Refusal::Busy(2),
            Refusal::NotActive,
        ];
        for r in refusals {
            let doc = r.to_json();
            assert_eq!(doc["status"], "error");
            assert_eq!(doc["reason"], r.code());
            let text = doc["error"].as_str().unwrap();
            assert!(
                !text.contains("orders") && !text.contains("streams public"),
                "{text}"
            );
            assert!(r.http_status() >= 400);
        }
        let kafka = Refusal::InProgress {
            table: "public.users".into(),
            meta: "its meta record on Kafka topic cdc.pgbridge.init.users".into(),
        }
        .to_string();
        assert_eq!(
            kafka,
            "a snapshot of public.users is already in progress; wait for its meta record on \
             Kafka topic cdc.pgbridge.init.users"
        );
        let unknown = Refusal::UnknownTable("public.nosuch".into()).to_string();
        assert!(unknown.contains("unknown table public.nosuch"), "{unknown}");
        assert_eq!(Refusal::Busy(2).to_json()["retry_after_secs"], 1);
    }
}
