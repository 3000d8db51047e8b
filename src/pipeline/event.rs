//! The decoded change handed from the wal thread to the publisher: owned, self-contained,
//! and shaped like the change event of the message contract (DESIGN §4).

use std::sync::Arc;

use crate::pg::value::Value;
use crate::pg::Lsn;

/// The kind of change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
    /// The table was emptied.
    Truncate,
}

impl Operation {
    /// `INSERT`, `UPDATE`, `DELETE`, `TRUNCATE`: the `operation` field.
    pub fn as_upper(self) -> &'static str {
        match self {
            Operation::Insert => "INSERT",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Truncate => "TRUNCATE",
        }
    }

    /// `insert`, `update`, `delete`, `truncate`: the last token of the subject.
    pub fn as_lower(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Truncate => "truncate",
        }
    }
}

/// One column's value in a change.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnValue {
    /// Column name (shared with the relation cache).
    pub name: Arc<str>,
    /// Typed value.
    pub value: Value,
}

/// The table a change belongs to (shared by all changes of the table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRef {
    /// Schema name, e.g. `public`.
    pub schema: Arc<str>,
    /// Table name, e.g. `users`.
    pub table: Arc<str>,
    /// pg_class OID.
    pub relation_id: u32,
}

/// A committed row change (or truncate) as published.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangeEvent {
    /// The table.
    pub table: Arc<TableRef>,
    /// INSERT, UPDATE, DELETE or TRUNCATE.
    pub operation: Operation,
    /// This change's WAL record position (several changes can share one).
    pub lsn: Lsn,
    /// Start of the transaction's commit record: with `seq`, unique per change.
    pub commit_lsn: Lsn,
    /// Top-level transaction id.
    pub xid: u32,
    /// Commit time, µs since 2000-01-01 UTC (PostgreSQL's epoch).
    pub commit_time: i64,
    /// Ordinal of the change inside its transaction, counting every change of the
    /// transaction (also of tables not streamed), so ids stay stable across configurations.
    pub seq: u32,
    /// True on the last change of its transaction that this bridge publishes (tables left out
    /// by `--table` publish nothing, so it marks the last published one).
    pub last_in_tx: bool,
    /// New row; for DELETE the old key or row; empty for TRUNCATE.
    pub columns: Vec<ColumnValue>,
    /// Old key or row for UPDATE when the server sent one (replica identity), else `None`.
    pub old_columns: Option<Vec<ColumnValue>>,
    /// Columns whose value was not sent because it is an unchanged TOASTed value; they are
    /// absent from `columns` (never sent as NULL).
    pub unchanged_toast: Vec<Arc<str>>,
}

impl ChangeEvent {
    /// The deterministic JetStream message id: `{commit_lsn}-{seq}`.
    pub fn message_id(&self) -> String {
        message_id(self.commit_lsn, self.seq)
    }
}

/// The JetStream message id of the change `seq` of the transaction committed at `commit_lsn`:
/// `{commit_lsn}-{seq}` (see [`ChangeEvent::message_id`]).
pub fn message_id(commit_lsn: Lsn, seq: u32) -> String {
    // Written by hand: this runs for every message, and `format!` costs several times more.
    let mut id = String::with_capacity(28);
    push_hex(&mut id, (commit_lsn.0 >> 32) as u32);
    id.push('/');
    push_hex(&mut id, commit_lsn.0 as u32);
    id.push('-');
    id.push_str(crate::sink::encode::decimal(u64::from(seq), &mut [0u8; 20]));
    id
}

/// Appends `v` in uppercase hex without leading zeros, as [`Lsn`]'s `Display` writes each half.
fn push_hex(out: &mut String, v: u32) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let digits = (32 - v.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(char::from(HEX[((v >> (4 * i)) & 0xF) as usize]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_is_commit_lsn_and_seq() {
        let ev = |lsn: u64, seq: u32| ChangeEvent {
            table: Arc::new(TableRef {
                schema: Arc::from("public"),
                table: Arc::from("t"),
                relation_id: 1,
            }),
            operation: Operation::Insert,
            lsn: Lsn(lsn),
            commit_lsn: Lsn(lsn),
            xid: 1,
            commit_time: 0,
            seq,
            last_in_tx: false,
            columns: Vec::new(),
            old_columns: None,
            unchanged_toast: Vec::new(),
        };
        for (lsn, seq) in [
            (0, 0),
            (0x25CB5E8, 7),
            (0x1_0000_0010, 4_294_967_295),
            (u64::MAX, 10),
        ] {
            assert_eq!(
                ev(lsn, seq).message_id(),
                format!("{}-{}", Lsn(lsn), seq),
                "{lsn:#x} {seq}"
            );
        }
    }
}
