//! Message values as SQLite values: how each column kind is stored, and whether a value still
//! fits its column. Reading the messages themselves is [`crate::wire::decode`].

use rmpv::Value;
use rusqlite::types::Value as Sql;

use crate::wire::text::{base64, base64_decode};

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
        Value::Binary(b) => J::String(base64(b)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode::{decode, field};

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
}
