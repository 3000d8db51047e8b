//! The bridge's messages as the mirror reads them: MessagePack or JSON documents (told apart by
//! their first byte, so the mirror needs no `--format`), and their values as SQLite values.

use rmpv::Value;
use rusqlite::types::Value as Sql;

use crate::pg::Lsn;

/// How a column is stored in SQLite; the declared SQLite type names it (see
/// [`ColumnKind::for_pg_type`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// smallint, integer, bigint, oid.
    Integer,
    /// real, double precision; NaN is stored as the text `NaN` (SQLite turns a NaN into NULL).
    Real,
    /// boolean, as 0 or 1.
    Boolean,
    /// bytea.
    Blob,
    /// One-dimensional arrays, as a JSON array.
    JsonArray,
    /// Everything else, as the text PostgreSQL prints.
    Text,
}

impl ColumnKind {
    /// The kind for PostgreSQL's `format_type` name of a column (the schema's `data_type`).
    pub fn for_pg_type(data_type: &str) -> Self {
        if data_type.ends_with(']') {
            return ColumnKind::JsonArray;
        }
        match data_type {
            "smallint" | "integer" | "bigint" | "oid" => ColumnKind::Integer,
            "real" | "double precision" => ColumnKind::Real,
            "boolean" => ColumnKind::Boolean,
            "bytea" => ColumnKind::Blob,
            _ => ColumnKind::Text,
        }
    }

    /// The declared SQLite type. It sets SQLite's type affinity and, read back from the table,
    /// says how the column's values were converted.
    pub fn sqlite_type(self) -> &'static str {
        match self {
            ColumnKind::Integer => "INTEGER",
            ColumnKind::Real => "REAL",
            ColumnKind::Boolean => "BOOLEAN",
            ColumnKind::Blob => "BLOB",
            ColumnKind::JsonArray => "JSON_TEXT",
            ColumnKind::Text => "TEXT",
        }
    }

    /// The kind a declared SQLite type stands for (the inverse of [`ColumnKind::sqlite_type`]).
    pub fn from_sqlite_type(declared: &str) -> Self {
        match declared {
            "INTEGER" => ColumnKind::Integer,
            "REAL" => ColumnKind::Real,
            "BOOLEAN" => ColumnKind::Boolean,
            "BLOB" => ColumnKind::Blob,
            "JSON_TEXT" => ColumnKind::JsonArray,
            _ => ColumnKind::Text,
        }
    }
}

/// A message that is not what the bridge publishes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DocError(pub String);

/// Decodes a payload: JSON when it starts with `{` (a MessagePack document never does: `{` is
/// a MessagePack integer), MessagePack otherwise. Map entries keep the order they were
/// written in, in both formats, so a document can be shown with its fields in contract order.
pub fn decode(payload: &[u8]) -> Result<Value, DocError> {
    if payload.first() == Some(&b'{') {
        serde_json::from_slice::<Ordered>(payload)
            .map(|o| o.0)
            .map_err(|e| DocError(format!("invalid JSON message: {e}")))
    } else {
        rmpv::decode::read_value(&mut &payload[..])
            .map_err(|e| DocError(format!("invalid MessagePack message: {e}")))
    }
}

/// A JSON document as the MessagePack value the bridge would have written (bytea stays a
/// base64 string and non-finite floats stay strings: [`to_sql`] reads them by column kind).
/// Read directly rather than through `serde_json::Value`, whose maps sort their keys.
struct Ordered(Value);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OrderedVisitor)
    }
}

struct OrderedVisitor;

impl<'de> serde::de::Visitor<'de> for OrderedVisitor {
    type Value = Ordered;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Ordered, E> {
        Ok(Ordered(Value::Nil))
    }
    fn visit_none<E>(self) -> Result<Ordered, E> {
        Ok(Ordered(Value::Nil))
    }
    fn visit_bool<E>(self, b: bool) -> Result<Ordered, E> {
        Ok(Ordered(Value::Boolean(b)))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Ordered, E> {
        Ok(Ordered(Value::from(i)))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Ordered, E> {
        Ok(Ordered(Value::from(u)))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Ordered, E> {
        Ok(Ordered(Value::F64(f)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Ordered, E> {
        Ok(Ordered(Value::from(s)))
    }
    fn visit_string<E>(self, s: String) -> Result<Ordered, E> {
        Ok(Ordered(Value::from(s)))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Ordered, A::Error> {
        let mut items = Vec::new();
        while let Some(Ordered(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Ordered(Value::Array(items)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, Ordered(v))) = map.next_entry::<String, Ordered>()? {
            entries.push((Value::from(k), v));
        }
        Ok(Ordered(Value::Map(entries)))
    }
}

/// The field `key` of a map document.
pub fn field<'a>(doc: &'a Value, key: &str) -> Option<&'a Value> {
    match doc {
        Value::Map(entries) => entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// The string field `key`.
pub fn str_field<'a>(doc: &'a Value, key: &str) -> Result<&'a str, DocError> {
    field(doc, key)
        .and_then(Value::as_str)
        .ok_or_else(|| DocError(format!("message has no string field {key:?}")))
}

/// The unsigned integer field `key`.
pub fn u64_field(doc: &Value, key: &str) -> Result<u64, DocError> {
    field(doc, key)
        .and_then(Value::as_u64)
        .ok_or_else(|| DocError(format!("message has no integer field {key:?}")))
}

/// The LSN field `key` (`X/X` text).
pub fn lsn_field(doc: &Value, key: &str) -> Result<Lsn, DocError> {
    let text = str_field(doc, key)?;
    text.parse()
        .map_err(|_| DocError(format!("field {key:?} is not an LSN: {text:?}")))
}

/// A change event's `columns` / `old_columns` (`[{name, value}, ...]`) as pairs; empty when
/// the field is absent or nil.
pub fn column_pairs<'a>(doc: &'a Value, key: &str) -> Result<Vec<(&'a str, &'a Value)>, DocError> {
    match field(doc, key) {
        None | Some(Value::Nil) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let name = str_field(item, "name")?;
                let value = field(item, "value").unwrap_or(&Value::Nil);
                Ok((name, value))
            })
            .collect(),
        Some(_) => Err(DocError(format!("field {key:?} is not a list of columns"))),
    }
}

/// A snapshot row (`{column: value, ...}`) as pairs.
pub fn row_pairs(row: &Value) -> Result<Vec<(&str, &Value)>, DocError> {
    match row {
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| {
                k.as_str()
                    .map(|name| (name, v))
                    .ok_or_else(|| DocError("snapshot row with a non-string column name".into()))
            })
            .collect(),
        _ => Err(DocError("snapshot row is not a map".into())),
    }
}

/// Whether `value` is what a column of kind `kind` receives; a value that is not says the
/// source column's type changed (e.g. an integer column that now gets strings).
pub fn fits(kind: ColumnKind, value: &Value) -> bool {
    match (kind, value) {
        (_, Value::Nil) => true,
        (ColumnKind::Integer, v) => v.is_i64() || v.is_u64(),
        // JSON carries non-finite floats as strings; a whole float may come as an integer.
        (ColumnKind::Real, Value::String(s)) => {
            matches!(s.as_str(), Some("NaN" | "Infinity" | "-Infinity"))
        }
        (ColumnKind::Real, v) => v.is_f64() || v.is_f32() || v.is_i64() || v.is_u64(),
        (ColumnKind::Boolean, v) => v.is_bool(),
        // JSON carries bytea as base64 text.
        (ColumnKind::Blob, v) => v.is_bin() || v.is_str(),
        (ColumnKind::JsonArray, v) => v.is_array(),
        (ColumnKind::Text, v) => v.is_str(),
    }
}

/// A message value as stored in a column of kind `kind`.
pub fn to_sql(kind: ColumnKind, value: &Value) -> Sql {
    match value {
        Value::Nil => Sql::Null,
        Value::Boolean(b) => Sql::Integer(i64::from(*b)),
        Value::Integer(i) => match i.as_i64() {
            Some(i) => Sql::Integer(i),
            None => Sql::Text(i.to_string()),
        },
        Value::F32(f) => real(f64::from(*f)),
        Value::F64(f) => real(*f),
        Value::String(s) => {
            let s = s.as_str().unwrap_or_default();
            match kind {
                // JSON carries bytea as base64 and non-finite floats as strings.
                ColumnKind::Blob => match base64_decode(s) {
                    Some(bytes) => Sql::Blob(bytes),
                    None => Sql::Text(s.to_owned()),
                },
                ColumnKind::Real => match s {
                    "Infinity" => Sql::Real(f64::INFINITY),
                    "-Infinity" => Sql::Real(f64::NEG_INFINITY),
                    _ => Sql::Text(s.to_owned()),
                },
                _ => Sql::Text(s.to_owned()),
            }
        }
        Value::Binary(b) => Sql::Blob(b.clone()),
        Value::Array(_) | Value::Map(_) => Sql::Text(to_json(value).to_string()),
        Value::Ext(_, _) => Sql::Text(value.to_string()),
    }
}

/// A float as SQLite stores it: NaN as text, since SQLite would make it NULL.
fn real(f: f64) -> Sql {
    if f.is_nan() {
        Sql::Text("NaN".into())
    } else {
        Sql::Real(f)
    }
}

/// An array value as JSON, written the same way whatever the message format: bytea elements
/// as base64, non-finite floats as strings.
fn to_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::Nil => J::Null,
        Value::Boolean(b) => J::Bool(*b),
        Value::Integer(i) => i
            .as_i64()
            .map(J::from)
            .or_else(|| i.as_u64().map(J::from))
            .unwrap_or(J::Null),
        Value::F32(f) => float_json(f64::from(*f)),
        Value::F64(f) => float_json(*f),
        Value::String(s) => J::String(s.as_str().unwrap_or_default().to_owned()),
        Value::Binary(b) => J::String(base64_encode(b)),
        Value::Array(items) => J::Array(items.iter().map(to_json).collect()),
        Value::Map(entries) => J::Object(
            entries
                .iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_owned(), to_json(v)))
                .collect(),
        ),
        Value::Ext(_, _) => J::String(value.to_string()),
    }
}

fn float_json(f: f64) -> serde_json::Value {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        (if f > 0.0 { "Infinity" } else { "-Infinity" }).into()
    } else {
        serde_json::Value::from(f)
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 with padding; `None` when `text` is not base64.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (i, quad) in bytes.chunks(4).enumerate() {
        let last = i + 1 == bytes.len() / 4;
        let mut n = 0u32;
        let mut pad = 0;
        for (j, &c) in quad.iter().enumerate() {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                b'=' if last && j >= 2 => {
                    pad += 1;
                    0
                }
                _ => return None,
            };
            if pad > 0 && c != b'=' {
                return None;
            }
            n = (n << 6) | u32::from(v);
        }
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_do_not_fit_tell_a_changed_type() {
        use ColumnKind::*;
        let fit = [
            (Integer, Value::from(5)),
            (Integer, Value::Nil),
            (Real, Value::F64(1.5)),
            (Real, Value::from(2)),
            (Real, Value::from("NaN")),
            (Real, Value::from("-Infinity")),
            (Boolean, Value::Boolean(true)),
            (Blob, Value::Binary(vec![1])),
            (Blob, Value::from("AAE=")),
            (JsonArray, Value::Array(vec![])),
            (Text, Value::from("2025-12-10")),
        ];
        for (kind, v) in &fit {
            assert!(fits(*kind, v), "{kind:?} {v}");
        }
        let misfit = [
            (Integer, Value::from("5")),
            (Integer, Value::F64(1.5)),
            (Real, Value::from("1.5")),
            (Boolean, Value::from(1)),
            (JsonArray, Value::from("{}")),
            (Text, Value::from(5)),
            (Text, Value::F64(1.5)),
            (Text, Value::Boolean(false)),
        ];
        for (kind, v) in &misfit {
            assert!(!fits(*kind, v), "{kind:?} {v}");
        }
    }

    #[test]
    fn kinds_follow_the_postgres_type() {
        assert_eq!(ColumnKind::for_pg_type("bigint"), ColumnKind::Integer);
        assert_eq!(
            ColumnKind::for_pg_type("double precision"),
            ColumnKind::Real
        );
        assert_eq!(ColumnKind::for_pg_type("boolean"), ColumnKind::Boolean);
        assert_eq!(ColumnKind::for_pg_type("bytea"), ColumnKind::Blob);
        assert_eq!(ColumnKind::for_pg_type("integer[]"), ColumnKind::JsonArray);
        assert_eq!(ColumnKind::for_pg_type("numeric(12,2)"), ColumnKind::Text);
        assert_eq!(
            ColumnKind::for_pg_type("timestamp with time zone"),
            ColumnKind::Text
        );
        for k in [
            ColumnKind::Integer,
            ColumnKind::Real,
            ColumnKind::Boolean,
            ColumnKind::Blob,
            ColumnKind::JsonArray,
            ColumnKind::Text,
        ] {
            assert_eq!(ColumnKind::from_sqlite_type(k.sqlite_type()), k);
        }
    }

    #[test]
    fn both_formats_give_the_same_sqlite_values() {
        let mut mp = Vec::new();
        let doc = Value::Map(vec![
            (Value::from("b"), Value::Binary(vec![0, 255, 7])),
            (Value::from("n"), Value::F64(f64::NAN)),
            (Value::from("i"), Value::F64(f64::NEG_INFINITY)),
            (
                Value::from("a"),
                Value::Array(vec![Value::F64(1.5), Value::Nil, Value::F64(2.0)]),
            ),
            (Value::from("t"), Value::from(true)),
        ]);
        rmpv::encode::write_value(&mut mp, &doc).unwrap();
        let json = br#"{"b":"AP8H","n":"NaN","i":"-Infinity","a":[1.5,null,2.0],"t":true}"#;
        let kinds = [
            ("b", ColumnKind::Blob),
            ("n", ColumnKind::Real),
            ("i", ColumnKind::Real),
            ("a", ColumnKind::JsonArray),
            ("t", ColumnKind::Boolean),
        ];
        let from_mp = decode(&mp).unwrap();
        let from_json = decode(json).unwrap();
        for (name, kind) in kinds {
            let a = to_sql(kind, field(&from_mp, name).unwrap());
            let b = to_sql(kind, field(&from_json, name).unwrap());
            assert_eq!(a, b, "{name}");
        }
        assert_eq!(
            to_sql(ColumnKind::Blob, field(&from_json, "b").unwrap()),
            Sql::Blob(vec![0, 255, 7])
        );
        assert_eq!(
            to_sql(ColumnKind::JsonArray, field(&from_mp, "a").unwrap()),
            Sql::Text("[1.5,null,2.0]".into())
        );
        assert_eq!(
            to_sql(ColumnKind::Real, field(&from_mp, "n").unwrap()),
            Sql::Text("NaN".into())
        );
    }

    #[test]
    fn base64_round_trips() {
        for len in 0..20u8 {
            let data: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(base64_decode(&base64_encode(&data)), Some(data));
        }
        assert_eq!(base64_encode(b"foob"), "Zm9vYg==");
        assert_eq!(base64_decode("Zm9vYg=="), Some(b"foob".to_vec()));
        assert_eq!(base64_decode("Zm9=Yg=="), None);
        assert_eq!(base64_decode("abc"), None);
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(decode(b"{not json").is_err());
        assert!(decode(&[0x81]).is_err());
        let doc =
            decode(br#"{"columns":[{"name":"id","value":1}],"commit_lsn":"0/16B3748"}"#).unwrap();
        assert_eq!(column_pairs(&doc, "columns").unwrap().len(), 1);
        assert!(column_pairs(&doc, "old_columns").unwrap().is_empty());
        assert_eq!(
            lsn_field(&doc, "commit_lsn").unwrap(),
            "0/16B3748".parse().unwrap()
        );
        assert!(lsn_field(&doc, "columns").is_err());
    }
}
