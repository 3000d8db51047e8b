//! Replication slot helpers.

use std::time::Duration;

use pgbridge::pg::Lsn;

use crate::pg::PgServer;
use crate::wait_for;

/// The slot's `confirmed_flush_lsn` (slots are cluster-wide: read from any database).
pub fn confirmed_flush(pg: &PgServer, slot: &str) -> Option<Lsn> {
    pg.sql(
        "postgres",
        &format!(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    )
    .rows
    .first()
    .and_then(|r| r[0].as_deref())
    .map(|s| s.parse().expect("an LSN from PostgreSQL"))
}

/// Waits (bounded) until `slot` confirms everything written so far; the confirmed position.
pub fn wait_caught_up(pg: &PgServer, slot: &str, timeout: Duration) -> Lsn {
    let end: Lsn = pg.sql("postgres", "SELECT pg_current_wal_lsn()::text").rows[0][0]
        .as_deref()
        .expect("current WAL")
        .parse()
        .expect("an LSN from PostgreSQL");
    wait_for(
        "the slot to confirm the current WAL position",
        timeout,
        || confirmed_flush(pg, slot).filter(|c| *c >= end),
    )
}
