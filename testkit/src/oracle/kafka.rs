//! The table-rebuild oracle over Kafka: replays a topic's records (`--format json`) in commit
//! order (`commit_lsn`, `seq`; the halves of a key change DELETE first) into rows in the
//! canonical form of [`super::pg_rows`], so a topic can be compared with its PostgreSQL
//! source. (Per-key order within partitions is checked by the tests themselves.)
//!
//! Replay follows the documented record rules: INSERT and UPDATE set the row of their key
//! (a column left out as an unchanged TOASTed value keeps the value it had; for the INSERT
//! half of a key change, the value of the row its DELETE half removed), DELETE removes it, a
//! tombstone changes nothing, and TRUNCATE empties the table. A duplicate (at-least-once)
//! sorts next to its original and applies the same change again, which changes nothing.
//!
//! [`bootstrap_rows`] is the documented bootstrap of a Kafka consumer: a snapshot from the
//! table's init topic, then the CDC topic from the snapshot's offsets.

use std::collections::HashMap;

use serde_json::Value as Json;

use pgbridge::pg::Lsn;
use pgbridge::wire::kafka::{
    init_topic, ID_HEADER, KEY_CHANGE_DELETE_SUFFIX, KEY_CHANGE_INSERT_SUFFIX, OP_HEADER,
    SNAPSHOT_CHUNK_OP, SNAPSHOT_META_OP,
};

use super::{canon_f4, canon_f8, canon_json, key_of, Kind, Row, Rows, Table};
use crate::kafka::{KafkaRecord, KafkaServer};

/// The rows of `t` that the records of its topic give.
pub fn kafka_rows(records: &[KafkaRecord], t: &Table) -> Result<Rows, String> {
    replay(Rows::new(), records.iter(), t, None)
}

/// `rows` with the changes of `records` applied, in commit order; with `from`, only the
/// changes whose `commit_lsn` is at or after it.
fn replay<'a>(
    mut rows: Rows,
    records: impl Iterator<Item = &'a KafkaRecord>,
    t: &Table,
    from: Option<Lsn>,
) -> Result<Rows, String> {
    let mut changes = Vec::new();
    for r in records {
        let Some(value) = &r.value else {
            continue;
        };
        let ev: Json = serde_json::from_slice(value)
            .map_err(|e| format!("{}@{}: value is not JSON: {e}", r.partition, r.offset))?;
        let lsn: Lsn = ev["commit_lsn"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{}@{}: no commit_lsn", r.partition, r.offset))?;
        if from.is_some_and(|from| lsn < from) {
            continue;
        }
        let seq = ev["seq"].as_u64().unwrap_or(0);
        let id = r.header(ID_HEADER).unwrap_or_default().to_string();
        let half = u8::from(id.ends_with(KEY_CHANGE_INSERT_SUFFIX));
        changes.push(((lsn, seq, half), id, ev));
    }
    // Stable: the records of one change keep their order.
    changes.sort_by_key(|(pos, _, _)| *pos);
    let mut moved: HashMap<String, Row> = HashMap::new();
    for (_, id, ev) in changes {
        let op = ev["operation"].as_str().unwrap_or_default();
        let columns = ev["columns"].as_array().cloned().unwrap_or_default();
        let named = |name: &str| {
            columns
                .iter()
                .find(|c| c["name"] == name)
                .map(|c| c["value"].clone())
        };
        let key: Row = t.columns[..t.key]
            .iter()
            .map(|(c, k)| canon_json_value(*k, &named(c).unwrap_or(Json::Null)))
            .collect();
        let key = key_of(t, &key);
        match op {
            "TRUNCATE" => rows.clear(),
            "DELETE" => {
                let removed = rows.remove(&key);
                if let (Some(base), Some(row)) =
                    (id.strip_suffix(KEY_CHANGE_DELETE_SUFFIX), removed)
                {
                    moved.insert(base.to_string(), row);
                }
            }
            "INSERT" | "UPDATE" => {
                let before = match id.strip_suffix(KEY_CHANGE_INSERT_SUFFIX) {
                    Some(base) => moved.get(base).cloned(),
                    None => rows.get(&key).cloned(),
                };
                let row: Row = t
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, (c, k))| match named(c) {
                        Some(v) => canon_json_value(*k, &v),
                        None => before.as_ref().and_then(|b| b[i].clone()),
                    })
                    .collect();
                rows.insert(key, row);
            }
            other => return Err(format!("{id}: operation {other:?}")),
        }
    }
    Ok(rows)
}

/// What [`bootstrap_rows`] found.
#[derive(Debug)]
pub struct Bootstrap {
    /// The meta record of the snapshot loaded.
    pub meta: Json,
    /// Rows the snapshot's chunks held.
    pub snapshot_rows: usize,
    /// Records of the CDC topic read from the meta's offsets on.
    pub read: usize,
    /// Of those, the changes applied (`commit_lsn` at or after the meta's `lsn`).
    pub applied: usize,
}

/// The rows of `t` as a Kafka consumer bootstraps them (`--format json`, topic prefix
/// `prefix`): the last meta record of the table's init topic; the rows of that snapshot's
/// chunks; then each partition of the table's CDC topic from the meta's offset, applying only
/// changes whose `commit_lsn` is at or after the meta's `lsn`.
pub fn bootstrap_rows(
    kafka: &KafkaServer,
    prefix: &str,
    t: &Table,
) -> Result<(Rows, Bootstrap), String> {
    let (schema, table) = t.pg.split_once('.').unwrap_or(("public", t.pg));
    let init = kafka.read_topic(&init_topic(prefix, schema, table));
    let meta = init
        .iter()
        .rev()
        .find(|r| r.header(OP_HEADER) == Some(SNAPSHOT_META_OP))
        .ok_or_else(|| format!("{}: no meta record in its init topic", t.pg))?
        .json();
    if let Some(e) = meta.get("error") {
        return Err(format!("{}: the last snapshot failed: {e}", t.pg));
    }
    let id = meta["snapshot_id"].as_str().unwrap_or_default();
    let lsn: Lsn = meta["lsn"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{}: meta without lsn: {meta}", t.pg))?;
    let mut rows = Rows::new();
    let mut chunks = Vec::new();
    for r in &init {
        if r.header(OP_HEADER) != Some(SNAPSHOT_CHUNK_OP) {
            continue;
        }
        let chunk = r.json();
        if chunk["snapshot_id"] == id {
            chunks.push(chunk);
        }
    }
    chunks.sort_by_key(|c| c["chunk"].as_u64());
    if Some(chunks.len() as u64) != meta["batch_count"].as_u64() {
        return Err(format!(
            "{}: {} chunks of snapshot {id}, its meta says {}",
            t.pg,
            chunks.len(),
            meta["batch_count"]
        ));
    }
    let mut snapshot_rows = 0;
    for chunk in &chunks {
        for data in chunk["data"].as_array().into_iter().flatten() {
            let row: Row = t
                .columns
                .iter()
                .map(|(c, k)| canon_json_value(*k, &data[*c]))
                .collect();
            rows.insert(key_of(t, &row), row);
            snapshot_rows += 1;
        }
    }
    let offsets = &meta["cdc_offsets"];
    let cdc = kafka.read_topic(meta["cdc_topic"].as_str().unwrap_or_default());
    let from: Vec<&KafkaRecord> = cdc
        .iter()
        .filter(|r| {
            r.offset
                >= offsets[r.partition.to_string()]
                    .as_i64()
                    .unwrap_or_default()
        })
        .collect();
    let applied = from
        .iter()
        .filter(|r| {
            r.value.as_deref().is_some_and(|v| {
                serde_json::from_slice::<Json>(v)
                    .ok()
                    .and_then(|ev| {
                        ev["commit_lsn"]
                            .as_str()
                            .and_then(|s| s.parse::<Lsn>().ok())
                    })
                    .is_some_and(|c| c >= lsn)
            })
        })
        .count();
    let read = from.len();
    let rows = replay(rows, from.into_iter(), t, Some(lsn))?;
    Ok((
        rows,
        Bootstrap {
            meta,
            snapshot_rows,
            read,
            applied,
        },
    ))
}

/// One JSON value of a change event in the canonical form of [`super::canon_pg`].
pub fn canon_json_value(kind: Kind, v: &Json) -> Option<String> {
    if v.is_null() {
        return None;
    }
    Some(match (kind, v) {
        (Kind::Int, Json::Number(n)) => n.to_string(),
        (Kind::F8, Json::Number(n)) => canon_f8(n.as_f64().unwrap_or(f64::NAN)),
        (Kind::F4, Json::Number(n)) => canon_f4(n.as_f64().unwrap_or(f64::NAN) as f32),
        (Kind::F8 | Kind::F4, Json::String(s)) => s.clone(),
        (Kind::Bool, Json::Bool(b)) => if *b { "t" } else { "f" }.into(),
        (Kind::Bytea, Json::String(s)) => {
            let mut out = String::from("\\x");
            for b in base64_decode(s) {
                out.push_str(&format!("{b:02x}"));
            }
            out
        }
        (Kind::Array, v) => canon_json(&v.to_string(), false),
        (Kind::FloatArray, v) => canon_json(&v.to_string(), true),
        (Kind::Text, Json::String(s)) => s.clone(),
        (_, other) => format!("<JSON {other}>"),
    })
}

/// Standard base64 with padding, as the JSON format writes binary values.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|b| *b != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        let take = chunk.len().saturating_sub(1);
        for i in 0..take {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8="), b"hello");
        assert_eq!(base64_decode("aGk="), b"hi");
        assert_eq!(base64_decode("YWJj"), b"abc");
        assert_eq!(base64_decode(""), b"");
    }
}
