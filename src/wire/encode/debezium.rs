//! Change events in Debezium's change-event envelope, as the Debezium PostgreSQL connector
//! writes them through Kafka Connect's JSON converter, so consumers written for Debezium
//! read the bridge's messages unchanged (docs/protocol.md, "The Debezium envelope").
//!
//! The record value is `{"before", "after", "source", "transaction", "op", "ts_ms", "ts_us",
//! "ts_ns"}`; with schemas on (the converter's `schemas.enable=true`) it is wrapped as
//! `{"schema": …, "payload": …}`. The record key ([`encode_debezium_key`]) is the key
//! columns' values, `{"id": 1}`, wrapped the same way with schemas on.
//!
//! Column values follow the connector's default settings (see `values`); the row structs
//! name every column of the table, in table order, from the event's
//! [`TableRef::columns`](crate::wire::event::TableRef::columns).

mod schema;
#[cfg(test)]
mod tests;
mod values;

pub use values::{builtin_type_oid, UNAVAILABLE_VALUE};

use std::sync::Arc;

use super::json::{json_str, json_u64, json_value};
use crate::pg::pgoutput::pg_to_unix_micros;
use crate::wire::event::{ChangeEvent, ColumnMeta, ColumnValue, Operation};
use values::{mapping, push_mapped, push_unavailable};

/// `source.connector`.
pub const CONNECTOR: &str = "postgresql";

/// What the envelope says beyond the event itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebeziumOptions {
    /// `source.name`, and the prefix of the schema names (`{name}.{schema}.{table}.Value`):
    /// Debezium's `topic.prefix`.
    pub name: String,
    /// `source.db`: the database name.
    pub db: String,
    /// Wrap value and key as `{"schema": …, "payload": …}`.
    pub schemas: bool,
}

/// The `op` of an operation: `c`, `u`, `d`, `t`.
pub fn op_code(op: Operation) -> &'static str {
    match op {
        Operation::Insert => "c",
        Operation::Update => "u",
        Operation::Delete => "d",
        Operation::Truncate => "t",
    }
}

/// Encodes `event` as Debezium's record value into `out`, replacing what `out` held;
/// `now_unix_us` (µs since the Unix epoch) is the envelope's own `ts_ms`/`ts_us`/`ts_ns`, the
/// time the bridge handled the change.
pub fn encode_debezium_value(
    opts: &DebeziumOptions,
    event: &ChangeEvent,
    now_unix_us: i64,
    out: &mut Vec<u8>,
) {
    out.clear();
    if opts.schemas {
        out.extend_from_slice(b"{\"schema\":");
        schema::push_value_schema(opts, &event.table, out);
        out.extend_from_slice(b",\"payload\":");
    }
    push_payload(opts, event, now_unix_us, out);
    if opts.schemas {
        out.push(b'}');
    }
}

/// Encodes Debezium's record key of `event` into `out`, replacing what `out` held: the key
/// columns' values, `{"id": 1}` (with schemas, `{"schema": …, "payload": {"id": 1}}`). False,
/// with `out` empty, when the event has no key: a TRUNCATE, or a table without key columns
/// (Debezium writes a null key then).
///
/// The key columns are the table's replica identity as PostgreSQL reports it: the primary key
/// by default, every column with `REPLICA IDENTITY FULL`.
pub fn encode_debezium_key(opts: &DebeziumOptions, event: &ChangeEvent, out: &mut Vec<u8>) -> bool {
    out.clear();
    if event.operation == Operation::Truncate || !event.table.columns.iter().any(|c| c.key) {
        return false;
    }
    if opts.schemas {
        out.extend_from_slice(b"{\"schema\":");
        schema::push_key_schema(opts, &event.table, out);
        out.extend_from_slice(b",\"payload\":");
    }
    out.push(b'{');
    let mut first = true;
    for meta in event.table.columns.iter().filter(|c| c.key) {
        if !first {
            out.push(b',');
        }
        first = false;
        json_str(out, &meta.name);
        out.push(b':');
        match event.columns.iter().find(|c| c.name == meta.name) {
            Some(c) => push_mapped(mapping(meta.type_oid, meta.type_modifier), &c.value, out),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
    if opts.schemas {
        out.push(b'}');
    }
    true
}

fn push_payload(opts: &DebeziumOptions, ev: &ChangeEvent, now_unix_us: i64, out: &mut Vec<u8>) {
    let columns = &ev.table.columns;
    out.extend_from_slice(b"{\"before\":");
    match (ev.operation, &ev.old_columns) {
        // A DELETE's `columns` are its old key or row.
        (Operation::Delete, _) => push_row(columns, &ev.columns, &[], out),
        // An UPDATE has old values with REPLICA IDENTITY FULL, or when its key changed.
        (Operation::Update, Some(old)) => push_row(columns, old, &[], out),
        _ => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"after\":");
    match ev.operation {
        Operation::Insert | Operation::Update => {
            push_row(columns, &ev.columns, &ev.unchanged_toast, out)
        }
        Operation::Delete | Operation::Truncate => out.extend_from_slice(b"null"),
    }
    let commit_us = pg_to_unix_micros(ev.commit_time);
    out.extend_from_slice(b",\"source\":{\"version\":");
    json_str(out, env!("CARGO_PKG_VERSION"));
    out.extend_from_slice(b",\"connector\":\"postgresql\",\"name\":");
    json_str(out, &opts.name);
    out.extend_from_slice(b",\"ts_ms\":");
    push_i64(out, commit_us.div_euclid(1000));
    out.extend_from_slice(b",\"snapshot\":\"false\",\"db\":");
    json_str(out, &opts.db);
    // Debezium's `[last commit LSN, this change's LSN]`, decimal strings.
    out.extend_from_slice(b",\"sequence\":\"[\\\"");
    json_u64(out, ev.commit_lsn.0);
    out.extend_from_slice(b"\\\",\\\"");
    json_u64(out, ev.lsn.0);
    out.extend_from_slice(b"\\\"]\",\"ts_us\":");
    push_i64(out, commit_us);
    out.extend_from_slice(b",\"ts_ns\":");
    push_i64(out, commit_us.saturating_mul(1000));
    out.extend_from_slice(b",\"schema\":");
    json_str(out, &ev.table.schema);
    out.extend_from_slice(b",\"table\":");
    json_str(out, &ev.table.table);
    out.extend_from_slice(b",\"txId\":");
    json_u64(out, u64::from(ev.xid));
    out.extend_from_slice(b",\"lsn\":");
    json_u64(out, ev.lsn.0);
    out.extend_from_slice(b",\"xmin\":null},\"transaction\":null,\"op\":");
    json_str(out, op_code(ev.operation));
    out.extend_from_slice(b",\"ts_ms\":");
    push_i64(out, now_unix_us.div_euclid(1000));
    out.extend_from_slice(b",\"ts_us\":");
    push_i64(out, now_unix_us);
    out.extend_from_slice(b",\"ts_ns\":");
    push_i64(out, now_unix_us.saturating_mul(1000));
    out.push(b'}');
}

/// A row struct: every column of the table in order, its value from `values` (which is in
/// table order but may lack columns), Debezium's placeholder for an `unchanged` TOASTed
/// value, null for a column the row does not carry (the non-key columns of an old key).
/// Without column metadata the values are written as they are.
fn push_row(
    columns: &[ColumnMeta],
    values: &[ColumnValue],
    unchanged: &[Arc<str>],
    out: &mut Vec<u8>,
) {
    out.push(b'{');
    if columns.is_empty() {
        for (i, c) in values.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, &c.name);
            out.push(b':');
            json_value(&c.value, out);
        }
        out.push(b'}');
        return;
    }
    let mut next = values.iter().peekable();
    for (i, meta) in columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(out, &meta.name);
        out.push(b':');
        let mapping = mapping(meta.type_oid, meta.type_modifier);
        match next.next_if(|c| c.name == meta.name) {
            Some(c) => push_mapped(mapping, &c.value, out),
            None if unchanged.contains(&meta.name) => push_unavailable(mapping, out),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
}

fn push_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    json_u64(out, v.unsigned_abs());
}
