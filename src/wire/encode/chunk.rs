//! Snapshot chunks: rows encoded as they are read, and the chunk message around them.

use std::sync::Arc;

use bytes::Bytes;

use super::json::{json_str, json_u64, json_value};
use super::msgpack::{len32, mp_str, mp_uint, msgpack_value, written};
use crate::config::Format;
use crate::pg::value::Value;
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
