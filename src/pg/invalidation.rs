//! Invalidated replication slots: why PostgreSQL invalidated one, and what to do, in one line.
//!
//! An invalidated slot (`pg_replication_slots.wal_status = 'lost'`) can never stream again:
//! the changes after its confirmed position are gone for it. PostgreSQL 17 added
//! `invalidation_reason` (`wal_removed`, `rows_removed`, `wal_level_insufficient`) and 18
//! `idle_timeout` (`idle_replication_slot_timeout`); older servers only invalidate for
//! `max_slot_wal_keep_size`. START_REPLICATION on such a slot fails with SQLSTATE 55000 and
//! `can no longer get changes from replication slot` (≤ 16) or `can no longer access
//! replication slot` (17+), the reason in the detail.

use super::conn::{PgConnection, PgError};

/// The reason given for servers that do not name one: only WAL removal invalidated slots.
const WAL_REMOVED: &str = "wal_removed";

/// Columns of `pg_replication_slots` for the slot's invalidation, by server version: the
/// reason and `inactive_since` (17+) as text, NULL before.
pub fn slot_columns(server_version: i32) -> &'static str {
    if server_version >= 170000 {
        "invalidation_reason::text AS invalidation_reason, inactive_since::text AS inactive_since"
    } else {
        "NULL::text AS invalidation_reason, NULL::text AS inactive_since"
    }
}

/// `invalidation_reason` of `slot` (17+; `wal_removed` before, when `wal_status` is `lost`);
/// `None` when the slot is valid or missing.
pub fn read_reason(conn: &mut PgConnection, slot: &str) -> Result<Option<String>, PgError> {
    let sql = format!(
        "SELECT wal_status, {} FROM pg_replication_slots WHERE slot_name = $1",
        slot_columns(conn.server_version())
    );
    let r = conn.query_params(&sql, &[slot])?;
    Ok(reason_of(
        r.get(0, "wal_status"),
        r.get(0, "invalidation_reason"),
    ))
}

/// The invalidation reason from a slot's `wal_status` and `invalidation_reason`.
pub fn reason_of(wal_status: Option<&str>, invalidation_reason: Option<&str>) -> Option<String> {
    match (wal_status, invalidation_reason) {
        (_, Some(r)) if !r.is_empty() => Some(r.to_string()),
        (Some("lost"), _) => Some(WAL_REMOVED.to_string()),
        _ => None,
    }
}

/// The reason when `e` is the server refusing to stream from an invalidated slot.
pub fn reason_from_error(e: &PgError) -> Option<String> {
    let PgError::Db(db) = e else { return None };
    let invalidated = db.sqlstate == "55000"
        && (db
            .message
            .contains("can no longer get changes from replication slot")
            || db.message.contains("can no longer access replication slot"));
    if !invalidated {
        return None;
    }
    // 17+: `This replication slot has been invalidated due to "idle_timeout".`
    let detail = db.detail.as_deref().unwrap_or_default();
    let named = detail
        .split_once("due to \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(reason, _)| reason.to_string());
    Some(named.unwrap_or_else(|| WAL_REMOVED.to_string()))
}

/// What the reason means.
pub fn cause(reason: &str) -> String {
    match reason {
        "wal_removed" => "PostgreSQL removed WAL the slot still needed, because it fell further \
                          behind than max_slot_wal_keep_size allows"
            .into(),
        "idle_timeout" => {
            "the slot was not used for longer than idle_replication_slot_timeout".into()
        }
        "rows_removed" => "catalog rows the slot needed were removed (a slot on a standby)".into(),
        "wal_level_insufficient" => "wal_level on the primary is below logical".into(),
        other => format!("PostgreSQL gives the reason '{other}'"),
    }
}

/// How to keep it from happening again.
pub fn prevention(reason: &str) -> &'static str {
    match reason {
        "idle_timeout" => {
            "then raise idle_replication_slot_timeout (0 turns it off) or do not leave the bridge \
             stopped that long"
        }
        "rows_removed" => "then turn on hot_standby_feedback with a physical slot on the standby",
        "wal_level_insufficient" => "then set wal_level = logical on the primary",
        _ => {
            "then raise max_slot_wal_keep_size or fix what held the bridge back (NATS or JetStream \
             unavailable, bridge stopped)"
        }
    }
}

/// One line: what happened to `slot` and what to do.
pub fn advice(slot: &str, reason: &str) -> String {
    format!(
        "replication slot '{slot}' was invalidated ({reason}): {}; the changes after its last \
         confirmed position can no longer be streamed. To recover: drop the slot (SELECT \
         pg_drop_replication_slot('{slot}');), start the bridge to create a new one, and bootstrap \
         consumers from a new snapshot; {}",
        cause(reason),
        prevention(reason)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::conn::DbError;

    fn db(sqlstate: &str, message: &str, detail: Option<&str>) -> PgError {
        PgError::Db(DbError {
            sqlstate: sqlstate.into(),
            severity: "ERROR".into(),
            message: message.into(),
            detail: detail.map(str::to_string),
            hint: None,
        })
    }

    #[test]
    fn the_server_refusing_an_invalidated_slot_is_recognised_with_its_reason() {
        let pg18 = db(
            "55000",
            "can no longer access replication slot \"s1\"",
            Some("This replication slot has been invalidated due to \"idle_timeout\"."),
        );
        assert_eq!(reason_from_error(&pg18).as_deref(), Some("idle_timeout"));
        let pg15 = db(
            "55000",
            "can no longer get changes from replication slot \"s1\"",
            Some("This slot has been invalidated because it exceeded the maximum reserved size."),
        );
        assert_eq!(reason_from_error(&pg15).as_deref(), Some("wal_removed"));
        assert_eq!(
            reason_from_error(&db("55006", "replication slot \"s1\" is active", None)),
            None
        );
    }

    #[test]
    fn reasons_from_the_slot_row() {
        assert_eq!(reason_of(Some("reserved"), None), None);
        assert_eq!(
            reason_of(Some("lost"), None).as_deref(),
            Some("wal_removed")
        );
        assert_eq!(
            reason_of(Some("lost"), Some("idle_timeout")).as_deref(),
            Some("idle_timeout")
        );
    }

    #[test]
    fn advice_says_what_happened_and_what_to_do() {
        let a = advice("cdc_slot", "idle_timeout");
        assert!(a.contains("invalidated (idle_timeout)"), "{a}");
        assert!(a.contains("idle_replication_slot_timeout"), "{a}");
        assert!(a.contains("pg_drop_replication_slot('cdc_slot')"), "{a}");
        assert!(a.contains("new snapshot"), "{a}");
        assert!(!a.contains('\n'));
        let a = advice("cdc_slot", "wal_removed");
        assert!(a.contains("max_slot_wal_keep_size"), "{a}");
    }
}
