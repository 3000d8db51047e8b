//! Change events in the wire formats: MessagePack (the default) and JSON.
//!
//! Both formats carry one map (JSON object) with these keys, in this order:
//!
//! | key               | MessagePack                 | JSON                                   |
//! |-------------------|-----------------------------|----------------------------------------|
//! | `table`           | str                         | string                                 |
//! | `schema`          | str                         | string                                 |
//! | `operation`       | str: `INSERT` `UPDATE` `DELETE` `TRUNCATE` | string                  |
//! | `relation_id`     | uint                        | number                                 |
//! | `lsn`             | str `X/X`, e.g. `0/25CB3C8` | string                                 |
//! | `commit_lsn`      | str `X/X`                   | string                                 |
//! | `xid`             | uint                        | number                                 |
//! | `commit_time`     | str, e.g. `2025-12-10T10:30:00.123456Z` | string                     |
//! | `seq`             | uint                        | number                                 |
//! | `last_in_tx`      | bool                        | `true` / `false`                       |
//! | `columns`         | array of `{"name": str, "value": value}` | array of objects          |
//! | `old_columns`     | like `columns`, or nil      | like `columns`, or `null`              |
//! | `unchanged_toast` | array of str (maybe empty)  | array of strings                       |
//!
//! * `columns` is the new row; for DELETE it is the old key or row; for TRUNCATE it is empty.
//! * `old_columns` is present for UPDATE and DELETE only: the old key or row when the server
//!   sent one (depending on the table's replica identity), nil/`null` when it did not. INSERT
//!   and TRUNCATE events have no `old_columns` key.
//! * `last_in_tx` is true on the last change of its transaction that the bridge publishes
//!   (changes of tables left out by `--table` are not published); that message also carries
//!   the header [`LAST_IN_TX_HEADER`](crate::wire::names::LAST_IN_TX_HEADER)` = true`.
//! * `unchanged_toast` is always present: the columns left out of `columns` because their
//!   value is an unchanged TOASTed value the server did not send.
//! * `commit_time` is RFC 3339 in UTC with exactly six fractional digits. Years outside
//!   0001–9999 cannot be written in that form and are clamped to its first or last
//!   microsecond (PostgreSQL commit times come from the server clock, so this does not
//!   happen in practice).
//!
//! Values:
//!
//! | [`Value`]  | MessagePack                        | JSON                                       |
//! |------------|------------------------------------|--------------------------------------------|
//! | `Null`     | nil                                | `null`                                     |
//! | `Bool`     | bool                               | `true` / `false`                           |
//! | `Int`      | int (the smallest form; unsigned for values ≥ 0) | number                       |
//! | `Float`    | float 64 (also NaN, ±Infinity)     | number that reads back to the same `f64`, always with a `.` or an exponent (`1.0`, `1e-7`); `"NaN"`, `"Infinity"`, `"-Infinity"` as strings |
//! | `Text`     | str                                | string                                     |
//! | `Bytes`    | bin                                | standard base64 string with padding        |
//! | `Array`    | array of values                    | array of values                            |
//!
//! JSON strings escape `"`, `\` and the control characters U+0000–U+001F (as `\u00XX`); all
//! other characters are written as UTF-8.
//!
//! Encoding writes into a caller-owned buffer and allocates nothing else, so a reused buffer
//! stops allocating once it has grown to the size of the largest message.
//!
//! The field names are those of [`fields`](crate::wire::fields); the MessagePack keys and
//! JSON key texts written here are checked against them by the tests.
//!
//! [`debezium`] writes change events in Debezium's change-event envelope instead, and the
//! record keys Debezium writes.

mod chunk;
pub mod debezium;
mod json;
mod msgpack;
#[cfg(test)]
mod tests;

pub use chunk::{encode_chunk, take_chunk, ChunkHeader, ChunkRows, ColumnKeys};
pub use json::{json_f64, json_str, push_json_key, push_json_value};

use crate::config::Format;
use crate::pg::value::Value;
use crate::pg::Lsn;
use crate::wire::event::{ChangeEvent, Operation};
use crate::wire::text::{timestamp_ascii, TIMESTAMP_LEN};

/// The MIME type of a message in `format`, for a `Content-Type` header.
pub fn content_type(format: Format) -> &'static str {
    match format {
        Format::Msgpack => "application/msgpack",
        Format::Json => "application/json",
    }
}

/// Encodes `event` in `format` into `out`, replacing what `out` held.
///
/// Reusing one buffer for many events avoids allocating per event: only `out` may grow.
pub fn encode_change(format: Format, event: &ChangeEvent, out: &mut Vec<u8>) {
    encode_change_in(format, event, &mut CommitText::default(), out);
}

/// [`encode_change`] for an encoder of many events, which keeps the text their transaction
/// shares in `commit`.
pub fn encode_change_in(
    format: Format,
    event: &ChangeEvent,
    commit: &mut CommitText,
    out: &mut Vec<u8>,
) {
    out.clear();
    match format {
        Format::Msgpack => msgpack::msgpack_change(event, commit.of(event), out),
        Format::Json => json::json_change(event, commit.of(event), out),
    }
}

/// The `commit_lsn` and `commit_time` text of the last transaction encoded: written once per
/// transaction instead of once per change.
#[derive(Debug, Clone, Default)]
pub struct CommitText {
    /// The commit the text is for.
    of: Option<(Lsn, i64)>,
    lsn: [u8; Lsn::TEXT_MAX_LEN],
    lsn_len: usize,
    time: [u8; TIMESTAMP_LEN],
}

/// A change event's commit position and time as ASCII text.
struct CommitFields<'a> {
    lsn: &'a [u8],
    time: &'a [u8],
}

impl CommitText {
    fn of(&mut self, event: &ChangeEvent) -> CommitFields<'_> {
        let commit = (event.commit_lsn, event.commit_time);
        if self.of != Some(commit) {
            self.lsn_len = event.commit_lsn.ascii(&mut self.lsn).len();
            timestamp_ascii(event.commit_time, &mut self.time);
            self.of = Some(commit);
        }
        CommitFields {
            lsn: &self.lsn[..self.lsn_len],
            time: &self.time,
        }
    }
}

/// Appends one column value in `format` to `out` (the mapping in the [module docs](self)),
/// for messages that carry values outside a change event, such as snapshot rows.
pub fn push_value(format: Format, value: &Value, out: &mut Vec<u8>) {
    match format {
        Format::Msgpack => msgpack::msgpack_value(value, out),
        Format::Json => json::json_value(value, out),
    }
}

/// Encodes a small document (snapshot meta, table schema, request replies) given as JSON
/// in the wire format: JSON as it is, or the same structure in MessagePack.
pub fn encode_document(format: Format, doc: &serde_json::Value, out: &mut Vec<u8>) {
    out.clear();
    match format {
        Format::Json => msgpack::written(serde_json::to_writer(&mut *out, doc)),
        Format::Msgpack => msgpack::msgpack_document(doc, out),
    }
}

/// Whether the event has an `old_columns` key. An event that carries old values anyway
/// (whatever its operation) keeps them, so nothing it holds is lost.
fn has_old_columns(event: &ChangeEvent) -> bool {
    matches!(event.operation, Operation::Update | Operation::Delete) || event.old_columns.is_some()
}
