//! The change event of the message contract: the decoded change handed from the wal thread to
//! the publisher, owned and self-contained, shaped like the message it is encoded to.

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

    /// The operation of an `operation` field ([`Operation::as_upper`]'s text).
    pub fn from_upper(text: &str) -> Option<Operation> {
        match text {
            "INSERT" => Some(Operation::Insert),
            "UPDATE" => Some(Operation::Update),
            "DELETE" => Some(Operation::Delete),
            "TRUNCATE" => Some(Operation::Truncate),
            _ => None,
        }
    }

    /// The operation of a subject's last token ([`Operation::as_lower`]'s text).
    pub fn from_lower(text: &str) -> Option<Operation> {
        match text {
            "insert" => Some(Operation::Insert),
            "update" => Some(Operation::Update),
            "delete" => Some(Operation::Delete),
            "truncate" => Some(Operation::Truncate),
            _ => None,
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

/// A column of a table as the server's Relation message describes it: what encoders that
/// type values by column (the Debezium envelope) and pick key columns need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnMeta {
    /// Column name.
    pub name: Arc<str>,
    /// The column type's OID (`pg_type.oid`); for a domain over a built-in type, the OID of
    /// that base type.
    pub type_oid: u32,
    /// The type modifier (`atttypmod`): length, precision and scale; -1 when none.
    pub type_modifier: i32,
    /// Part of the replica identity (the primary key unless the table says otherwise;
    /// every column with `REPLICA IDENTITY FULL`).
    pub key: bool,
}

/// The table a change belongs to (shared by all changes of the table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRef {
    /// The table's columns in order, as of the change (empty where unknown, e.g. in tests).
    pub columns: Vec<ColumnMeta>,
    /// Schema name, e.g. `public`.
    pub schema: Arc<str>,
    /// Table name, e.g. `users`.
    pub table: Arc<str>,
    /// pg_class OID.
    pub relation_id: u32,
    /// The replica identity columns (the primary key by default; every column with
    /// `REPLICA IDENTITY FULL`), in column order: the key of a Kafka record.
    pub key_columns: Vec<Arc<str>>,
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
    /// Start of the transaction's commit record: with `timeline` and `seq`, unique per change.
    pub commit_lsn: Lsn,
    /// The timeline `commit_lsn` was written on (not the connection's current one: after a
    /// promotion, WAL from before the switch point keeps its old timeline, and so its ids).
    pub timeline: u32,
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
    /// The deterministic JetStream message id (see [`super::id::message_id`]); `prefix` is
    /// [`super::id::id_prefix`] of the namespace.
    pub fn message_id(&self, prefix: &str) -> String {
        super::id::message_id(prefix, self.timeline, self.commit_lsn, self.seq)
    }
}
