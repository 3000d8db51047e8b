//! The table-rebuild oracle over Kafka: replays a topic's records (`--format json`), each
//! partition in offset order, into rows in the canonical form of [`super::pg_rows`], so a
//! topic can be compared with its PostgreSQL source.
//!
//! Replay follows the documented record rules: INSERT and UPDATE set the row of their key
//! (a column left out as an unchanged TOASTed value keeps the value it had), DELETE removes
//! it, a tombstone changes nothing, and a TRUNCATE (one record on every partition) empties its
//! partition. A duplicate (at-least-once) repeats a suffix of changes in order, which leaves
//! the same final rows.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use super::{canon_f4, canon_f8, canon_json, key_of, Kind, Row, Rows, Table};
use crate::kafka::KafkaRecord;

/// The rows of `t` that the records of its topic give.
pub fn kafka_rows(records: &[KafkaRecord], t: &Table) -> Result<Rows, String> {
    let mut partitions: BTreeMap<i32, Rows> = BTreeMap::new();
    for r in records {
        let rows = partitions.entry(r.partition).or_default();
        let Some(value) = &r.value else {
            continue;
        };
        let ev: Json = serde_json::from_slice(value)
            .map_err(|e| format!("{}@{}: value is not JSON: {e}", r.partition, r.offset))?;
        let op = ev["operation"].as_str().unwrap_or_default();
        let columns = ev["columns"].as_array().cloned().unwrap_or_default();
        let named = |name: &str| {
            columns
                .iter()
                .find(|c| c["name"] == name)
                .map(|c| c["value"].clone())
        };
        match op {
            "TRUNCATE" => rows.clear(),
            "DELETE" => {
                let key: Row = t.columns[..t.key]
                    .iter()
                    .map(|(c, k)| canon_json_value(*k, &named(c).unwrap_or(Json::Null)))
                    .collect();
                rows.remove(&key_of(t, &key));
            }
            "INSERT" | "UPDATE" => {
                let key: Row = t.columns[..t.key]
                    .iter()
                    .map(|(c, k)| canon_json_value(*k, &named(c).unwrap_or(Json::Null)))
                    .collect();
                let key = key_of(t, &key);
                let before = rows.get(&key).cloned();
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
            other => return Err(format!("{}@{}: operation {other:?}", r.partition, r.offset)),
        }
    }
    // A row lives in one partition at a time: the same key in two would be a stale row.
    let mut all = Rows::new();
    for (p, rows) in partitions {
        for (key, row) in rows {
            if all.insert(key.clone(), row).is_some() {
                return Err(format!("{}: row {key} is in two partitions (up to {p})", t.pg));
            }
        }
    }
    Ok(all)
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
