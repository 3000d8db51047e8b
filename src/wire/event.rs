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
    /// The deterministic JetStream message id (see [`message_id`]); `prefix` is
    /// [`id_prefix`] of the namespace.
    pub fn message_id(&self, prefix: &str) -> String {
        message_id(prefix, self.timeline, self.commit_lsn, self.seq)
    }
}

/// The first part of every message id: `{namespace}:`, built once per run.
pub fn id_prefix(namespace: &str) -> String {
    format!("{namespace}:")
}

/// The JetStream message id of the change `seq` of the transaction committed at `commit_lsn`
/// on `timeline`: `{namespace}:{timeline}:{commit_lsn}-{seq}`, e.g.
/// `3f9a1c2e:1:0/25CB5E8-0`. `prefix` is [`id_prefix`] of the namespace. Unique across
/// timelines (a promotion reuses LSNs) and across clusters, databases and publications (the
/// namespace).
pub fn message_id(prefix: &str, timeline: u32, commit_lsn: Lsn, seq: u32) -> String {
    // Written by hand: this runs for every message, and `format!` costs several times more.
    let mut id = String::with_capacity(prefix.len() + 40);
    id.push_str(prefix);
    id.push_str(crate::wire::encode::decimal(
        u64::from(timeline),
        &mut [0u8; 20],
    ));
    id.push(':');
    push_hex(&mut id, (commit_lsn.0 >> 32) as u32);
    id.push('/');
    push_hex(&mut id, commit_lsn.0 as u32);
    id.push('-');
    id.push_str(crate::wire::encode::decimal(u64::from(seq), &mut [0u8; 20]));
    id
}

/// The parts of a message id written by [`message_id`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageIdParts<'a> {
    /// The namespace.
    pub namespace: &'a str,
    /// The timeline of the commit.
    pub timeline: u32,
    /// The transaction's commit position.
    pub commit_lsn: Lsn,
    /// The change's ordinal in its transaction.
    pub seq: u32,
}

/// Reads a message id `{namespace}:{timeline}:{commit_lsn}-{seq}`; `None` for anything else
/// (for example another writer's id).
pub fn parse_message_id(id: &str) -> Option<MessageIdParts<'_>> {
    let (rest, seq) = id.rsplit_once('-')?;
    let (rest, lsn) = rest.rsplit_once(':')?;
    let (namespace, timeline) = rest.rsplit_once(':')?;
    if namespace.is_empty() {
        return None;
    }
    Some(MessageIdParts {
        namespace,
        timeline: timeline.parse().ok()?,
        commit_lsn: lsn.parse().ok()?,
        seq: seq.parse().ok()?,
    })
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
    fn message_id_is_namespace_timeline_commit_lsn_and_seq() {
        let ev = |lsn: u64, timeline: u32, seq: u32| ChangeEvent {
            table: Arc::new(TableRef {
                schema: Arc::from("public"),
                table: Arc::from("t"),
                relation_id: 1,
            }),
            operation: Operation::Insert,
            lsn: Lsn(lsn),
            commit_lsn: Lsn(lsn),
            timeline,
            xid: 1,
            commit_time: 0,
            seq,
            last_in_tx: false,
            columns: Vec::new(),
            old_columns: None,
            unchanged_toast: Vec::new(),
        };
        let prefix = id_prefix("3f9a1c2e");
        assert_eq!(
            ev(0x25CB5E8, 1, 0).message_id(&prefix),
            "3f9a1c2e:1:0/25CB5E8-0"
        );
        for (lsn, timeline, seq) in [
            (0, 1, 0),
            (0x25CB5E8, 2, 7),
            (0x1_0000_0010, 4_294_967_295, 4_294_967_295),
            (u64::MAX, 10, 10),
        ] {
            assert_eq!(
                ev(lsn, timeline, seq).message_id(&prefix),
                format!("3f9a1c2e:{timeline}:{}-{seq}", Lsn(lsn)),
                "{lsn:#x} {seq}"
            );
        }
        // The same change on another timeline or in another namespace has another id.
        assert_ne!(
            ev(0x100, 1, 0).message_id(&prefix),
            ev(0x100, 2, 0).message_id(&prefix)
        );
        assert_ne!(
            ev(0x100, 1, 0).message_id(&prefix),
            ev(0x100, 1, 0).message_id(&id_prefix("other"))
        );
    }

    #[test]
    fn message_ids_read_back() {
        let id = message_id(&id_prefix("3f9a1c2e"), 2, Lsn(0x10_025C_B5E8), 17);
        assert_eq!(
            parse_message_id(&id),
            Some(MessageIdParts {
                namespace: "3f9a1c2e",
                timeline: 2,
                commit_lsn: Lsn(0x10_025C_B5E8),
                seq: 17,
            })
        );
        for other in [
            "",
            "0/25CB5E8-0",
            ":1:0/1-0",
            "ns:x:0/1-0",
            "ns:1:zz-0",
            "ns:1:0/1-",
            "a-b",
        ] {
            assert_eq!(parse_message_id(other), None, "{other}");
        }
    }
}
