//! The JSON encoders: change events and values, and decoded messages shown as JSON.

use std::io::Write as _;

use super::msgpack::written;
use super::{has_old_columns, CommitFields};
use rmpv::Value as Mp;

use crate::pg::value::Value;
use crate::pg::Lsn;
use crate::wire::event::{ChangeEvent, ColumnValue};
use crate::wire::text::{decimal, push_base64};

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

pub(super) fn json_change(event: &ChangeEvent, commit: CommitFields<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"table\":");
    json_str(out, &event.table.table);
    out.extend_from_slice(b",\"schema\":");
    json_str(out, &event.table.schema);
    out.extend_from_slice(b",\"operation\":");
    json_str(out, event.operation.as_upper());
    out.extend_from_slice(b",\"relation_id\":");
    json_u64(out, u64::from(event.table.relation_id));
    let mut lsn = [0; Lsn::TEXT_MAX_LEN];
    out.extend_from_slice(b",\"lsn\":");
    json_ascii(out, event.lsn.ascii(&mut lsn));
    out.extend_from_slice(b",\"commit_lsn\":");
    json_ascii(out, commit.lsn);
    out.extend_from_slice(b",\"xid\":");
    json_u64(out, u64::from(event.xid));
    out.extend_from_slice(b",\"commit_time\":");
    json_ascii(out, commit.time);
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

pub(super) fn json_value(value: &Value, out: &mut Vec<u8>) {
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

pub(super) fn json_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(decimal(v, &mut [0u8; 20]));
}

/// A JSON string of text that needs no escaping (LSNs, timestamps: digits and separators).
fn json_ascii(out: &mut Vec<u8>, ascii: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(ascii);
    out.push(b'"');
}

/// Appends `x` as a JSON number, or as the string `"NaN"`, `"Infinity"` or `"-Infinity"`.
pub fn json_f64(out: &mut Vec<u8>, x: f64) {
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
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    json_utf8(out, s.as_bytes());
}

/// [`json_str`] of bytes the caller knows to be valid UTF-8 (a snapshot's ASCII fields).
pub(super) fn json_utf8(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
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

/// Appends a decoded message `value` as JSON, as the JSON format writes it: map entries in
/// their order, binary as base64, non-finite floats as strings (for showing messages of
/// either format the same way).
pub fn push_json_value(out: &mut Vec<u8>, value: &Mp) {
    match value {
        Mp::Nil => out.extend_from_slice(b"null"),
        Mp::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Mp::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Mp::F32(f) => json_f64(out, f64::from(*f)),
        Mp::F64(f) => json_f64(out, *f),
        Mp::String(s) => match s.as_str() {
            Some(s) => json_str(out, s),
            None => {
                json_str(out, &String::from_utf8_lossy(s.as_bytes()));
            }
        },
        Mp::Binary(b) => {
            out.push(b'"');
            push_base64(out, b);
            out.push(b'"');
        }
        Mp::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_json_value(out, item);
            }
            out.push(b']');
        }
        Mp::Map(entries) => {
            out.push(b'{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_json_key(out, k);
                push_json_value(out, v);
            }
            out.push(b'}');
        }
        Mp::Ext(_, data) => {
            out.push(b'"');
            push_base64(out, data);
            out.push(b'"');
        }
    }
}

/// Appends a map key and its `:`: strings as they are, anything else as its JSON text in a string.
pub fn push_json_key(out: &mut Vec<u8>, key: &Mp) {
    match key.as_str() {
        Some(k) => json_str(out, k),
        None => {
            let mut text = Vec::new();
            push_json_value(&mut text, key);
            json_str(out, &String::from_utf8_lossy(&text));
        }
    }
    out.push(b':');
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

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

    fn any_float() -> impl Strategy<Value = f64> {
        super::super::tests::any_float()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

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
        fn json_strings_read_back(text in any::<String>()) {
            let mut out = Vec::new();
            json_str(&mut out, &text);
            prop_assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), text);
        }
    }
}
