//! A consistent snapshot of one table, lined up exactly with the replication stream
//! (DESIGN §5, reference §3.1): on a replication connection, `BEGIN READ ONLY ISOLATION LEVEL
//! REPEATABLE READ`, `CREATE_REPLICATION_SLOT ... TEMPORARY ... (SNAPSHOT 'use')` gives the
//! consistent point C and installs the slot's snapshot, `COPY (SELECT ...) TO STDOUT` reads the
//! table in that snapshot, `COMMIT`, and the connection (with its temporary slot) is dropped.
//! The snapshot holds exactly the transactions that commit before C; every transaction with
//! `commit_lsn >= C` is in the change stream.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::conn::{quote_ident, quote_literal, PgError};
use super::copy::{CopyRowError, CopyRowParser};
use super::lsn::Lsn;
use super::replication::{ReplicationConnection, SnapshotAction};
use super::value::{decode_text_into, Value, ValueKind};

static SLOT_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// PostgreSQL refused or the connection broke.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The table has no columns visible to the publication (or does not exist).
    #[error("table {0} has no published columns")]
    NoColumns(String),
    /// A COPY row could not be parsed.
    #[error(transparent)]
    Row(#[from] CopyRowError),
    /// The caller stopped the snapshot.
    #[error("snapshot of {0} stopped: {1}")]
    Stopped(String, String),
}

/// The columns a snapshot reads, in table order.
#[derive(Debug, Clone)]
pub struct SnapshotColumns {
    /// Column names.
    pub names: Vec<Arc<str>>,
    /// How each column's text is decoded.
    pub kinds: Vec<ValueKind>,
}

/// What a finished snapshot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotOutcome {
    /// The consistent point: stream changes with `commit_lsn >= lsn` come after the snapshot.
    pub lsn: Lsn,
    /// Rows read.
    pub rows: u64,
}

/// Reads `schema.table` in a snapshot consistent with the replication stream.
///
/// `on_start` gets the consistent point and the columns before the first row; `on_row` gets
/// each row's typed values and may stop the snapshot with a reason. The publication's column
/// list (PostgreSQL 15+) is honoured; row filters are not applied (see README).
pub fn take_snapshot(
    params: &[(&str, &str)],
    publication: &str,
    schema: &str,
    table: &str,
    mut on_start: impl FnMut(Lsn, &SnapshotColumns) -> Result<(), String>,
    mut on_row: impl FnMut(&[Value]) -> Result<(), String>,
) -> Result<SnapshotOutcome, SnapshotError> {
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let mut repl = ReplicationConnection::connect(params)?;
    repl.connection()
        .execute("BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ")?;
    let slot_name = format!(
        "pgbridge_snap_{}_{}",
        std::process::id(),
        SLOT_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let slot = repl.create_slot(&slot_name, true, SnapshotAction::Use)?;

    // Columns as of the snapshot, limited to the publication's column list when it has one.
    let cols = repl.connection().query(&format!(
        "SELECT a.attname, CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END AS typ \
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
          WHERE a.attrelid = {rel}::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
            AND (NOT EXISTS (SELECT FROM pg_publication_tables p WHERE p.pubname = {pubname} \
                              AND p.schemaname = {s} AND p.tablename = {t}) \
                 OR a.attname = ANY (SELECT unnest(p.attnames) FROM pg_publication_tables p \
                                      WHERE p.pubname = {pubname} AND p.schemaname = {s} AND p.tablename = {t})) \
          ORDER BY a.attnum",
        rel = quote_literal(&qualified),
        pubname = quote_literal(publication),
        s = quote_literal(schema),
        t = quote_literal(table),
    ))?;
    let columns = SnapshotColumns {
        names: cols
            .rows
            .iter()
            .map(|r| Arc::from(r[0].as_deref().unwrap_or_default()))
            .collect(),
        kinds: cols
            .rows
            .iter()
            .map(|r| ValueKind::from_oid(r[1].as_deref().and_then(|t| t.parse().ok()).unwrap_or(0)))
            .collect(),
    };
    if columns.names.is_empty() {
        return Err(SnapshotError::NoColumns(qualified));
    }
    on_start(slot.consistent_point, &columns)
        .map_err(|e| SnapshotError::Stopped(qualified.clone(), e))?;

    let select = columns
        .names
        .iter()
        .map(|n| quote_ident(n))
        .collect::<Vec<_>>()
        .join(", ");
    let mut parser = CopyRowParser::new();
    // One slot per column, reused from row to row: a text value keeps its allocation.
    let mut values: Vec<Value> = vec![Value::Null; columns.names.len()];
    let mut failure: Option<SnapshotError> = None;
    let mut rows = 0u64;
    repl.connection().copy_out(
        &format!("COPY (SELECT {select} FROM {qualified}) TO STDOUT"),
        |row| {
            if let Err(e) = parser.parse(row) {
                failure = Some(e.into());
                return ControlFlow::Break(());
            }
            for (i, (kind, slot)) in columns.kinds.iter().zip(values.iter_mut()).enumerate() {
                match parser.get(i) {
                    None => *slot = Value::Null,
                    Some(text) => {
                        if decode_text_into(*kind, text, slot).is_err() {
                            *slot = Value::Text(String::from_utf8_lossy(text).into_owned());
                        }
                    }
                }
            }
            rows += 1;
            match on_row(&values) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    failure = Some(SnapshotError::Stopped(qualified.clone(), e));
                    ControlFlow::Break(())
                }
            }
        },
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    repl.connection().execute("COMMIT")?;
    Ok(SnapshotOutcome {
        lsn: slot.consistent_point,
        rows,
    })
}
