//! The Kafka side of the message contract: topic names, record keys, headers, and how one
//! change becomes records.
//!
//! | change                         | records (in this order)                                        |
//! |--------------------------------|----------------------------------------------------------------|
//! | INSERT, UPDATE (same key)      | one: key, value = the change event                             |
//! | DELETE                         | the DELETE; then, with tombstones on, a tombstone (same key, no value) |
//! | UPDATE that changes the key    | a DELETE of the old key (+ its tombstone), then an INSERT of the new key |
//! | TRUNCATE                       | one record without a key on every partition of the topic      |
//!
//! Every record carries the headers [`ID_HEADER`] (the change's message id) and [`OP_HEADER`]
//! (`insert`, `update`, `delete`, `truncate` or `tombstone`). A tombstone carries the id of
//! the DELETE it follows. The two halves of a key change keep the UPDATE's `commit_lsn` and
//! `seq` and get the UPDATE's id with [`KEY_CHANGE_DELETE_SUFFIX`] and
//! [`KEY_CHANGE_INSERT_SUFFIX`]: distinct, and the same on every resend.
//!
//! With the Debezium envelope, a record's value is [`super::encode::debezium::encode_debezium_value`]
//! and its key [`super::encode::debezium::encode_debezium_key`] (a tombstone keeps that key);
//! the halves of a key change are Debezium `d` and `c` events.
//!
//! An outbox event is one record on [`outbox_topic`] of its aggregate type: key = the
//! aggregate id's text (none when NULL), value = the payload as written, headers
//! [`ID_HEADER`] (its routed id) and the routing headers of [`crate::outbox::route`]. A dead
//! letter goes to [`DLQ_TOPIC`] with its original key, value and headers plus
//! `pgbridge-error`, `pgbridge-error-detail` and `pgbridge-source` (the topic it was meant
//! for); a too large one keeps no value and gets `pgbridge-truncated` (the value's size).
//! Header names are those of [`super::names`] in lower case ([`header_name`]).

use crate::config::Format;
use crate::pg::value::Value;

use super::encode::push_value;
use super::event::{ChangeEvent, ColumnValue, Operation};
use super::names::{DLQ_SUBJECT_PREFIX, OUTBOX_SUBJECT_PREFIX};
use super::subject::{push_name_token, push_table_token};

/// Last part of the positions topic of exactly-once delivery: `{prefix}.pgbridge.positions`.
pub const POSITIONS_TOPIC_SUFFIX: &str = "pgbridge.positions";

/// The positions topic of exactly-once delivery (compacted, one partition).
pub fn positions_topic(prefix: &str) -> String {
    format!("{prefix}.{POSITIONS_TOPIC_SUFFIX}")
}

/// The key of a bridge's record on the positions topic: `{system_identifier}/{slot}`. A slot
/// name is unique within a cluster, and a new cluster has a new system identifier, so a
/// record of another cluster never matches.
pub fn position_key(system_identifier: &str, slot: &str) -> String {
    format!("{system_identifier}/{slot}")
}

/// The value of a record on the positions topic: the end of the last PostgreSQL transaction
/// of the Kafka transaction that wrote it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PositionRecord {
    /// The cluster's system identifier (also in the key).
    pub system_identifier: String,
    /// The replication slot (also in the key).
    pub slot: String,
    /// The timeline the bridge streamed from when it wrote the record.
    pub timeline: u32,
    /// The transaction's commit `end_lsn`, `X/Y`: every transaction ending at or below it is
    /// in Kafka.
    pub end_lsn: String,
    /// When the record was written, ms since the Unix epoch.
    pub written_ms: i64,
}

impl PositionRecord {
    /// The end position, when the record belongs to `system_identifier` and `slot`.
    pub fn end_for(&self, system_identifier: &str, slot: &str) -> Option<crate::pg::Lsn> {
        (self.system_identifier == system_identifier && self.slot == slot)
            .then(|| self.end_lsn.parse().ok())
            .flatten()
    }
}

/// Header holding the change's message id (see [`super::id::message_id`]).
pub const ID_HEADER: &str = "pgbridge-id";
/// Header holding the record's operation: `insert` `update` `delete` `truncate` `tombstone`.
pub const OP_HEADER: &str = "pgbridge-op";
/// [`OP_HEADER`] of a tombstone.
pub const TOMBSTONE_OP: &str = "tombstone";
/// [`OP_HEADER`] of a snapshot chunk in an init topic ([`init_topic`]).
pub const SNAPSHOT_CHUNK_OP: &str = "snapshot";
/// [`OP_HEADER`] of a snapshot's meta record (or its failure document) in an init topic.
pub const SNAPSHOT_META_OP: &str = "meta";
/// The token between the prefix and the table in [`init_topic`] names.
pub const INIT_TOPIC_INFIX: &str = "pgbridge.init";
/// Appended to an UPDATE's id for the DELETE of the old key when the key changed.
pub const KEY_CHANGE_DELETE_SUFFIX: &str = "#d";
/// Appended to an UPDATE's id for the INSERT of the new key when the key changed.
pub const KEY_CHANGE_INSERT_SUFFIX: &str = "#i";

/// The topic of a table's changes: `{prefix}.{table}` in schema `public`, else
/// `{prefix}.{schema}.{table}`, with names encoded as in NATS subjects (`%XX` for bytes outside
/// `A-Z a-z 0-9 _ -`). Kafka does not allow `%` in topic names, so an escape is written `_` and
/// two uppercase hex digits: `order.items` becomes `order_2Eitems`, `straße` `stra_C3_9Fe`.
/// (A name that itself holds `_` and two uppercase hex digits, such as `a_2E`, can share a
/// topic with the escaped form of another name, `a.`; such pairs of names are not expected.)
pub fn topic(prefix: &str, schema: &str, table: &str) -> String {
    let mut token = String::with_capacity(schema.len() + table.len() + 1);
    push_table_token(&mut token, schema, table);
    let mut out = String::with_capacity(prefix.len() + token.len() + 8);
    out.push_str(prefix);
    out.push('.');
    out.extend(token.chars().map(|c| if c == '%' { '_' } else { c }));
    out
}

/// The init topic of a table's snapshots: `{prefix}.pgbridge.init.{table}`, the table encoded
/// as in [`topic`] (`cdc.pgbridge.init.users`, `cdc.pgbridge.init.sales.orders`). Never the
/// topic of a table's changes, which has at most two tokens after the prefix (a table `users`
/// in a schema `init` has `cdc.init.users`).
pub fn init_topic(prefix: &str, schema: &str, table: &str) -> String {
    topic(&format!("{prefix}.{INIT_TOPIC_INFIX}"), schema, table)
}

/// The topic of outbox events of `aggregate_type`: `outbox.{aggregate_type}`, the aggregate
/// type encoded into one token as in [`topic`] (`order.line` becomes `outbox.order_2Eline`).
pub fn outbox_topic(aggregate_type: &str) -> String {
    let mut token = String::with_capacity(aggregate_type.len() + 4);
    push_name_token(&mut token, aggregate_type);
    let mut out = String::with_capacity(OUTBOX_SUBJECT_PREFIX.len() + token.len() + 1);
    out.push_str(OUTBOX_SUBJECT_PREFIX);
    out.push('.');
    out.extend(token.chars().map(|c| if c == '%' { '_' } else { c }));
    out
}

/// The topic of dead letters: outbox events that cannot be delivered as they are, and, with
/// `--on-oversize dlq`, changes too large for Kafka.
pub const DLQ_TOPIC: &str = DLQ_SUBJECT_PREFIX;

/// The longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// The Kafka name of a header of [`super::names`]: Kafka header names are case-sensitive, and
/// every header the bridge writes to Kafka is lower-case, like [`ID_HEADER`] and
/// [`OP_HEADER`] (`Pgbridge-Event-Type` is written `pgbridge-event-type`).
pub fn header_name(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// The record key of a row: its replica identity columns as a document in `format`
/// (`{"id": 1}`), taken from `row` and, for a column `row` lacks (an unchanged TOASTed value),
/// from `fallback`. `None` for a table without replica identity columns.
pub fn push_key(
    format: Format,
    key_columns: &[std::sync::Arc<str>],
    row: &[ColumnValue],
    fallback: Option<&[ColumnValue]>,
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    if key_columns.is_empty() {
        return false;
    }
    let find = |name: &str| {
        row.iter()
            .chain(fallback.unwrap_or_default())
            .find(|c| &*c.name == name)
            .map_or(&Value::Null, |c| &c.value)
    };
    match format {
        Format::Msgpack => {
            let _ = rmp::encode::write_map_len(out, key_columns.len() as u32);
            for name in key_columns {
                let _ = rmp::encode::write_str(out, name);
                push_value(format, find(name), out);
            }
        }
        Format::Json => {
            out.push(b'{');
            for (i, name) in key_columns.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, &**name);
                out.push(b':');
                push_value(format, find(name), out);
            }
            out.push(b'}');
        }
    }
    true
}

/// What an UPDATE becomes when its key changed: the DELETE of the old row and the INSERT of
/// the new one, both with the UPDATE's positions. `None` when the key did not change (or the
/// server sent no old key, which it does only when the key changed or the identity is FULL).
pub fn split_key_change(
    format: Format,
    ev: &ChangeEvent,
    scratch: (&mut Vec<u8>, &mut Vec<u8>),
) -> Option<(ChangeEvent, ChangeEvent)> {
    if ev.operation != Operation::Update {
        return None;
    }
    let old = ev.old_columns.as_deref()?;
    let keys = &ev.table.key_columns;
    let (old_key, new_key) = scratch;
    push_key(format, keys, old, None, old_key);
    push_key(format, keys, &ev.columns, Some(old), new_key);
    if old_key == new_key {
        return None;
    }
    let delete = ChangeEvent {
        operation: Operation::Delete,
        columns: old.to_vec(),
        old_columns: Some(old.to_vec()),
        unchanged_toast: Vec::new(),
        last_in_tx: false,
        ..ev.clone()
    };
    let insert = ChangeEvent {
        operation: Operation::Insert,
        old_columns: None,
        ..ev.clone()
    };
    Some((delete, insert))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pg::Lsn;
    use crate::wire::event::TableRef;

    #[test]
    fn a_position_record_matches_only_its_cluster_and_slot() {
        assert_eq!(positions_topic("cdc"), "cdc.pgbridge.positions");
        assert_eq!(position_key("7714", "cdc_slot"), "7714/cdc_slot");
        let r = PositionRecord {
            system_identifier: "7714".into(),
            slot: "cdc_slot".into(),
            timeline: 1,
            end_lsn: "0/304CC38".into(),
            written_ms: 0,
        };
        let text = serde_json::to_string(&r).unwrap();
        let back: PositionRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.end_for("7714", "cdc_slot"), Some(Lsn(0x304CC38)));
        assert_eq!(back.end_for("7715", "cdc_slot"), None);
        assert_eq!(back.end_for("7714", "other"), None);
    }

    fn col(name: &str, v: i64) -> ColumnValue {
        ColumnValue {
            name: Arc::from(name),
            value: Value::Int(v),
        }
    }

    fn update(old: Option<Vec<ColumnValue>>, new: Vec<ColumnValue>) -> ChangeEvent {
        ChangeEvent {
            table: Arc::new(TableRef {
                schema: "public".into(),
                table: "t".into(),
                relation_id: 1,
                columns: Vec::new(),
                key_columns: vec![Arc::from("id")],
            }),
            operation: Operation::Update,
            lsn: Lsn(1),
            commit_lsn: Lsn(2),
            timeline: 1,
            xid: 1,
            commit_time: 0,
            seq: 3,
            last_in_tx: true,
            columns: new,
            old_columns: old,
            unchanged_toast: Vec::new(),
        }
    }

    #[test]
    fn topics_follow_the_subject_rule_without_percent() {
        assert_eq!(topic("cdc", "public", "users"), "cdc.users");
        assert_eq!(topic("cdc", "sales", "invoices"), "cdc.sales.invoices");
        assert_eq!(topic("cdc", "public", "order.items"), "cdc.order_2Eitems");
        assert_eq!(topic("cdc", "public", "order_items"), "cdc.order_items");
        assert_eq!(topic("cdc", "public", "straße"), "cdc.stra_C3_9Fe");
        assert_eq!(outbox_topic("order"), "outbox.order");
        assert_eq!(
            init_topic("cdc", "public", "users"),
            "cdc.pgbridge.init.users"
        );
        assert_eq!(
            init_topic("cdc", "sales", "order.items"),
            "cdc.pgbridge.init.sales.order_2Eitems"
        );
        // Never a table's change topic, whatever the schema is called.
        assert_ne!(
            init_topic("cdc", "public", "users"),
            topic("cdc", "init", "users")
        );
        assert_eq!(
            outbox_topic("order.line item"),
            "outbox.order_2Eline_20item"
        );
        assert_eq!(
            header_name(crate::wire::names::EVENT_TYPE_HEADER),
            "pgbridge-event-type"
        );
    }

    #[test]
    fn keys_in_both_formats() {
        let row = vec![col("id", 7), col("v", 1)];
        let keys = [Arc::from("id")];
        let mut out = Vec::new();
        assert!(push_key(Format::Json, &keys, &row, None, &mut out));
        assert_eq!(out, br#"{"id":7}"#);
        assert!(push_key(Format::Msgpack, &keys, &row, None, &mut out));
        let v = rmpv::decode::read_value(&mut &out[..]).unwrap();
        assert_eq!(v.to_string(), r#"{"id": 7}"#);
        assert!(!push_key(Format::Json, &[], &row, None, &mut out));
    }

    #[test]
    fn a_key_change_splits_and_a_plain_update_does_not() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let same = update(None, vec![col("id", 1), col("v", 2)]);
        assert!(split_key_change(Format::Json, &same, (&mut a, &mut b)).is_none());
        let changed = update(Some(vec![col("id", 1)]), vec![col("id", 2), col("v", 2)]);
        let (d, i) = split_key_change(Format::Json, &changed, (&mut a, &mut b)).unwrap();
        assert_eq!(d.operation, Operation::Delete);
        assert_eq!(d.columns, vec![col("id", 1)]);
        assert_eq!(i.operation, Operation::Insert);
        assert_eq!(
            (d.commit_lsn, d.seq, i.commit_lsn, i.seq),
            (Lsn(2), 3, Lsn(2), 3)
        );
        assert!(!d.last_in_tx && i.last_in_tx);
    }
}
