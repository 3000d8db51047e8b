//! Change events in the wire formats of DESIGN.md §4: MessagePack (the default) and JSON.
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
//!   the header [`LAST_IN_TX_HEADER`]` = true`.
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

use std::io::Write as _;

use crate::config::Format;
use crate::pg::value::Value;
use crate::pg::Lsn;
use crate::wire::event::{ChangeEvent, ColumnValue, Operation};

/// Header set to `true` on the message of the last published change of each transaction.
pub const LAST_IN_TX_HEADER: &str = "Pgbridge-Last-In-Tx";

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
    out.clear();
    match format {
        Format::Msgpack => msgpack_change(event, out),
        Format::Json => json_change(event, out),
    }
}

/// Appends one column value in `format` to `out` (the mapping in the [module docs](self)),
/// for messages that carry values outside a change event, such as snapshot rows.
pub fn push_value(format: Format, value: &Value, out: &mut Vec<u8>) {
    match format {
        Format::Msgpack => msgpack_value(value, out),
        Format::Json => json_value(value, out),
    }
}

/// Whether the event has an `old_columns` key. An event that carries old values anyway
/// (whatever its operation) keeps them, so nothing it holds is lost.
/// The rows of one snapshot chunk, encoded as they arrive so a chunk never exists twice in
/// memory: each row is a map `{column: value}`.
#[derive(Debug)]
pub struct ChunkRows {
    format: Format,
    buf: Vec<u8>,
    count: usize,
    /// Where the last row added begins in `buf` (after JSON's separating comma); `None` once
    /// it was moved out or the chunk cleared.
    last_start: Option<usize>,
}

impl ChunkRows {
    /// An empty chunk.
    pub fn new(format: Format) -> Self {
        ChunkRows {
            format,
            buf: Vec::with_capacity(64 * 1024),
            count: 0,
            last_start: None,
        }
    }

    /// Rows in the chunk.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when no row was added since the last [`ChunkRows::clear`].
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size of the rows so far.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Starts the next chunk.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.last_start = None;
    }

    /// Moves the row added last into `next` (emptied first), to start the next chunk with it
    /// when it would make this one too large. Does nothing when there is no such row.
    pub fn move_last_row(&mut self, next: &mut ChunkRows) {
        next.clear();
        let Some(start) = self.last_start.take() else {
            return;
        };
        next.buf.extend_from_slice(&self.buf[start..]);
        next.count = 1;
        next.last_start = Some(0);
        // In JSON the rows before it end with the comma that separated them.
        let end = if self.format == Format::Json && self.count > 1 {
            start - 1
        } else {
            start
        };
        self.buf.truncate(end);
        self.count -= 1;
    }

    /// Adds a row of `names.len()` columns; its encoded size.
    pub fn push_row<'v>(
        &mut self,
        names: &[std::sync::Arc<str>],
        values: impl IntoIterator<Item = &'v Value>,
    ) -> usize {
        let out = &mut self.buf;
        if self.format == Format::Json && self.count > 0 {
            out.push(b',');
        }
        let start = out.len();
        match self.format {
            Format::Msgpack => {
                written(rmp::encode::write_map_len(out, len32(names.len())));
                for (name, value) in names.iter().zip(values) {
                    mp_str(out, name);
                    msgpack_value(value, out);
                }
            }
            Format::Json => {
                out.push(b'{');
                for (i, (name, value)) in names.iter().zip(values).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    json_str(out, name);
                    out.push(b':');
                    json_value(value, out);
                }
                out.push(b'}');
            }
        }
        self.count += 1;
        self.last_start = Some(start);
        out.len() - start
    }
}

/// The fields of a snapshot chunk besides its rows.
#[derive(Debug, Clone)]
pub struct ChunkHeader<'a> {
    /// Table name.
    pub table: &'a str,
    /// Schema name.
    pub schema: &'a str,
    /// The snapshot's id.
    pub snapshot_id: &'a str,
    /// Chunk number, from 0.
    pub chunk: u64,
    /// The snapshot's consistent point.
    pub lsn: Lsn,
}

/// Encodes a snapshot chunk: `{table, schema, operation: "snapshot", snapshot_id, chunk, lsn,
/// data: [rows]}` (DESIGN §4).
pub fn encode_chunk(format: Format, header: &ChunkHeader<'_>, rows: &ChunkRows, out: &mut Vec<u8>) {
    out.clear();
    let mut lsn = [0; LSN_MAX_LEN];
    let lsn = lsn_text(header.lsn, &mut lsn);
    match format {
        Format::Msgpack => {
            written(rmp::encode::write_map_len(out, 7));
            mp_str(out, "table");
            mp_str(out, header.table);
            mp_str(out, "schema");
            mp_str(out, header.schema);
            mp_str(out, "operation");
            mp_str(out, "snapshot");
            mp_str(out, "snapshot_id");
            mp_str(out, header.snapshot_id);
            mp_str(out, "chunk");
            mp_uint(out, header.chunk);
            mp_str(out, "lsn");
            mp_str(out, lsn);
            mp_str(out, "data");
            written(rmp::encode::write_array_len(out, len32(rows.count)));
        }
        Format::Json => {
            out.extend_from_slice(b"{\"table\":");
            json_str(out, header.table);
            out.extend_from_slice(b",\"schema\":");
            json_str(out, header.schema);
            out.extend_from_slice(b",\"operation\":\"snapshot\",\"snapshot_id\":");
            json_str(out, header.snapshot_id);
            out.extend_from_slice(b",\"chunk\":");
            json_u64(out, header.chunk);
            out.extend_from_slice(b",\"lsn\":");
            json_str(out, lsn);
            out.extend_from_slice(b",\"data\":[");
        }
    }
    out.extend_from_slice(&rows.buf);
    if format == Format::Json {
        out.extend_from_slice(b"]}");
    }
}

/// Encodes a small document (snapshot meta, table schema, request replies) given as JSON
/// in the wire format: JSON as it is, or the same structure in MessagePack.
pub fn encode_document(format: Format, doc: &serde_json::Value, out: &mut Vec<u8>) {
    out.clear();
    match format {
        Format::Json => written(serde_json::to_writer(&mut *out, doc)),
        Format::Msgpack => msgpack_document(doc, out),
    }
}

fn msgpack_document(doc: &serde_json::Value, out: &mut Vec<u8>) {
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

fn has_old_columns(event: &ChangeEvent) -> bool {
    matches!(event.operation, Operation::Update | Operation::Delete) || event.old_columns.is_some()
}

// ---- Text of positions and times ----

/// Longest LSN text: `FFFFFFFF/FFFFFFFF`.
const LSN_MAX_LEN: usize = 17;

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// `lsn` as PostgreSQL prints it (the same text as its `Display`), without allocating.
fn lsn_text(lsn: Lsn, buf: &mut [u8; LSN_MAX_LEN]) -> &str {
    let mut n = push_hex32(buf, 0, (lsn.0 >> 32) as u32);
    buf[n] = b'/';
    n = push_hex32(buf, n + 1, lsn.0 as u32);
    std::str::from_utf8(&buf[..n]).expect("hex digits are ASCII")
}

/// Writes `v` in uppercase hex without leading zeros at `buf[at..]`; returns the end.
fn push_hex32(buf: &mut [u8], mut at: usize, v: u32) -> usize {
    let digits = (32 - v.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        buf[at] = HEX_UPPER[((v >> (4 * i)) & 0xF) as usize];
        at += 1;
    }
    at
}

/// Length of a timestamp as [`format_timestamp`] writes it: `2025-12-10T10:30:00.123456Z`.
pub const TIMESTAMP_LEN: usize = 27;

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Days from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_DAY: i64 = days_from_civil(2000, 1, 1);

/// First microsecond of 0001-01-01, in µs since 2000-01-01.
const MIN_MICROS: i64 = (days_from_civil(1, 1, 1) - PG_EPOCH_DAY) * MICROS_PER_DAY;

/// Last microsecond of 9999-12-31, in µs since 2000-01-01.
const MAX_MICROS: i64 = (days_from_civil(10_000, 1, 1) - PG_EPOCH_DAY) * MICROS_PER_DAY - 1;

/// The current time as [`format_timestamp`] writes it (snapshot metas, schema documents).
pub fn now_timestamp() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let mut buf = [0u8; TIMESTAMP_LEN];
    format_timestamp(crate::pg::pgoutput::unix_to_pg_micros(micros), &mut buf).to_string()
}

/// A PostgreSQL timestamp (µs since 2000-01-01 UTC) as RFC 3339 UTC text with microseconds,
/// e.g. `2025-12-10T10:30:00.123456Z`, written into `buf` without allocating.
///
/// Times before 0001-01-01 or after 9999-12-31 are clamped to the first or last microsecond of
/// that range, which is all a four-digit year can express.
pub fn format_timestamp(micros: i64, buf: &mut [u8; TIMESTAMP_LEN]) -> &str {
    let micros = micros.clamp(MIN_MICROS, MAX_MICROS);
    let days = micros.div_euclid(MICROS_PER_DAY);
    let of_day = micros.rem_euclid(MICROS_PER_DAY);
    let (year, month, day) = civil_from_days(days + PG_EPOCH_DAY);
    let secs = of_day / 1_000_000;

    *buf = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut buf[0..4], year as u64);
    put_digits(&mut buf[5..7], u64::from(month));
    put_digits(&mut buf[8..10], u64::from(day));
    put_digits(&mut buf[11..13], (secs / 3600) as u64);
    put_digits(&mut buf[14..16], (secs / 60 % 60) as u64);
    put_digits(&mut buf[17..19], (secs % 60) as u64);
    put_digits(&mut buf[20..26], (of_day % 1_000_000) as u64);
    std::str::from_utf8(buf).expect("digits and separators are ASCII")
}

/// Fills `dst` with the low `dst.len()` decimal digits of `v`, zero-padded.
fn put_digits(dst: &mut [u8], mut v: u64) {
    for d in dst.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
const fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    // Count from 0000-03-01 so the leap day is the last day of the (shifted) year.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let mp = if month > 2 { month - 3 } else { month + 9 } as i64; // March = 0
    let doy = (153 * mp + 2) / 5 + day as i64 - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
const fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    (year, month, day)
}

// ---- MessagePack ----

/// Discards the result of an `rmp` write: writing into a `Vec` cannot fail (it grows, or the
/// process aborts on out-of-memory).
#[inline(always)]
fn written<T, E>(r: Result<T, E>) {
    debug_assert!(r.is_ok(), "writing into a Vec failed");
}

/// A collection length as MessagePack's 32-bit length.
///
/// Rows have at most 1664 columns and PostgreSQL values at most 1 GB, so this cannot fail
/// for anything the server sends.
fn len32(len: usize) -> u32 {
    u32::try_from(len).expect("collection longer than MessagePack allows")
}

fn mp_str(out: &mut Vec<u8>, s: &str) {
    written(rmp::encode::write_str(out, s));
}

fn mp_uint(out: &mut Vec<u8>, v: u64) {
    written(rmp::encode::write_uint(out, v));
}

/// The map keys as MessagePack fixstr (`0xa0 | length`, then the bytes), written with one
/// copy each: every message carries 13 of them plus 2 per column.
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

fn msgpack_change(event: &ChangeEvent, out: &mut Vec<u8>) {
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
    let mut lsn = [0; LSN_MAX_LEN];
    out.extend_from_slice(K_LSN);
    mp_str(out, lsn_text(event.lsn, &mut lsn));
    out.extend_from_slice(K_COMMIT_LSN);
    mp_str(out, lsn_text(event.commit_lsn, &mut lsn));
    out.extend_from_slice(K_XID);
    mp_uint(out, u64::from(event.xid));
    let mut time = [0; TIMESTAMP_LEN];
    out.extend_from_slice(K_COMMIT_TIME);
    mp_str(out, format_timestamp(event.commit_time, &mut time));
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

fn msgpack_value(value: &Value, out: &mut Vec<u8>) {
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

// ---- JSON ----

fn json_change(event: &ChangeEvent, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"table\":");
    json_str(out, &event.table.table);
    out.extend_from_slice(b",\"schema\":");
    json_str(out, &event.table.schema);
    out.extend_from_slice(b",\"operation\":");
    json_str(out, event.operation.as_upper());
    out.extend_from_slice(b",\"relation_id\":");
    json_u64(out, u64::from(event.table.relation_id));
    let mut lsn = [0; LSN_MAX_LEN];
    out.extend_from_slice(b",\"lsn\":");
    json_str(out, lsn_text(event.lsn, &mut lsn));
    out.extend_from_slice(b",\"commit_lsn\":");
    json_str(out, lsn_text(event.commit_lsn, &mut lsn));
    out.extend_from_slice(b",\"xid\":");
    json_u64(out, u64::from(event.xid));
    let mut time = [0; TIMESTAMP_LEN];
    out.extend_from_slice(b",\"commit_time\":");
    json_str(out, format_timestamp(event.commit_time, &mut time));
    out.extend_from_slice(b",\"seq\":");
    json_u64(out, u64::from(event.seq));
    out.extend_from_slice(if event.last_in_tx {
        b",\"last_in_tx\":true"
    } else {
        b",\"last_in_tx\":false"
    });
    out.extend_from_slice(b",\"columns\":");
    json_columns(&event.columns, out);
    if has_old_columns(event) {
        out.extend_from_slice(b",\"old_columns\":");
        match &event.old_columns {
            Some(columns) => json_columns(columns, out),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.extend_from_slice(b",\"unchanged_toast\":[");
    for (i, name) in event.unchanged_toast.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(out, name);
    }
    out.extend_from_slice(b"]}");
}

fn json_columns(columns: &[ColumnValue], out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, column) in columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"name\":");
        json_str(out, &column.name);
        out.extend_from_slice(b",\"value\":");
        json_value(&column.value, out);
        out.push(b'}');
    }
    out.push(b']');
}

fn json_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int(n) => {
            if *n < 0 {
                out.push(b'-');
            }
            json_u64(out, n.unsigned_abs());
        }
        Value::Float(x) => json_f64(out, *x),
        Value::Text(s) => json_str(out, s),
        Value::Bytes(b) => {
            out.push(b'"');
            push_base64(out, b);
            out.push(b'"');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_value(item, out);
            }
            out.push(b']');
        }
    }
}

fn json_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(decimal(v, &mut [0u8; 20]).as_bytes());
}

/// `v` in decimal, written into `buf` (20 bytes hold any `u64`); the hot paths (message ids,
/// reply subjects, JSON numbers) use it instead of `format!`, which costs several times more.
pub fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[at..]).unwrap_or_default()
}

pub(crate) fn json_f64(out: &mut Vec<u8>, x: f64) {
    if x.is_nan() {
        out.extend_from_slice(b"\"NaN\"");
    } else if x.is_infinite() {
        out.extend_from_slice(if x > 0.0 {
            b"\"Infinity\""
        } else {
            b"\"-Infinity\""
        });
    } else {
        // `Debug` is the shortest text that reads back to the same f64, like `Display`, but
        // switches to an exponent for very large and small magnitudes (`1e300`, not 301
        // digits) and keeps `.0` on integral values, so a float column stays a float in
        // consumers that distinguish `1` from `1.0`. Both forms are JSON numbers.
        written(write!(out, "{x:?}"));
    }
}

/// Appends `s` as a JSON string.
pub(crate) fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Copy runs that need no escaping in one go; multi-byte UTF-8 never needs escaping.
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b < 0x20 || b == b'"' || b == b'\\' {
            out.extend_from_slice(&bytes[start..i]);
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                _ => out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX_UPPER[usize::from(b >> 4)],
                    HEX_UPPER[usize::from(b & 0xF)],
                ]),
            }
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Appends `data` in standard base64 (RFC 4648 §4) with padding.
pub(crate) fn push_base64(out: &mut Vec<u8>, data: &[u8]) {
    let sym = |n: u32, shift: u32| BASE64[((n >> shift) & 63) as usize];
    out.reserve(data.len().div_ceil(3) * 4);
    let mut chunks = data.chunks_exact(3);
    for c in &mut chunks {
        let n = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
        out.extend_from_slice(&[sym(n, 18), sym(n, 12), sym(n, 6), sym(n, 0)]);
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[sym(n, 18), sym(n, 12), b'=', b'=']);
        }
        [a, b] => {
            let n = u32::from(a) << 16 | u32::from(b) << 8;
            out.extend_from_slice(&[sym(n, 18), sym(n, 12), sym(n, 6), b'=']);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;
    use std::sync::Arc;

    use proptest::prelude::*;
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

    use super::*;

    #[test]
    fn msgpack_keys_are_their_fixstr_encoding() {
        for (key, bytes) in [
            ("table", K_TABLE),
            ("schema", K_SCHEMA),
            ("operation", K_OPERATION),
            ("relation_id", K_RELATION_ID),
            ("lsn", K_LSN),
            ("commit_lsn", K_COMMIT_LSN),
            ("xid", K_XID),
            ("commit_time", K_COMMIT_TIME),
            ("seq", K_SEQ),
            ("last_in_tx", K_LAST_IN_TX),
            ("columns", K_COLUMNS),
            ("old_columns", K_OLD_COLUMNS),
            ("unchanged_toast", K_UNCHANGED_TOAST),
            ("name", K_NAME),
            ("value", K_VALUE),
        ] {
            let mut v = Vec::new();
            rmp::encode::write_str(&mut v, key).unwrap();
            assert_eq!(v, bytes, "{key}");
        }
    }
    use crate::wire::event::TableRef;

    #[test]
    fn snapshot_chunks_in_both_formats() {
        let names: Vec<Arc<str>> = vec![Arc::from("id"), Arc::from("b")];
        let header = ChunkHeader {
            table: "users",
            schema: "public",
            snapshot_id: "s1",
            chunk: 3,
            lsn: Lsn(0x1_0000_00A0),
        };
        for format in [Format::Msgpack, Format::Json] {
            let mut rows = ChunkRows::new(format);
            rows.push_row(&names, &[Value::Int(1), Value::Bytes(vec![0, 1])]);
            rows.push_row(&names, &[Value::Int(-2), Value::Null]);
            assert_eq!(rows.len(), 2);
            let mut out = Vec::new();
            encode_chunk(format, &header, &rows, &mut out);
            let v: serde_json::Value = match format {
                Format::Json => serde_json::from_slice(&out).unwrap(),
                Format::Msgpack => {
                    let mp = rmpv::decode::read_value(&mut out.as_slice()).unwrap();
                    let m = mp.as_map().unwrap();
                    let keys: Vec<&str> = m.iter().map(|(k, _)| k.as_str().unwrap()).collect();
                    assert_eq!(
                        keys,
                        [
                            "table",
                            "schema",
                            "operation",
                            "snapshot_id",
                            "chunk",
                            "lsn",
                            "data"
                        ]
                    );
                    let data = m[6].1.as_array().unwrap();
                    assert_eq!(
                        data[0].as_map().unwrap()[1].1,
                        rmpv::Value::Binary(vec![0, 1])
                    );
                    serde_json::json!({
                        "table": m[0].1.as_str(), "schema": m[1].1.as_str(), "operation": m[2].1.as_str(),
                        "snapshot_id": m[3].1.as_str(), "chunk": m[4].1.as_u64(), "lsn": m[5].1.as_str(),
                        "data": [{"id": data[0].as_map().unwrap()[0].1.as_i64(), "b": "AAE="},
                                 {"id": data[1].as_map().unwrap()[0].1.as_i64(), "b": null}],
                    })
                }
            };
            assert_eq!(
                v,
                serde_json::json!({"table": "users", "schema": "public", "operation": "snapshot",
                    "snapshot_id": "s1", "chunk": 3, "lsn": "1/A0",
                    "data": [{"id": 1, "b": "AAE="}, {"id": -2, "b": null}]})
            );
            rows.clear();
            assert!(rows.is_empty());
        }
    }

    #[test]
    fn the_last_row_moves_to_the_next_chunk_intact() {
        let names: Vec<Arc<str>> = vec![Arc::from("id")];
        let header = |chunk| ChunkHeader {
            table: "t",
            schema: "public",
            snapshot_id: "s",
            chunk,
            lsn: Lsn(1),
        };
        let ids = |format, rows: &ChunkRows| -> Vec<i64> {
            let mut out = Vec::new();
            encode_chunk(format, &header(0), rows, &mut out);
            let v: serde_json::Value = match format {
                Format::Json => serde_json::from_slice(&out).unwrap(),
                Format::Msgpack => {
                    let mp = rmpv::decode::read_value(&mut out.as_slice()).unwrap();
                    let data = mp.as_map().unwrap()[6].1.as_array().unwrap().clone();
                    serde_json::json!({"data": data.iter()
                        .map(|r| serde_json::json!({"id": r.as_map().unwrap()[0].1.as_i64()}))
                        .collect::<Vec<_>>()})
                }
            };
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_i64().unwrap())
                .collect()
        };
        for format in [Format::Msgpack, Format::Json] {
            let mut rows = ChunkRows::new(format);
            let mut next = ChunkRows::new(format);
            let first = rows.push_row(&names, &[Value::Int(1)]);
            let size = rows.push_row(&names, &[Value::Int(22)]);
            assert!(size > 0 && first > 0);
            rows.push_row(&names, &[Value::Int(333)]);
            rows.move_last_row(&mut next);
            assert_eq!((rows.len(), next.len()), (2, 1));
            assert_eq!(ids(format, &rows), [1, 22], "{format:?}");
            assert_eq!(ids(format, &next), [333], "{format:?}");
            // Only the row added last can move; the next chunk goes on after it.
            rows.move_last_row(&mut next);
            assert_eq!(next.len(), 0);
            assert_eq!(ids(format, &rows), [1, 22]);
            rows.clear();
            rows.push_row(&names, &[Value::Int(4)]);
            rows.move_last_row(&mut next);
            assert!(rows.is_empty());
            next.push_row(&names, &[Value::Int(5)]);
            assert_eq!(ids(format, &next), [4, 5], "{format:?}");
        }
    }

    #[test]
    fn documents_in_both_formats() {
        let doc = serde_json::json!({"a": [1, -2, 1.5, null, true], "b": "x"});
        let mut out = Vec::new();
        encode_document(Format::Json, &doc, &mut out);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            doc
        );
        encode_document(Format::Msgpack, &doc, &mut out);
        let mp = rmpv::decode::read_value(&mut out.as_slice()).unwrap();
        assert_eq!(mp.as_map().unwrap()[1].1.as_str(), Some("x"));
        assert_eq!(
            mp.as_map().unwrap()[0].1.as_array().unwrap()[1].as_i64(),
            Some(-2)
        );
    }

    // ---- An independent model of a decoded message ----

    /// A decoded message: what a consumer sees, with map keys in wire order and floats as
    /// bits so NaN compares equal to itself.
    #[derive(Debug, Clone, PartialEq)]
    enum M {
        Nil,
        Bool(bool),
        Int(i128),
        Float(u64),
        Str(String),
        Bin(Vec<u8>),
        Arr(Vec<M>),
        Map(Vec<(String, M)>),
    }

    fn s(x: &str) -> M {
        M::Str(x.to_owned())
    }

    fn decode_msgpack(bytes: &[u8]) -> M {
        let mut rd = bytes;
        let v = rmpv::decode::read_value(&mut rd).expect("valid MessagePack");
        assert!(rd.is_empty(), "{} trailing bytes", rd.len());
        from_rmpv(v)
    }

    fn from_rmpv(v: rmpv::Value) -> M {
        use rmpv::Value as V;
        match v {
            V::Nil => M::Nil,
            V::Boolean(b) => M::Bool(b),
            V::Integer(i) => M::Int(
                i.as_i64()
                    .map(i128::from)
                    .or(i.as_u64().map(i128::from))
                    .unwrap(),
            ),
            V::F64(x) => M::Float(x.to_bits()),
            V::String(s) => M::Str(s.into_str().expect("valid UTF-8 str")),
            V::Binary(b) => M::Bin(b),
            V::Array(items) => M::Arr(items.into_iter().map(from_rmpv).collect()),
            V::Map(entries) => M::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.as_str().expect("string key").to_owned(), from_rmpv(v)))
                    .collect(),
            ),
            other => panic!("unexpected MessagePack value {other:?}"),
        }
    }

    /// JSON read by serde_json into the model, keeping key order (serde_json::Value sorts
    /// keys). Duplicate keys show up as such.
    struct Ordered(M);

    impl<'de> Deserialize<'de> for Ordered {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(OrderedVisitor)
        }
    }

    struct OrderedVisitor;

    impl<'de> Visitor<'de> for OrderedVisitor {
        type Value = Ordered;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_unit<E>(self) -> Result<Ordered, E> {
            Ok(Ordered(M::Nil))
        }
        fn visit_bool<E>(self, v: bool) -> Result<Ordered, E> {
            Ok(Ordered(M::Bool(v)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Ordered, E> {
            Ok(Ordered(M::Int(v.into())))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Ordered, E> {
            Ok(Ordered(M::Int(v.into())))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Ordered, E> {
            Ok(Ordered(M::Float(v.to_bits())))
        }
        fn visit_str<E>(self, v: &str) -> Result<Ordered, E> {
            Ok(Ordered(s(v)))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ordered, A::Error> {
            let mut items = Vec::new();
            while let Some(Ordered(item)) = seq.next_element()? {
                items.push(item);
            }
            Ok(Ordered(M::Arr(items)))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
            let mut entries = Vec::new();
            while let Some((k, Ordered(v))) = map.next_entry::<String, Ordered>()? {
                entries.push((k, v));
            }
            Ok(Ordered(M::Map(entries)))
        }
    }

    fn decode_json(bytes: &[u8]) -> M {
        serde_json::from_slice::<serde_json::Value>(bytes)
            .unwrap_or_else(|e| panic!("invalid JSON ({e}): {}", String::from_utf8_lossy(bytes)));
        serde_json::from_slice::<Ordered>(bytes).unwrap().0
    }

    /// Standard base64 written bit by bit, unlike the chunked encoder under test.
    fn base64_reference(data: &[u8]) -> String {
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let bits: Vec<u8> = data
            .iter()
            .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
            .collect();
        let mut out: String = bits
            .chunks(6)
            .map(|c| {
                let v = (0..6).fold(0, |acc, i| acc << 1 | c.get(i).copied().unwrap_or(0));
                alphabet.as_bytes()[usize::from(v)] as char
            })
            .collect();
        while !out.len().is_multiple_of(4) {
            out.push('=');
        }
        out
    }

    /// What a consumer should decode from `event` (DESIGN.md §4), built straight from the
    /// event without the encoder.
    fn expected(event: &ChangeEvent, json: bool) -> M {
        let columns = |cols: &[ColumnValue]| {
            M::Arr(
                cols.iter()
                    .map(|c| {
                        M::Map(vec![
                            ("name".into(), s(&c.name)),
                            ("value".into(), expected_value(&c.value, json)),
                        ])
                    })
                    .collect(),
            )
        };
        let mut time = [0; TIMESTAMP_LEN];
        let mut m = vec![
            ("table", s(&event.table.table)),
            ("schema", s(&event.table.schema)),
            ("operation", s(event.operation.as_upper())),
            ("relation_id", M::Int(event.table.relation_id.into())),
            ("lsn", s(&event.lsn.to_string())),
            ("commit_lsn", s(&event.commit_lsn.to_string())),
            ("xid", M::Int(event.xid.into())),
            (
                "commit_time",
                s(format_timestamp(event.commit_time, &mut time)),
            ),
            ("seq", M::Int(event.seq.into())),
            ("last_in_tx", M::Bool(event.last_in_tx)),
            ("columns", columns(&event.columns)),
        ];
        if matches!(event.operation, Operation::Update | Operation::Delete)
            || event.old_columns.is_some()
        {
            let old = event.old_columns.as_deref().map_or(M::Nil, columns);
            m.push(("old_columns", old));
        }
        m.push((
            "unchanged_toast",
            M::Arr(event.unchanged_toast.iter().map(|n| s(n)).collect()),
        ));
        M::Map(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    fn expected_value(v: &Value, json: bool) -> M {
        match v {
            Value::Null => M::Nil,
            Value::Bool(b) => M::Bool(*b),
            Value::Int(n) => M::Int((*n).into()),
            Value::Float(x) if json && x.is_nan() => s("NaN"),
            Value::Float(x) if json && x.is_infinite() => {
                s(if *x > 0.0 { "Infinity" } else { "-Infinity" })
            }
            Value::Float(x) => M::Float(x.to_bits()),
            Value::Text(t) => s(t),
            Value::Bytes(b) if json => M::Str(base64_reference(b)),
            Value::Bytes(b) => M::Bin(b.clone()),
            Value::Array(items) => M::Arr(items.iter().map(|i| expected_value(i, json)).collect()),
        }
    }

    fn encode(format: Format, event: &ChangeEvent) -> Vec<u8> {
        let mut out = Vec::new();
        encode_change(format, event, &mut out);
        out
    }

    /// Field `key` of a decoded map.
    fn field<'a>(m: &'a M, key: &str) -> &'a M {
        let M::Map(entries) = m else {
            panic!("not a map: {m:?}")
        };
        &entries.iter().find(|(k, _)| k == key).unwrap().1
    }

    fn keys(m: &M) -> Vec<&str> {
        let M::Map(entries) = m else {
            panic!("not a map: {m:?}")
        };
        entries.iter().map(|(k, _)| k.as_str()).collect()
    }

    // ---- Sample events ----

    fn col(name: &str, value: Value) -> ColumnValue {
        ColumnValue {
            name: Arc::from(name),
            value,
        }
    }

    fn table(schema: &str, name: &str, relation_id: u32) -> Arc<TableRef> {
        Arc::new(TableRef {
            schema: Arc::from(schema),
            table: Arc::from(name),
            relation_id,
        })
    }

    /// 2025-12-10T10:30:00.123456Z in µs since 2000-01-01.
    const SAMPLE_TIME: i64 = 818_677_800_123_456;

    const UNICODE: &str = "héllo ✓ 😀 \"q\" back\\slash\n\t\u{1}\u{1f}\u{7f}\u{2028}";

    fn insert_every_kind() -> ChangeEvent {
        ChangeEvent {
            table: table("public", "users", 16384),
            operation: Operation::Insert,
            lsn: Lsn(0x025C_B3C8),
            commit_lsn: Lsn(0x025C_B5E8),
            timeline: 1,
            xid: 742,
            commit_time: SAMPLE_TIME,
            seq: 0,
            last_in_tx: false,
            columns: vec![
                col("id", Value::Int(1)),
                col("big", Value::Int(i64::MAX)),
                col("small", Value::Int(i64::MIN)),
                col("neg", Value::Int(-1)),
                col("f", Value::Float(1.5)),
                col("integral", Value::Float(3.0)),
                col("tiny", Value::Float(5e-324)),
                col("huge", Value::Float(f64::MAX)),
                col("negzero", Value::Float(-0.0)),
                col("nan", Value::Float(f64::NAN)),
                col("pinf", Value::Float(f64::INFINITY)),
                col("ninf", Value::Float(f64::NEG_INFINITY)),
                col("yes", Value::Bool(true)),
                col("no", Value::Bool(false)),
                col("bytes", Value::Bytes(vec![0, 1, 0, 0xff, 0])),
                col("nobytes", Value::Bytes(vec![])),
                col("text", Value::Text(UNICODE.to_owned())),
                col("empty", Value::Text(String::new())),
                col("null", Value::Null),
                col("none", Value::Array(vec![])),
                col(
                    "ints",
                    Value::Array(vec![Value::Int(1), Value::Null, Value::Int(-3)]),
                ),
                col(
                    "floats",
                    Value::Array(vec![Value::Float(f64::NAN), Value::Float(-0.5)]),
                ),
                col(
                    "texts",
                    Value::Array(vec![Value::Text("a,b".into()), Value::Null]),
                ),
                col(
                    "blobs",
                    Value::Array(vec![Value::Bytes(vec![0]), Value::Null]),
                ),
                col("名前", Value::Text("値".into())),
            ],
            old_columns: None,
            unchanged_toast: vec![],
        }
    }

    fn update_with_old() -> ChangeEvent {
        ChangeEvent {
            table: table("sales", "invoices", 16500),
            operation: Operation::Update,
            lsn: Lsn(0x1_0000_0000),
            commit_lsn: Lsn(u64::MAX),
            timeline: 1,
            xid: u32::MAX,
            commit_time: -1,
            seq: u32::MAX,
            last_in_tx: true,
            columns: vec![col("id", Value::Int(7)), col("total", Value::Float(9.99))],
            old_columns: Some(vec![col("id", Value::Int(6))]),
            unchanged_toast: vec![Arc::from("body"), Arc::from("attachments")],
        }
    }

    fn update_without_old() -> ChangeEvent {
        ChangeEvent {
            old_columns: None,
            unchanged_toast: vec![],
            ..update_with_old()
        }
    }

    fn delete() -> ChangeEvent {
        ChangeEvent {
            table: table("public", "users", 16384),
            operation: Operation::Delete,
            lsn: Lsn(0),
            commit_lsn: Lsn(0x0_0000_00F0),
            timeline: 1,
            xid: 0,
            commit_time: 0,
            seq: 3,
            last_in_tx: false,
            columns: vec![col("id", Value::Int(1))],
            old_columns: None,
            unchanged_toast: vec![],
        }
    }

    fn truncate() -> ChangeEvent {
        ChangeEvent {
            table: table("public", "users", 16384),
            operation: Operation::Truncate,
            lsn: Lsn(0x016B_3748),
            commit_lsn: Lsn(0x016B_3748),
            timeline: 1,
            xid: 1,
            commit_time: SAMPLE_TIME,
            seq: 0,
            last_in_tx: true,
            columns: vec![],
            old_columns: None,
            unchanged_toast: vec![],
        }
    }

    fn samples() -> Vec<ChangeEvent> {
        vec![
            insert_every_kind(),
            update_with_old(),
            update_without_old(),
            delete(),
            truncate(),
        ]
    }

    const ALL_KEYS: [&str; 13] = [
        "table",
        "schema",
        "operation",
        "relation_id",
        "lsn",
        "commit_lsn",
        "xid",
        "commit_time",
        "seq",
        "last_in_tx",
        "columns",
        "old_columns",
        "unchanged_toast",
    ];

    // ---- Sample tests ----

    #[test]
    fn samples_decode_to_the_contract() {
        for event in samples() {
            let msgpack = decode_msgpack(&encode(Format::Msgpack, &event));
            assert_eq!(msgpack, expected(&event, false), "{event:?}");
            let json = decode_json(&encode(Format::Json, &event));
            assert_eq!(json, expected(&event, true), "{event:?}");
        }
    }

    #[test]
    fn insert_fields_and_values() {
        let event = insert_every_kind();
        let m = decode_msgpack(&encode(Format::Msgpack, &event));
        let j = decode_json(&encode(Format::Json, &event));
        let without_old: Vec<&str> = ALL_KEYS
            .iter()
            .copied()
            .filter(|&k| k != "old_columns")
            .collect();
        assert_eq!(keys(&m), without_old);
        assert_eq!(keys(&j), without_old);

        for d in [&m, &j] {
            assert_eq!(field(d, "table"), &s("users"));
            assert_eq!(field(d, "schema"), &s("public"));
            assert_eq!(field(d, "operation"), &s("INSERT"));
            assert_eq!(field(d, "relation_id"), &M::Int(16384));
            assert_eq!(field(d, "lsn"), &s("0/25CB3C8"));
            assert_eq!(field(d, "commit_lsn"), &s("0/25CB5E8"));
            assert_eq!(field(d, "xid"), &M::Int(742));
            assert_eq!(field(d, "commit_time"), &s("2025-12-10T10:30:00.123456Z"));
            assert_eq!(field(d, "seq"), &M::Int(0));
            assert_eq!(field(d, "unchanged_toast"), &M::Arr(vec![]));
        }

        let values = |d: &M| -> Vec<(String, M)> {
            let M::Arr(cols) = field(d, "columns") else {
                panic!()
            };
            cols.iter()
                .map(|c| {
                    assert_eq!(keys(c), ["name", "value"]);
                    let M::Str(name) = field(c, "name") else {
                        panic!()
                    };
                    (name.clone(), field(c, "value").clone())
                })
                .collect()
        };
        let f = |x: f64| M::Float(x.to_bits());
        let common = [
            ("id", M::Int(1)),
            ("big", M::Int(i64::MAX.into())),
            ("small", M::Int(i64::MIN.into())),
            ("neg", M::Int(-1)),
            ("f", f(1.5)),
            ("integral", f(3.0)),
            ("tiny", f(5e-324)),
            ("huge", f(f64::MAX)),
            ("negzero", f(-0.0)),
            ("yes", M::Bool(true)),
            ("no", M::Bool(false)),
            ("text", s(UNICODE)),
            ("empty", s("")),
            ("null", M::Nil),
            ("none", M::Arr(vec![])),
            ("ints", M::Arr(vec![M::Int(1), M::Nil, M::Int(-3)])),
            ("texts", M::Arr(vec![s("a,b"), M::Nil])),
            ("名前", s("値")),
        ];
        let msgpack_only = [
            ("nan", f(f64::NAN)),
            ("pinf", f(f64::INFINITY)),
            ("ninf", f(f64::NEG_INFINITY)),
            ("bytes", M::Bin(vec![0, 1, 0, 0xff, 0])),
            ("nobytes", M::Bin(vec![])),
            ("floats", M::Arr(vec![f(f64::NAN), f(-0.5)])),
            ("blobs", M::Arr(vec![M::Bin(vec![0]), M::Nil])),
        ];
        let json_only = [
            ("nan", s("NaN")),
            ("pinf", s("Infinity")),
            ("ninf", s("-Infinity")),
            ("bytes", s("AAEA/wA=")),
            ("nobytes", s("")),
            ("floats", M::Arr(vec![s("NaN"), f(-0.5)])),
            ("blobs", M::Arr(vec![s("AA=="), M::Nil])),
        ];
        for (d, specific) in [(&m, msgpack_only), (&j, json_only)] {
            let got = values(d);
            assert_eq!(got.len(), common.len() + specific.len());
            for (name, want) in common.iter().chain(&specific) {
                let value = &got.iter().find(|(n, _)| n == name).unwrap().1;
                assert_eq!(value, want, "column {name}");
            }
        }
        // Column order is the event's.
        let names: Vec<String> = values(&m).into_iter().map(|(n, _)| n).collect();
        let want: Vec<String> = event.columns.iter().map(|c| c.name.to_string()).collect();
        assert_eq!(names, want);
    }

    #[test]
    fn update_carries_old_columns_and_unchanged_toast() {
        let event = update_with_old();
        for d in [
            decode_msgpack(&encode(Format::Msgpack, &event)),
            decode_json(&encode(Format::Json, &event)),
        ] {
            assert_eq!(keys(&d), ALL_KEYS);
            assert_eq!(field(&d, "schema"), &s("sales"));
            assert_eq!(field(&d, "table"), &s("invoices"));
            assert_eq!(field(&d, "operation"), &s("UPDATE"));
            assert_eq!(field(&d, "lsn"), &s("1/0"));
            assert_eq!(field(&d, "commit_lsn"), &s("FFFFFFFF/FFFFFFFF"));
            assert_eq!(field(&d, "xid"), &M::Int(u32::MAX.into()));
            assert_eq!(field(&d, "seq"), &M::Int(u32::MAX.into()));
            assert_eq!(field(&d, "commit_time"), &s("1999-12-31T23:59:59.999999Z"));
            assert_eq!(
                field(&d, "old_columns"),
                &M::Arr(vec![M::Map(vec![
                    ("name".into(), s("id")),
                    ("value".into(), M::Int(6)),
                ])])
            );
            assert_eq!(
                field(&d, "unchanged_toast"),
                &M::Arr(vec![s("body"), s("attachments")])
            );
        }
    }

    #[test]
    fn update_and_delete_without_old_columns_have_nil() {
        for event in [update_without_old(), delete()] {
            for d in [
                decode_msgpack(&encode(Format::Msgpack, &event)),
                decode_json(&encode(Format::Json, &event)),
            ] {
                assert_eq!(keys(&d), ALL_KEYS);
                assert_eq!(field(&d, "old_columns"), &M::Nil);
            }
        }
        let d = decode_json(&encode(Format::Json, &delete()));
        assert_eq!(field(&d, "operation"), &s("DELETE"));
        assert_eq!(field(&d, "lsn"), &s("0/0"));
        assert_eq!(field(&d, "commit_lsn"), &s("0/F0"));
        assert_eq!(field(&d, "commit_time"), &s("2000-01-01T00:00:00.000000Z"));
    }

    #[test]
    fn truncate_has_empty_columns_and_no_old_columns() {
        let event = truncate();
        for d in [
            decode_msgpack(&encode(Format::Msgpack, &event)),
            decode_json(&encode(Format::Json, &event)),
        ] {
            assert!(!keys(&d).contains(&"old_columns"));
            assert_eq!(field(&d, "operation"), &s("TRUNCATE"));
            assert_eq!(field(&d, "columns"), &M::Arr(vec![]));
            assert_eq!(field(&d, "unchanged_toast"), &M::Arr(vec![]));
        }
    }

    #[test]
    fn json_text_is_exact() {
        let event = ChangeEvent {
            columns: vec![
                col("id", Value::Int(-42)),
                col("f", Value::Float(1.0)),
                col("e", Value::Float(1e-7)),
                col("n", Value::Float(f64::NEG_INFINITY)),
                col("b", Value::Bytes(b"foobar".to_vec())),
                col("t", Value::Text("a\"b\\c\n\u{0}é".into())),
                col("a", Value::Array(vec![Value::Bool(true), Value::Null])),
            ],
            old_columns: Some(vec![]),
            unchanged_toast: vec![Arc::from("x")],
            operation: Operation::Update,
            ..insert_every_kind()
        };
        let text = String::from_utf8(encode(Format::Json, &event)).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"table":"users","schema":"public","operation":"UPDATE","relation_id":16384,"#,
                r#""lsn":"0/25CB3C8","commit_lsn":"0/25CB5E8","xid":742,"#,
                r#""commit_time":"2025-12-10T10:30:00.123456Z","seq":0,"last_in_tx":false,"columns":["#,
                r#"{"name":"id","value":-42},{"name":"f","value":1.0},"#,
                r#"{"name":"e","value":1e-7},{"name":"n","value":"-Infinity"},"#,
                r#"{"name":"b","value":"Zm9vYmFy"},"#,
                r#"{"name":"t","value":"a\"b\\c\u000A\u0000é"},"#,
                r#"{"name":"a","value":[true,null]}],"#,
                r#""old_columns":[],"unchanged_toast":["x"]}"#
            )
        );
    }

    #[test]
    fn msgpack_bytes_of_small_values() {
        let cases: [(Value, &[u8]); 12] = [
            (Value::Null, &[0xc0]),
            (Value::Bool(true), &[0xc3]),
            (Value::Int(0), &[0x00]),
            (Value::Int(127), &[0x7f]),
            (Value::Int(200), &[0xcc, 0xc8]),
            (Value::Int(-1), &[0xff]),
            (Value::Int(-33), &[0xd0, 0xdf]),
            (
                Value::Int(i64::MAX),
                &[0xcf, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
            (Value::Int(i64::MIN), &[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            (
                Value::Float(f64::NAN),
                &[0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0],
            ),
            (Value::Bytes(vec![0, 1]), &[0xc4, 0x02, 0x00, 0x01]),
            (
                Value::Array(vec![Value::Text("é".into()), Value::Null]),
                &[0x92, 0xa2, 0xc3, 0xa9, 0xc0],
            ),
        ];
        for (value, want) in cases {
            let mut out = Vec::new();
            push_value(Format::Msgpack, &value, &mut out);
            assert_eq!(out, want, "{value:?}");
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type(Format::Msgpack), "application/msgpack");
        assert_eq!(content_type(Format::Json), "application/json");
    }

    #[test]
    fn decimal_writes_every_u64() {
        let mut buf = [0u8; 20];
        for v in [0, 7, 10, 4_294_967_295, u64::MAX] {
            assert_eq!(decimal(v, &mut buf), v.to_string());
        }
    }

    #[test]
    fn base64_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = Vec::new();
            push_base64(&mut out, input.as_bytes());
            assert_eq!(String::from_utf8(out).unwrap(), want);
            assert_eq!(base64_reference(input.as_bytes()), want);
        }
        let mut out = Vec::new();
        push_base64(&mut out, &[0xfb, 0xff, 0xbf]);
        assert_eq!(out, b"+/+/");
    }

    #[test]
    fn json_escapes_every_control_character() {
        let all: String = (0u8..0x80).map(char::from).collect();
        let mut out = Vec::new();
        json_str(&mut out, &all);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.starts_with(r#""\u0000\u0001"#), "{text}");
        assert!(text.contains(r##"\u001F !\"#$"##), "{text}");
        assert!(text.contains(r#"[\\]"#), "{text}");
        assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), all);
    }

    #[test]
    fn lsn_text_matches_display() {
        for v in [
            0,
            1,
            0xF,
            0x10,
            0x025C_B3C8,
            0xFFFF_FFFF,
            0x1_0000_0000,
            0x0ABC_0000_0001,
            u64::MAX,
        ] {
            let mut buf = [0; LSN_MAX_LEN];
            assert_eq!(lsn_text(Lsn(v), &mut buf), Lsn(v).to_string());
        }
    }

    // ---- Timestamps ----

    fn ts(micros: i64) -> String {
        let mut buf = [0; TIMESTAMP_LEN];
        format_timestamp(micros, &mut buf).to_owned()
    }

    /// µs since 2000-01-01 of a Unix time in seconds (values from `date -u -d ... +%s`).
    fn from_unix(secs: i64) -> i64 {
        (secs - 946_684_800) * 1_000_000
    }

    #[test]
    fn timestamps() {
        let day = MICROS_PER_DAY;
        let cases = [
            (0, "2000-01-01T00:00:00.000000Z"),
            (1, "2000-01-01T00:00:00.000001Z"),
            (-1, "1999-12-31T23:59:59.999999Z"),
            (-day, "1999-12-31T00:00:00.000000Z"),
            (SAMPLE_TIME, "2025-12-10T10:30:00.123456Z"),
            (from_unix(0), "1970-01-01T00:00:00.000000Z"),
            (from_unix(0) - 1, "1969-12-31T23:59:59.999999Z"),
            // 2000 is a leap year (divisible by 400).
            (59 * day, "2000-02-29T00:00:00.000000Z"),
            (60 * day, "2000-03-01T00:00:00.000000Z"),
            (
                from_unix(1_709_251_199) + 500_000,
                "2024-02-29T23:59:59.500000Z",
            ),
            (
                from_unix(1_709_251_199) + 1_000_000,
                "2024-03-01T00:00:00.000000Z",
            ),
            // 1900 and 2100 are not (divisible by 100), 1600 is.
            (from_unix(-2_203_977_600), "1900-02-28T00:00:00.000000Z"),
            (
                from_unix(-2_203_977_600) + day,
                "1900-03-01T00:00:00.000000Z",
            ),
            (from_unix(4_107_456_000), "2100-02-28T00:00:00.000000Z"),
            (
                from_unix(4_107_456_000) + day,
                "2100-03-01T00:00:00.000000Z",
            ),
            (from_unix(-11_670_998_400), "1600-02-29T00:00:00.000000Z"),
            (from_unix(-62_135_596_800), "0001-01-01T00:00:00.000000Z"),
            (
                from_unix(253_402_300_799) + 999_999,
                "9999-12-31T23:59:59.999999Z",
            ),
        ];
        for (micros, want) in cases {
            assert_eq!(ts(micros), want, "{micros}");
        }
        assert_eq!(MIN_MICROS, from_unix(-62_135_596_800));
        assert_eq!(MAX_MICROS, from_unix(253_402_300_799) + 999_999);
    }

    #[test]
    fn timestamps_outside_years_1_to_9999_are_clamped() {
        for micros in [MIN_MICROS - 1, MIN_MICROS - MICROS_PER_DAY * 400, i64::MIN] {
            assert_eq!(ts(micros), "0001-01-01T00:00:00.000000Z");
        }
        for micros in [MAX_MICROS + 1, MAX_MICROS + MICROS_PER_DAY * 400, i64::MAX] {
            assert_eq!(ts(micros), "9999-12-31T23:59:59.999999Z");
        }
    }

    /// Every day of years 1 to 9999 against a calendar that counts day by day.
    #[test]
    fn civil_conversion_matches_counting_days() {
        let leap = |y: i64| y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
        let (mut y, mut m, mut d) = (1i64, 1u32, 1u32);
        let mut days = days_from_civil(1, 1, 1);
        assert_eq!(days, -719_162);
        while y < 10_000 {
            assert_eq!(civil_from_days(days), (y, m, d));
            assert_eq!(days_from_civil(y, m, d), days);
            let month_len = match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > month_len {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
            days += 1;
        }
        assert_eq!(days, days_from_civil(10_000, 1, 1));
        assert_eq!(PG_EPOCH_DAY, 10_957);
    }

    // ---- Buffer reuse ----

    #[test]
    fn reused_buffer_keeps_its_capacity() {
        for format in [Format::Msgpack, Format::Json] {
            let mut out = Vec::new();
            let first = insert_every_kind();
            encode_change(format, &first, &mut out);
            let (len, capacity) = (out.len(), out.capacity());
            let first_bytes = out.clone();
            for i in 0..100 {
                // Same shape and sizes, different values.
                let mut event = insert_every_kind();
                event.seq = i % 10;
                event.columns[0].value = Value::Int(i64::from(i % 10));
                event.commit_time = SAMPLE_TIME + i64::from(i);
                encode_change(format, &event, &mut out);
                assert_eq!(out.len(), len);
                assert_eq!(out.capacity(), capacity, "{format} grew on call {i}");
            }
            encode_change(format, &first, &mut out);
            assert_eq!(out, first_bytes);
            assert_eq!(out.capacity(), capacity);
        }
    }

    // ---- Properties ----

    fn any_float() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<u64>().prop_map(f64::from_bits),
            prop::sample::select(vec![
                0.0,
                -0.0,
                1.0,
                0.1,
                f64::NAN,
                -f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::MIN_POSITIVE,
                f64::MAX,
                f64::MIN,
                f64::EPSILON,
                5e-324,
                1e16,
                1e-5,
            ]),
            any::<f64>(),
        ]
    }

    fn any_scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            (-300i64..300).prop_map(Value::Int),
            any_float().prop_map(Value::Float),
            any::<String>().prop_map(Value::Text),
            "[\\x00-\\x1f\"\\\\a-z]{0,8}".prop_map(Value::Text),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
        ]
    }

    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => any_scalar(),
            1 => prop::collection::vec(any_scalar(), 0..6).prop_map(Value::Array),
        ]
    }

    fn any_columns() -> impl Strategy<Value = Vec<ColumnValue>> {
        prop::collection::vec(
            (any::<String>(), any_value()).prop_map(|(name, value)| ColumnValue {
                name: Arc::from(name),
                value,
            }),
            0..8,
        )
    }

    fn any_event() -> impl Strategy<Value = ChangeEvent> {
        let op = prop::sample::select(vec![
            Operation::Insert,
            Operation::Update,
            Operation::Delete,
            Operation::Truncate,
        ]);
        let table = (any::<String>(), any::<String>(), any::<u32>()).prop_map(|(s, t, r)| {
            Arc::new(TableRef {
                schema: Arc::from(s),
                table: Arc::from(t),
                relation_id: r,
            })
        });
        let position = (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<i64>(),
            any::<u32>(),
        );
        let rows = (
            any_columns(),
            prop::option::of(any_columns()),
            prop::collection::vec(any::<String>().prop_map(Arc::from), 0..4),
        );
        (table, op, position, rows).prop_map(
            |(
                table,
                operation,
                (lsn, commit_lsn, xid, commit_time, seq),
                (columns, old_columns, unchanged_toast),
            )| {
                ChangeEvent {
                    table,
                    operation,
                    lsn: Lsn(lsn),
                    commit_lsn: Lsn(commit_lsn),
                    timeline: 1,
                    xid,
                    commit_time,
                    seq,
                    last_in_tx: seq % 2 == 1,
                    columns,
                    old_columns,
                    unchanged_toast,
                }
            },
        )
    }

    /// Equal, except that floats may differ in the last bits: serde_json without its
    /// `float_roundtrip` feature does not always read the closest `f64` (it reads
    /// `2.2041813239700426e-271` two units in the last place off). That the text itself reads
    /// back exactly is checked in `float_text_reads_back_exactly`.
    fn nearly_equal(a: &M, b: &M) -> bool {
        match (a, b) {
            (M::Float(x), M::Float(y)) => x.abs_diff(*y) <= 8,
            (M::Arr(x), M::Arr(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| nearly_equal(a, b))
            }
            (M::Map(x), M::Map(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y)
                        .all(|((ka, a), (kb, b))| ka == kb && nearly_equal(a, b))
            }
            _ => a == b,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn msgpack_round_trips(event in any_event()) {
            let decoded = decode_msgpack(&encode(Format::Msgpack, &event));
            prop_assert_eq!(decoded, expected(&event, false));
        }

        #[test]
        fn json_parses_and_round_trips(event in any_event()) {
            let bytes = encode(Format::Json, &event);
            prop_assert!(std::str::from_utf8(&bytes).is_ok());
            let decoded = decode_json(&bytes);
            let want = expected(&event, true);
            prop_assert!(nearly_equal(&decoded, &want), "got {:?}\nwant {:?}", decoded, want);
        }

        #[test]
        fn float_text_reads_back_exactly(x in any_float()) {
            prop_assume!(x.is_finite());
            let mut out = Vec::new();
            json_f64(&mut out, x);
            let text = std::str::from_utf8(&out).unwrap();
            prop_assert!(text.contains(['.', 'e']), "{} reads as an integer", text);
            prop_assert_eq!(text.parse::<f64>().unwrap().to_bits(), x.to_bits());
            // A JSON number, not something only Rust accepts.
            prop_assert!(serde_json::from_str::<serde_json::Number>(text).is_ok(), "{}", text);
        }

        #[test]
        fn base64_matches_reference(data in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            push_base64(&mut out, &data);
            prop_assert_eq!(String::from_utf8(out).unwrap(), base64_reference(&data));
        }

        #[test]
        fn json_strings_read_back(text in any::<String>()) {
            let mut out = Vec::new();
            json_str(&mut out, &text);
            prop_assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), text);
        }

        #[test]
        fn timestamps_are_well_formed(micros in any::<i64>()) {
            let text = ts(micros);
            prop_assert_eq!(text.len(), TIMESTAMP_LEN);
            let clamped = micros.clamp(MIN_MICROS, MAX_MICROS);
            let days = clamped.div_euclid(MICROS_PER_DAY);
            let (y, m, d) = civil_from_days(days + PG_EPOCH_DAY);
            prop_assert_eq!(days_from_civil(y, m, d), days + PG_EPOCH_DAY);
            prop_assert_eq!(&text[..10], format!("{y:04}-{m:02}-{d:02}"));
            let of_day = clamped.rem_euclid(MICROS_PER_DAY);
            let (h, mi, sec, us) = (
                of_day / 3_600_000_000,
                of_day / 60_000_000 % 60,
                of_day / 1_000_000 % 60,
                of_day % 1_000_000,
            );
            prop_assert_eq!(&text[10..], format!("T{h:02}:{mi:02}:{sec:02}.{us:06}Z"));
        }
    }
}
