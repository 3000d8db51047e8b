//! Snapshot chunks: rows encoded as they are read, and the chunk message around them.

use std::sync::Arc;

use bytes::Bytes;

use super::json::{json_str, json_u64, json_utf8, json_value};
use super::msgpack::{len32, mp_str, mp_uint, mp_utf8, msgpack_value, written};
use crate::config::Format;
use crate::pg::value::{decode_or_verbatim, parse_bool, parse_int, Value, ValueKind};
use crate::pg::Lsn;
use crate::wire::fields;

/// (whatever its operation) keeps them, so nothing it holds is lost.
/// The rows of one snapshot chunk, encoded as they arrive so a chunk never exists twice in
/// memory: each row is a map `{column: value}`.
#[derive(Debug)]
pub struct ChunkRows {
    format: Format,
    /// `room` bytes kept for the chunk's own fields, then the rows.
    buf: Vec<u8>,
    count: usize,
    /// Where the last row added begins in `buf` (after JSON's separating comma); `None` once
    /// it was moved out or the chunk cleared.
    last_start: Option<usize>,
    /// Bytes kept in front of the rows, so that [`take_chunk`] writes the chunk's fields there
    /// instead of copying the rows behind them.
    room: usize,
}

impl ChunkRows {
    /// An empty chunk.
    pub fn new(format: Format) -> Self {
        Self::with_room(format, 0)
    }

    /// An empty chunk keeping `room` bytes in front of its rows for the chunk's own fields
    /// (their encoded size, see [`take_chunk`]).
    pub fn with_room(format: Format, room: usize) -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.resize(room, 0);
        ChunkRows {
            format,
            buf,
            count: 0,
            last_start: None,
            room,
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
        self.buf.len() - self.room
    }

    /// Starts the next chunk.
    pub fn clear(&mut self) {
        self.buf.truncate(self.room);
        self.count = 0;
        self.last_start = None;
    }

    /// The encoded rows.
    fn rows(&self) -> &[u8] {
        &self.buf[self.room..]
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
        next.last_start = Some(next.room);
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
        names: &[Arc<str>],
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

/// A snapshot's column names as map keys, encoded once for all its rows (MessagePack: the
/// str; JSON: the string and its colon).
#[derive(Debug, Clone)]
pub struct ColumnKeys {
    keys: Vec<Box<[u8]>>,
}

impl ColumnKeys {
    /// The keys of `names` in `format`.
    pub fn new(format: Format, names: &[Arc<str>]) -> Self {
        let keys = names
            .iter()
            .map(|name| {
                let mut key = Vec::with_capacity(name.len() + 3);
                match format {
                    Format::Msgpack => mp_str(&mut key, name),
                    Format::Json => {
                        json_str(&mut key, name);
                        key.push(b':');
                    }
                }
                key.into_boxed_slice()
            })
            .collect();
        ColumnKeys { keys }
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when there are no columns.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl ChunkRows {
    /// Adds a row of `keys.len()` columns read from COPY text: each field's kind and text
    /// (`None` for NULL; missing fields are NULL). `ascii` says every field is ASCII (text
    /// then needs no UTF-8 check). Encodes exactly what [`ChunkRows::push_row`] encodes for
    /// the values the fields decode to (a field that does not decode as its kind is its
    /// text), but writes integers, booleans and text straight from the field instead of
    /// through a [`Value`]. Returns the row's encoded size.
    pub fn push_fields<'f>(
        &mut self,
        keys: &ColumnKeys,
        fields: impl IntoIterator<Item = (ValueKind, Option<&'f [u8]>)>,
        ascii: bool,
    ) -> usize {
        let format = self.format;
        let out = &mut self.buf;
        if format == Format::Json && self.count > 0 {
            out.push(b',');
        }
        let start = out.len();
        let mut fields = fields.into_iter();
        match format {
            Format::Msgpack => {
                written(rmp::encode::write_map_len(out, len32(keys.len())));
                for key in &keys.keys {
                    out.extend_from_slice(key);
                    let (kind, text) = fields.next().unwrap_or((ValueKind::Text, None));
                    push_cell(format, kind, text, ascii, out);
                }
            }
            Format::Json => {
                out.push(b'{');
                for (i, key) in keys.keys.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(key);
                    let (kind, text) = fields.next().unwrap_or((ValueKind::Text, None));
                    push_cell(format, kind, text, ascii, out);
                }
                out.push(b'}');
            }
        }
        self.count += 1;
        self.last_start = Some(start);
        out.len() - start
    }
}

/// One COPY field as the value it decodes to: the common kinds straight from the text, the
/// others through [`decode_or_verbatim`].
#[inline]
fn push_cell(format: Format, kind: ValueKind, text: Option<&[u8]>, ascii: bool, out: &mut Vec<u8>) {
    let Some(text) = text else {
        return encode_value(format, &Value::Null, out);
    };
    match kind {
        ValueKind::Int => {
            if let Some(n) = parse_int(text) {
                return encode_value(format, &Value::Int(n), out);
            }
        }
        ValueKind::Bool => {
            if let Some(b) = parse_bool(text) {
                return encode_value(format, &Value::Bool(b), out);
            }
        }
        // What msgpack_value and json_value write for Value::Text, for valid UTF-8.
        ValueKind::Text if ascii || std::str::from_utf8(text).is_ok() => {
            return match format {
                Format::Msgpack => mp_utf8(out, text),
                Format::Json => json_utf8(out, text),
            };
        }
        _ => {}
    }
    encode_value(format, &decode_or_verbatim(kind, text), out);
}

#[inline(always)]
fn encode_value(format: Format, value: &Value, out: &mut Vec<u8>) {
    match format {
        Format::Msgpack => msgpack_value(value, out),
        Format::Json => json_value(value, out),
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
/// data: [rows]}`.
pub fn encode_chunk(format: Format, header: &ChunkHeader<'_>, rows: &ChunkRows, out: &mut Vec<u8>) {
    encode_head(format, header, rows.count, out);
    out.extend_from_slice(rows.rows());
    if format == Format::Json {
        out.extend_from_slice(b"]}");
    }
}

/// The chunk message of `rows` under `header`, as [`encode_chunk`] encodes it, built in
/// place: its fields go into the room kept in front of the rows (copied only when they do
/// not fit), and `rows` starts the next chunk in a buffer of its own.
pub fn take_chunk(format: Format, header: &ChunkHeader<'_>, rows: &mut ChunkRows) -> Bytes {
    let mut head = Vec::with_capacity(rows.room.max(128));
    encode_head(format, header, rows.count, &mut head);
    let room = rows.room;
    let mut next = Vec::with_capacity(rows.buf.capacity());
    next.resize(room, 0);
    let mut buf = std::mem::replace(&mut rows.buf, next);
    rows.clear();
    if format == Format::Json {
        buf.extend_from_slice(b"]}");
    }
    match room.checked_sub(head.len()) {
        Some(start) => {
            buf[start..room].copy_from_slice(&head);
            Bytes::from(buf).slice(start..)
        }
        None => {
            head.extend_from_slice(&buf[room..]);
            Bytes::from(head)
        }
    }
}

/// The chunk's fields up to the start of its rows (the length of `data`, for MessagePack).
fn encode_head(format: Format, header: &ChunkHeader<'_>, count: usize, out: &mut Vec<u8>) {
    out.clear();
    let mut lsn = [0; Lsn::TEXT_MAX_LEN];
    let lsn = header.lsn.text(&mut lsn);
    match format {
        Format::Msgpack => {
            written(rmp::encode::write_map_len(out, 7));
            mp_str(out, fields::TABLE);
            mp_str(out, header.table);
            mp_str(out, fields::SCHEMA);
            mp_str(out, header.schema);
            mp_str(out, fields::OPERATION);
            mp_str(out, fields::OPERATION_SNAPSHOT);
            mp_str(out, fields::SNAPSHOT_ID);
            mp_str(out, header.snapshot_id);
            mp_str(out, fields::CHUNK);
            mp_uint(out, header.chunk);
            mp_str(out, fields::LSN);
            mp_str(out, lsn);
            mp_str(out, fields::DATA);
            written(rmp::encode::write_array_len(out, len32(count)));
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
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Fields of every kind, the fast-pathed ones (int, bool, text) with the edge cases of
    /// their text, and fields that do not decode as their kind.
    fn cells() -> Vec<(ValueKind, Option<&'static [u8]>)> {
        use crate::pg::value::ElemKind;
        let mut cells = Vec::new();
        for text in [
            &b"0"[..],
            b"1",
            b"-1",
            b"127",
            b"128",
            b"-32",
            b"-33",
            b"65535",
            b"-2147483648",
            b"4294967295",
            b"9223372036854775807",
            b"-9223372036854775808",
            b"9223372036854775808",
            b"+7",
            b"",
            b"-",
            b"12a",
            b" 1",
        ] {
            cells.push((ValueKind::Int, Some(text)));
        }
        for text in [&b"t"[..], b"f", b"true", b"false", b"T", b"yes", b""] {
            cells.push((ValueKind::Bool, Some(text)));
        }
        for text in [
            &b""[..],
            b"plain",
            b"say \"hi\"",
            b"back\\slash",
            b"tab\tnew\nline\r",
            b"\x00\x01\x1f\x7f",
            "caf\u{e9} \u{2713} \u{1f600}".as_bytes(),
            b"bad \xff utf-8",
            b"\xc3",
            // Around the headers' bounds: fixstr up to 31 bytes, str8 up to 255, then str16.
            &[b'w'; 31],
            &[b'x'; 32],
            &[b'y'; 255],
            &[b'z'; 256],
        ] {
            cells.push((ValueKind::Text, Some(text)));
        }
        cells.push((ValueKind::Float, Some(b"-1.5e300")));
        cells.push((ValueKind::Float, Some(b"NaN")));
        cells.push((ValueKind::Float, Some(b"x")));
        cells.push((ValueKind::Bytes, Some(b"\\x00ff")));
        cells.push((ValueKind::Bytes, Some(b"\\xf")));
        cells.push((ValueKind::Array(ElemKind::Int), Some(b"{1,-2,NULL}")));
        cells.push((ValueKind::Array(ElemKind::Text), Some(b"{a,\"b c\"}")));
        cells.push((ValueKind::Array(ElemKind::Int), Some(b"{1,x}")));
        for kind in [
            ValueKind::Int,
            ValueKind::Bool,
            ValueKind::Text,
            ValueKind::Float,
            ValueKind::Bytes,
        ] {
            cells.push((kind, None));
        }
        cells
    }

    /// The general path: each field decoded into a [`Value`], then encoded.
    fn through_values(
        rows: &mut ChunkRows,
        names: &[Arc<str>],
        row: &[(ValueKind, Option<&[u8]>)],
    ) {
        let values: Vec<Value> = row
            .iter()
            .map(|(kind, text)| text.map_or(Value::Null, |t| decode_or_verbatim(*kind, t)))
            .collect();
        rows.push_row(names, &values);
    }

    #[test]
    fn fields_encode_byte_for_byte_as_their_values() {
        let cells = cells();
        for format in [Format::Msgpack, Format::Json] {
            // Each cell alone, under a name that needs escaping in JSON.
            let names: Vec<Arc<str>> = vec![Arc::from("c\"ol\\1")];
            for cell in &cells {
                let ascii = cell.1.is_none_or(<[u8]>::is_ascii);
                let mut fast = ChunkRows::new(format);
                let mut general = ChunkRows::new(format);
                for ascii in [false, ascii] {
                    let size = fast.push_fields(&ColumnKeys::new(format, &names), [*cell], ascii);
                    through_values(&mut general, &names, &[*cell]);
                    assert_eq!(size, general.buf.len() - general.last_start.unwrap());
                }
                assert_eq!(fast.buf, general.buf, "{format:?} {cell:?}");
            }
            // Rows of many columns; a row shorter than the names has NULLs at the end.
            let names: Vec<Arc<str>> = (0..cells.len())
                .map(|i| Arc::from(format!("col{i}")))
                .collect();
            let keys = ColumnKeys::new(format, &names);
            let mut fast = ChunkRows::new(format);
            let mut general = ChunkRows::new(format);
            for row in [&cells[..], &cells[..3]] {
                fast.push_fields(&keys, row.iter().copied(), false);
                let mut padded = row.to_vec();
                padded.resize(cells.len(), (ValueKind::Text, None));
                through_values(&mut general, &names, &padded);
            }
            assert_eq!(fast.len(), 2);
            assert_eq!(fast.buf, general.buf, "{format:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_field_encodes_as_its_value(
            kind in proptest::sample::select(vec![ValueKind::Int, ValueKind::Bool, ValueKind::Text,
                ValueKind::Float, ValueKind::Bytes]),
            text in proptest::option::of(proptest::collection::vec(
                proptest::sample::select(b"-+0189tfrue\\\"x\x00\x1f\x7f\xc3\xa9\xff".to_vec()), 0..12)),
        ) {
            let names: Vec<Arc<str>> = vec![Arc::from("v")];
            for format in [Format::Msgpack, Format::Json] {
                let cell = (kind, text.as_deref());
                let mut fast = ChunkRows::new(format);
                fast.push_fields(&ColumnKeys::new(format, &names), [cell], cell.1.is_none_or(<[u8]>::is_ascii));
                let mut general = ChunkRows::new(format);
                through_values(&mut general, &names, &[cell]);
                proptest::prop_assert_eq!(&fast.buf, &general.buf);
            }
        }
    }

    #[test]
    fn chunks_built_in_place_equal_the_encoded_ones_whatever_the_room() {
        let names: Vec<Arc<str>> = vec![Arc::from("id"), Arc::from("name")];
        let header = ChunkHeader {
            table: "users",
            schema: "public",
            snapshot_id: "s1",
            chunk: 7,
            lsn: Lsn(0x1_0000_00A0),
        };
        for format in [Format::Msgpack, Format::Json] {
            let mut expected = Vec::new();
            encode_chunk(format, &header, &ChunkRows::new(format), &mut expected);
            let exact = expected.len() - if format == Format::Json { 2 } else { 0 };
            // No room (the fields are copied in front), too little, exactly enough, more.
            for room in [0, exact - 1, exact + 2, exact + 64] {
                let mut rows = ChunkRows::with_room(format, room);
                let mut carried = ChunkRows::with_room(format, room);
                for n in 0..20 {
                    rows.push_row(&names, &[Value::Int(n), Value::Text(format!("user {n}"))]);
                }
                rows.move_last_row(&mut carried);
                encode_chunk(format, &header, &rows, &mut expected);
                let len = rows.encoded_len();
                let chunk = take_chunk(format, &header, &mut rows);
                assert_eq!(&chunk[..], &expected[..], "{format:?}, room {room}");
                assert!(rows.is_empty() && rows.encoded_len() == 0);
                assert!(len > 0);
                // The next chunk starts with the carried row, in the same room.
                std::mem::swap(&mut rows, &mut carried);
                encode_chunk(format, &header, &rows, &mut expected);
                let chunk = take_chunk(format, &header, &mut rows);
                assert_eq!(&chunk[..], &expected[..], "{format:?}, room {room}");
            }
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
}
