//! Documents as one line of JSON: fields in the order they were written, bytes as base64 and
//! non-finite floats as strings (as the bridge's JSON format writes them, through
//! [`push_json_value`]), with optional terminal colours.

use rmpv::Value;

use crate::wire::encode::{json_str, push_json_key, push_json_value};
use crate::wire::fields;

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// The colour of an operation's value.
fn operation_colour(op: &str) -> &'static str {
    match op {
        "INSERT" => "\x1b[32m",
        "UPDATE" => "\x1b[33m",
        "DELETE" => "\x1b[31m",
        "TRUNCATE" => "\x1b[35m",
        _ => "\x1b[36m",
    }
}

/// One change as a JSON line: `stream_seq` and `subject` first, then the document's fields in
/// their order. With `colour`, the first two are dim and the operation is coloured.
pub fn change_line(out: &mut Vec<u8>, stream_seq: u64, subject: &str, doc: &Value, colour: bool) {
    out.push(b'{');
    if colour {
        out.extend_from_slice(DIM.as_bytes());
    }
    out.extend_from_slice(b"\"stream_seq\":");
    out.extend_from_slice(stream_seq.to_string().as_bytes());
    out.extend_from_slice(b",\"subject\":");
    json_str(out, subject);
    if colour {
        out.extend_from_slice(RESET.as_bytes());
    }
    let entries: &[(Value, Value)] = match doc {
        Value::Map(entries) => entries,
        other => {
            // Not a map: shown whole under `payload`, so the line stays an object.
            out.extend_from_slice(b",\"payload\":");
            push_json_value(out, other);
            out.extend_from_slice(b"}\n");
            return;
        }
    };
    for (k, v) in entries {
        out.push(b',');
        push_json_key(out, k);
        match (colour, k.as_str(), v.as_str()) {
            (true, Some(fields::OPERATION), Some(op)) => {
                out.extend_from_slice(operation_colour(op).as_bytes());
                push_json_value(out, v);
                out.extend_from_slice(RESET.as_bytes());
            }
            _ => push_json_value(out, v),
        }
    }
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        Value::Map(vec![
            (Value::from("table"), Value::from("users")),
            (Value::from("operation"), Value::from("INSERT")),
            (Value::from("b"), Value::Binary(vec![0, 1, 2, 255])),
            (Value::from("nan"), Value::F64(f64::NAN)),
            (Value::from("f"), Value::F64(1.5)),
            (Value::from("neg"), Value::from(-7i64)),
            (Value::from("big"), Value::from(u64::MAX)),
            (Value::from("nil"), Value::Nil),
            (
                Value::from("arr"),
                Value::Array(vec![Value::from("a\"\n"), Value::Boolean(true)]),
            ),
        ])
    }

    #[test]
    fn plain_line_is_json_in_field_order() {
        let mut out = Vec::new();
        change_line(&mut out, 42, "cdc.users.insert", &doc(), false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        assert_eq!(
            text.trim_end(),
            r#"{"stream_seq":42,"subject":"cdc.users.insert","table":"users","operation":"INSERT","b":"AAEC/w==","nan":"NaN","f":1.5,"neg":-7,"big":18446744073709551615,"nil":null,"arr":["a\"\u000A",true]}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["big"].as_u64(), Some(u64::MAX));
    }

    #[test]
    fn colour_only_when_asked() {
        let mut out = Vec::new();
        change_line(&mut out, 1, "cdc.users.insert", &doc(), true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\x1b[32m\"INSERT\"\x1b[0m"), "{text}");
        assert!(text.starts_with("{\x1b[2m\"stream_seq\""), "{text}");
    }

    #[test]
    fn json_payloads_keep_their_field_order() {
        let payload = br#"{"table":"t","schema":"public","operation":"DELETE","z":1,"a":2}"#;
        let value = crate::wire::decode::decode(payload).unwrap();
        let mut out = Vec::new();
        change_line(&mut out, 3, "cdc.t.delete", &value, false);
        assert_eq!(
            String::from_utf8(out).unwrap().trim_end(),
            r#"{"stream_seq":3,"subject":"cdc.t.delete","table":"t","schema":"public","operation":"DELETE","z":1,"a":2}"#
        );
    }
}
