//! The `schema` part of Debezium's JSON converter with `schemas.enable=true`: the Kafka
//! Connect schema of the record value (the envelope) and of the record key.

use super::values::{mapping, Scalar};
use super::DebeziumOptions;
use crate::wire::encode::json::json_str;
use crate::wire::event::{ColumnMeta, TableRef};

/// The source block's schema, as Debezium's PostgreSQL connector declares it.
const SOURCE_SCHEMA: &str = concat!(
    r#"{"type":"struct","fields":["#,
    r#"{"type":"string","optional":false,"field":"version"},"#,
    r#"{"type":"string","optional":false,"field":"connector"},"#,
    r#"{"type":"string","optional":false,"field":"name"},"#,
    r#"{"type":"int64","optional":false,"field":"ts_ms"},"#,
    r#"{"type":"string","optional":true,"name":"io.debezium.data.Enum","version":1,"parameters":{"allowed":"true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},"default":"false","field":"snapshot"},"#,
    r#"{"type":"string","optional":false,"field":"db"},"#,
    r#"{"type":"string","optional":true,"field":"sequence"},"#,
    r#"{"type":"int64","optional":true,"field":"ts_us"},"#,
    r#"{"type":"int64","optional":true,"field":"ts_ns"},"#,
    r#"{"type":"string","optional":false,"field":"schema"},"#,
    r#"{"type":"string","optional":false,"field":"table"},"#,
    r#"{"type":"int64","optional":true,"field":"txId"},"#,
    r#"{"type":"int64","optional":true,"field":"lsn"},"#,
    r#"{"type":"int64","optional":true,"field":"xmin"}"#,
    r#"],"optional":false,"name":"io.debezium.connector.postgresql.Source","field":"source"}"#,
);

/// The transaction block's schema (the block itself is always null: no transaction
/// metadata is written).
const TRANSACTION_SCHEMA: &str = concat!(
    r#"{"type":"struct","fields":["#,
    r#"{"type":"string","optional":false,"field":"id"},"#,
    r#"{"type":"int64","optional":false,"field":"total_order"},"#,
    r#"{"type":"int64","optional":false,"field":"data_collection_order"}"#,
    r#"],"optional":true,"name":"event.block","version":1,"field":"transaction"}"#,
);

/// The envelope's fields after `source` and `transaction`.
const TAIL_SCHEMA: &str = concat!(
    r#"{"type":"string","optional":false,"field":"op"},"#,
    r#"{"type":"int64","optional":true,"field":"ts_ms"},"#,
    r#"{"type":"int64","optional":true,"field":"ts_us"},"#,
    r#"{"type":"int64","optional":true,"field":"ts_ns"}"#,
);

/// `{name}.{schema}.{table}.{suffix}`.
fn record_name(opts: &DebeziumOptions, table: &TableRef, suffix: &str) -> String {
    format!("{}.{}.{}.{suffix}", opts.name, table.schema, table.table)
}

/// Appends the record value's schema.
pub(super) fn push_value_schema(opts: &DebeziumOptions, table: &TableRef, out: &mut Vec<u8>) {
    let row_name = record_name(opts, table, "Value");
    out.extend_from_slice(br#"{"type":"struct","fields":["#);
    for field in ["before", "after"] {
        push_row_schema(&table.columns, |_| true, &row_name, true, out);
        out.pop();
        out.extend_from_slice(br#","field":"#);
        json_str(out, field);
        out.extend_from_slice(b"},");
    }
    out.extend_from_slice(SOURCE_SCHEMA.as_bytes());
    out.push(b',');
    out.extend_from_slice(TRANSACTION_SCHEMA.as_bytes());
    out.push(b',');
    out.extend_from_slice(TAIL_SCHEMA.as_bytes());
    out.extend_from_slice(br#"],"optional":false,"name":"#);
    json_str(out, &record_name(opts, table, "Envelope"));
    out.extend_from_slice(br#","version":2}"#);
}

/// Appends the record key's schema.
pub(super) fn push_key_schema(opts: &DebeziumOptions, table: &TableRef, out: &mut Vec<u8>) {
    let name = record_name(opts, table, "Key");
    push_row_schema(&table.columns, |c| c.key, &name, false, out);
}

/// A struct of the columns `keep` selects. Key columns are required, the others optional
/// (the Relation message does not say which columns allow NULL). When every column is a key
/// column (`REPLICA IDENTITY FULL`, which marks them all) none is required: NULLs are allowed.
fn push_row_schema(
    columns: &[ColumnMeta],
    keep: impl Fn(&ColumnMeta) -> bool,
    name: &str,
    optional: bool,
    out: &mut Vec<u8>,
) {
    let all_key = columns.iter().all(|c| c.key);
    let required = |c: &ColumnMeta| c.key && !all_key;
    out.extend_from_slice(br#"{"type":"struct","fields":["#);
    let mut first = true;
    for c in columns.iter().filter(|c| keep(c)) {
        if !first {
            out.push(b',');
        }
        first = false;
        let m = mapping(c.type_oid, c.type_modifier);
        if m.array {
            out.extend_from_slice(br#"{"type":"array","items":"#);
            push_scalar_schema(m.scalar, true, out);
            out.pop();
            out.push(b'}');
            out.extend_from_slice(if required(c) {
                br#","optional":false"#
            } else {
                br#","optional":true"#
            });
        } else {
            push_scalar_schema(m.scalar, !required(c), out);
            out.pop();
        }
        out.extend_from_slice(br#","field":"#);
        json_str(out, &c.name);
        out.push(b'}');
    }
    out.extend_from_slice(br#"],"optional":"#);
    out.extend_from_slice(if optional { b"true" } else { b"false" });
    out.extend_from_slice(br#","name":"#);
    json_str(out, name);
    out.push(b'}');
}

/// One value's schema, a complete object (callers drop its `}` to add fields).
fn push_scalar_schema(scalar: Scalar, optional: bool, out: &mut Vec<u8>) {
    let (ty, name, params): (&str, Option<&str>, String) = match scalar {
        Scalar::Bool => ("boolean", None, String::new()),
        Scalar::Int16 => ("int16", None, String::new()),
        Scalar::Int32 => ("int32", None, String::new()),
        Scalar::Int64 => ("int64", None, String::new()),
        Scalar::Float32 => ("float", None, String::new()),
        Scalar::Float64 => ("double", None, String::new()),
        Scalar::Text(name) => ("string", name, String::new()),
        Scalar::Bytes => ("bytes", None, String::new()),
        Scalar::Decimal { precision, scale } => (
            "bytes",
            Some("org.apache.kafka.connect.data.Decimal"),
            format!(
                r#","parameters":{{"scale":"{scale}","connect.decimal.precision":"{precision}"}}"#
            ),
        ),
        Scalar::Money => (
            "bytes",
            Some("org.apache.kafka.connect.data.Decimal"),
            r#","parameters":{"scale":"2"}"#.to_owned(),
        ),
        Scalar::VariableDecimal => {
            out.extend_from_slice(br#"{"type":"struct","fields":[{"type":"int32","optional":false,"field":"scale"},{"type":"bytes","optional":false,"field":"value"}],"optional":"#);
            out.extend_from_slice(if optional { b"true" } else { b"false" });
            out.extend_from_slice(
                br#","name":"io.debezium.data.VariableScaleDecimal","version":1,"doc":"Variable scaled decimal"}"#,
            );
            return;
        }
        Scalar::Date => ("int32", Some("io.debezium.time.Date"), String::new()),
        Scalar::TimeMillis => ("int32", Some("io.debezium.time.Time"), String::new()),
        Scalar::TimeMicros => ("int64", Some("io.debezium.time.MicroTime"), String::new()),
        Scalar::TimestampMillis => ("int64", Some("io.debezium.time.Timestamp"), String::new()),
        Scalar::TimestampMicros => (
            "int64",
            Some("io.debezium.time.MicroTimestamp"),
            String::new(),
        ),
        Scalar::ZonedTimestamp => (
            "string",
            Some("io.debezium.time.ZonedTimestamp"),
            String::new(),
        ),
        Scalar::ZonedTime => ("string", Some("io.debezium.time.ZonedTime"), String::new()),
        Scalar::MicroDuration => (
            "int64",
            Some("io.debezium.time.MicroDuration"),
            String::new(),
        ),
    };
    out.extend_from_slice(br#"{"type":"#);
    json_str(out, ty);
    out.extend_from_slice(br#","optional":"#);
    out.extend_from_slice(if optional { b"true" } else { b"false" });
    if let Some(name) = name {
        out.extend_from_slice(br#","name":"#);
        json_str(out, name);
        out.extend_from_slice(br#","version":1"#);
    }
    out.extend_from_slice(params.as_bytes());
    out.push(b'}');
}
