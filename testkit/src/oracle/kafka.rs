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

use std::collections::HashMap;

use serde_json::Value as Json;

use pgbridge::pg::Lsn;
use pgbridge::wire::kafka::{ID_HEADER, KEY_CHANGE_DELETE_SUFFIX, KEY_CHANGE_INSERT_SUFFIX};

use super::{canon_f4, canon_f8, canon_json, key_of, Kind, Row, Rows, Table};
use crate::kafka::KafkaRecord;

/// The rows of `t` that the records of its topic give.
pub fn kafka_rows(records: &[KafkaRecord], t: &Table) -> Result<Rows, String> {
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
        let seq = ev["seq"].as_u64().unwrap_or(0);
        let id = r.header(ID_HEADER).unwrap_or_default().to_string();
        let half = u8::from(id.ends_with(KEY_CHANGE_INSERT_SUFFIX));
        changes.push(((lsn, seq, half), id, ev));
    }
    // Stable: the records of one change keep their order.
    changes.sort_by_key(|(pos, _, _)| *pos);
    let mut rows = Rows::new();
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
