//! The MessagePack encoders: change events, values and documents.

use super::{has_old_columns, CommitFields};
use crate::pg::value::Value;
use crate::pg::Lsn;
use crate::wire::event::{ChangeEvent, ColumnValue};

/// Discards the result of an `rmp` write: writing into a `Vec` cannot fail (it grows, or the
/// process aborts on out-of-memory).
#[inline(always)]
pub(super) fn written<T, E>(r: Result<T, E>) {
    debug_assert!(r.is_ok(), "writing into a Vec failed");
}

/// A collection length as MessagePack's 32-bit length.
///
/// Rows have at most 1664 columns and PostgreSQL values at most 1 GB, so this cannot fail
/// for anything the server sends.
pub(super) fn len32(len: usize) -> u32 {
    u32::try_from(len).expect("collection longer than MessagePack allows")
}

/// A str: its header and its bytes, as `rmp::encode::write_str` writes them.
pub(super) fn mp_str(out: &mut Vec<u8>, s: &str) {
    mp_utf8(out, s.as_bytes());
}

/// [`mp_str`] of bytes the caller knows to be valid UTF-8 (a snapshot's ASCII fields):
/// the same str header and bytes.
pub(super) fn mp_utf8(out: &mut Vec<u8>, bytes: &[u8]) {
    match u8::try_from(bytes.len()) {
        // fixstr, most snapshot text: one byte without rmp's writer.
        Ok(len) if len < 32 => out.push(0xa0 | len),
        _ => written(rmp::encode::write_str_len(out, len32(bytes.len()))),
    }
    out.extend_from_slice(bytes);
}

pub(super) fn mp_uint(out: &mut Vec<u8>, v: u64) {
    written(rmp::encode::write_uint(out, v));
}

/// The map keys as MessagePack fixstr (`0xa0 | length`, then the bytes), written with one
/// copy each: every message carries 13 of them plus 2 per column. A test checks each against
/// its name in [`fields`](crate::wire::fields).
const K_TABLE: &[u8] = b"\xa5table";
const K_SCHEMA: &[u8] = b"\xa6schema";
const K_OPERATION: &[u8] = b"\xa9operation";
const K_RELATION_ID: &[u8] = b"\xabrelation_id";
const K_LSN: &[u8] = b"\xa3lsn";
const K_COMMIT_LSN: &[u8] = b"\xaacommit_lsn";
const K_XID: &[u8] = b"\xa3xid";
const K_COMMIT_TIME: &[u8] = b"\xabcommit_time";
const K_SEQ: &[u8] = b"\xa3seq";
const K_LAST_IN_TX: &[u8] = b"\xaalast_in_tx";
const K_COLUMNS: &[u8] = b"\xa7columns";
const K_OLD_COLUMNS: &[u8] = b"\xabold_columns";
const K_UNCHANGED_TOAST: &[u8] = b"\xafunchanged_toast";
const K_NAME: &[u8] = b"\xa4name";
const K_VALUE: &[u8] = b"\xa5value";

pub(super) fn msgpack_change(event: &ChangeEvent, commit: CommitFields<'_>, out: &mut Vec<u8>) {
    let with_old = has_old_columns(event);
    written(rmp::encode::write_map_len(out, 12 + u32::from(with_old)));

    out.extend_from_slice(K_TABLE);
    mp_str(out, &event.table.table);
    out.extend_from_slice(K_SCHEMA);
    mp_str(out, &event.table.schema);
    out.extend_from_slice(K_OPERATION);
    mp_str(out, event.operation.as_upper());
    out.extend_from_slice(K_RELATION_ID);
    mp_uint(out, u64::from(event.table.relation_id));
    let mut lsn = [0; Lsn::TEXT_MAX_LEN];
    out.extend_from_slice(K_LSN);
    mp_utf8(out, event.lsn.ascii(&mut lsn));
    out.extend_from_slice(K_COMMIT_LSN);
    mp_utf8(out, commit.lsn);
    out.extend_from_slice(K_XID);
    mp_uint(out, u64::from(event.xid));
    out.extend_from_slice(K_COMMIT_TIME);
    mp_utf8(out, commit.time);
    out.extend_from_slice(K_SEQ);
    mp_uint(out, u64::from(event.seq));
    out.extend_from_slice(K_LAST_IN_TX);
    written(rmp::encode::write_bool(out, event.last_in_tx));
    out.extend_from_slice(K_COLUMNS);
    msgpack_columns(&event.columns, out);
    if with_old {
        out.extend_from_slice(K_OLD_COLUMNS);
        match &event.old_columns {
            Some(columns) => msgpack_columns(columns, out),
            None => written(rmp::encode::write_nil(out)),
        }
    }
    out.extend_from_slice(K_UNCHANGED_TOAST);
    written(rmp::encode::write_array_len(
        out,
        len32(event.unchanged_toast.len()),
    ));
    for name in &event.unchanged_toast {
        mp_str(out, name);
    }
}

fn msgpack_columns(columns: &[ColumnValue], out: &mut Vec<u8>) {
    written(rmp::encode::write_array_len(out, len32(columns.len())));
    for column in columns {
        written(rmp::encode::write_map_len(out, 2));
        out.extend_from_slice(K_NAME);
        mp_str(out, &column.name);
        out.extend_from_slice(K_VALUE);
        msgpack_value(&column.value, out);
    }
}

pub(super) fn msgpack_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => written(rmp::encode::write_nil(out)),
        Value::Bool(b) => written(rmp::encode::write_bool(out, *b)),
        // Non-negative values as uint so every decoder reads them as unsigned.
        Value::Int(n) => match u64::try_from(*n) {
            Ok(u) => mp_uint(out, u),
            Err(_) => written(rmp::encode::write_sint(out, *n)),
        },
        Value::Float(x) => written(rmp::encode::write_f64(out, *x)),
        Value::Text(s) => mp_str(out, s),
        Value::Bytes(b) => written(rmp::encode::write_bin(out, b)),
        Value::Array(items) => {
            written(rmp::encode::write_array_len(out, len32(items.len())));
            for item in items {
                msgpack_value(item, out);
            }
        }
    }
}

/// A JSON document as the same structure in MessagePack.
pub(super) fn msgpack_document(doc: &serde_json::Value, out: &mut Vec<u8>) {
    match doc {
        serde_json::Value::Null => written(rmp::encode::write_nil(out)),
        serde_json::Value::Bool(b) => written(rmp::encode::write_bool(out, *b)),
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                mp_uint(out, u);
            } else if let Some(i) = n.as_i64() {
                written(rmp::encode::write_sint(out, i));
            } else {
                written(rmp::encode::write_f64(out, n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        serde_json::Value::String(s) => mp_str(out, s),
        serde_json::Value::Array(items) => {
            written(rmp::encode::write_array_len(out, len32(items.len())));
            for item in items {
                msgpack_document(item, out);
            }
        }
        serde_json::Value::Object(map) => {
            written(rmp::encode::write_map_len(out, len32(map.len())));
            for (k, v) in map {
                mp_str(out, k);
                msgpack_document(v, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::fields;

    #[test]
    fn strings_are_written_as_rmp_writes_them() {
        for len in [0, 1, 31, 32, 255, 256, 65_535, 65_536] {
            let text = "é".repeat(len / 2) + &"x".repeat(len % 2);
            let mut ours = Vec::new();
            mp_str(&mut ours, &text);
            let mut theirs = Vec::new();
            rmp::encode::write_str(&mut theirs, &text).unwrap();
            assert_eq!(ours, theirs, "{len} bytes");
        }
    }

    #[test]
    fn msgpack_keys_are_the_field_names_as_fixstr() {
        for (key, bytes) in [
            (fields::TABLE, K_TABLE),
            (fields::SCHEMA, K_SCHEMA),
            (fields::OPERATION, K_OPERATION),
            (fields::RELATION_ID, K_RELATION_ID),
            (fields::LSN, K_LSN),
            (fields::COMMIT_LSN, K_COMMIT_LSN),
            (fields::XID, K_XID),
            (fields::COMMIT_TIME, K_COMMIT_TIME),
            (fields::SEQ, K_SEQ),
            (fields::LAST_IN_TX, K_LAST_IN_TX),
            (fields::COLUMNS, K_COLUMNS),
            (fields::OLD_COLUMNS, K_OLD_COLUMNS),
            (fields::UNCHANGED_TOAST, K_UNCHANGED_TOAST),
            (fields::NAME, K_NAME),
            (fields::VALUE, K_VALUE),
        ] {
            let mut v = Vec::new();
            rmp::encode::write_str(&mut v, key).unwrap();
            assert_eq!(v, bytes, "{key}");
        }
    }
}
