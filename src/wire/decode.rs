//! The consumer side of the contract: the bridge's messages decoded, in MessagePack or JSON
//! (told apart by their first byte, so a consumer needs no `--format`), and their fields read.

use rmpv::Value;

use crate::pg::Lsn;
use crate::wire::fields;

/// A message that is not what the bridge publishes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DocError(pub String);

/// Decodes a payload (a change event, snapshot chunk or meta, or table schema): JSON when it starts with `{` (a MessagePack document never does: `{` is
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

/// Whether `doc` is a change event in Debezium's envelope (`--envelope debezium`): it has
/// `op` and `source`, or is wrapped as `{"schema": {…}, "payload": …}`. Consumers of the
/// native event use it to refuse such messages with a clear error.
pub fn is_debezium_envelope(doc: &Value) -> bool {
    (field(doc, fields::DBZ_OP).is_some() && field(doc, fields::DBZ_SOURCE).is_some())
        || (field(doc, fields::DBZ_PAYLOAD).is_some()
            && field(doc, fields::DBZ_SCHEMA).is_some_and(Value::is_map))
}

/// Why a consumer of the native event cannot read a Debezium body.
pub const DEBEZIUM_REFUSAL: &str = "this is a change event in Debezium's envelope (the bridge \
    runs with --envelope debezium); this command reads the bridge's native events only: run the \
    bridge with --envelope native, or read the stream with a Debezium consumer";

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
                let name = str_field(item, fields::NAME)?;
                let value = field(item, fields::VALUE).unwrap_or(&Value::Nil);
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(!is_debezium_envelope(&doc));
    }

    #[test]
    fn debezium_bodies_are_recognised() {
        let plain = decode(br#"{"before":null,"after":{"id":1},"source":{},"op":"c"}"#).unwrap();
        assert!(is_debezium_envelope(&plain));
        let wrapped = decode(br#"{"schema":{"type":"struct"},"payload":{"op":"c"}}"#).unwrap();
        assert!(is_debezium_envelope(&wrapped));
        let native = decode(br#"{"table":"t","schema":"public","operation":"INSERT"}"#).unwrap();
        assert!(!is_debezium_envelope(&native));
    }
}
