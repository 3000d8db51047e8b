//! Golden events per type family, compared with the field layout and value forms of the
//! Debezium PostgreSQL connector's documented events.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{json, Value as J};

use super::values::{
    parse_date, parse_interval, parse_numeric, parse_time, parse_timestamp, zoned_time,
    zoned_timestamp,
};
use super::*;
use crate::pg::value::Value;
use crate::pg::Lsn;
use crate::wire::event::TableRef;
use crate::wire::text::base64;

fn opts(schemas: bool) -> DebeziumOptions {
    DebeziumOptions {
        name: "cdc".into(),
        db: "app".into(),
        schemas,
    }
}

fn meta(name: &str, type_oid: u32, type_modifier: i32, key: bool) -> ColumnMeta {
    ColumnMeta {
        name: Arc::from(name),
        type_oid,
        type_modifier,
        key,
    }
}

/// numeric(12,2): precision 12, scale 2.
const NUMERIC_12_2: i32 = ((12 << 16) | 2) + 4;

/// One column of each type family, `id` the key.
fn table() -> Arc<TableRef> {
    Arc::new(TableRef {
        schema: Arc::from("public"),
        table: Arc::from("all_types"),
        relation_id: 16400,
        columns: vec![
            meta("id", 23, -1, true),
            meta("small", 21, -1, false),
            meta("big", 20, -1, false),
            meta("flag", 16, -1, false),
            meta("ratio", 700, -1, false),
            meta("score", 701, -1, false),
            meta("name", 25, -1, false),
            meta("code", 1043, 44, false),
            meta("data", 17, -1, false),
            meta("balance", 1700, NUMERIC_12_2, false),
            meta("amount", 1700, -1, false),
            meta("cash", 790, -1, false),
            meta("day", 1082, -1, false),
            meta("at", 1083, -1, false),
            meta("at_ms", 1083, 3, false),
            meta("attz", 1266, -1, false),
            meta("ts", 1114, -1, false),
            meta("ts_ms", 1114, 3, false),
            meta("tstz", 1184, -1, false),
            meta("term", 1186, -1, false),
            meta("uid", 2950, -1, false),
            meta("doc", 3802, -1, false),
            meta("addr", 869, -1, false),
            meta("bit1", 1560, 1, false),
            meta("mood", 16_500, -1, false),
            meta("tags", 1009, -1, false),
            meta("nums", 1007, -1, false),
            meta("days", 1182, -1, false),
            meta("big_doc", 25, -1, false),
        ],
        key_columns: vec![Arc::from("id")],
    })
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn row() -> Vec<ColumnValue> {
    let values = vec![
        Value::Int(1),
        Value::Int(-2),
        Value::Int(9_000_000_000),
        Value::Bool(true),
        Value::Float(0.5),
        Value::Float(f64::NAN),
        text("Anne"),
        text("x\"y"),
        Value::Bytes(vec![0, 1, 255]),
        text("-1234.50"),
        text("10.5"),
        text("-$1,234.56"),
        text("2024-02-29"),
        text("04:05:06.789"),
        text("04:05:06.789"),
        text("10:00:00.5+02"),
        text("2025-01-01 10:00:00.123456"),
        text("2025-01-01 10:00:00.123"),
        text("2025-01-01 10:00:00.5+00"),
        text("1 year 2 mons -3 days 04:05:06.5"),
        text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        text("{\"a\": [1, 2]}"),
        text("192.168.0.1/24"),
        text("1"),
        text("happy"),
        Value::Array(vec![text("a"), Value::Null]),
        Value::Array(vec![Value::Int(1), Value::Int(-1)]),
        text("{2024-01-01,NULL}"),
        text("long"),
    ];
    table()
        .columns
        .iter()
        .zip(values)
        .map(|(m, value)| ColumnValue {
            name: Arc::clone(&m.name),
            value,
        })
        .collect()
}

/// The `after` of [`row`], value by value as Debezium writes each family.
fn expected_row() -> J {
    json!({
        "id": 1, "small": -2, "big": 9_000_000_000_i64, "flag": true, "ratio": 0.5,
        "score": "NaN", "name": "Anne", "code": "x\"y", "data": "AAH/",
        // -123450 = 0xFE1DC6 in two's complement.
        "balance": base64(&[0xFE, 0x1D, 0xC6]),
        "amount": {"scale": 1, "value": base64(&[105])},
        "cash": base64(&[0xFE, 0x1D, 0xC0]),
        "day": 19_782,
        "at": 14_706_789_000_i64, "at_ms": 14_706_789,
        "attz": "08:00:00.5Z",
        "ts": 1_735_725_600_123_456_i64, "ts_ms": 1_735_725_600_123_i64,
        "tstz": "2025-01-01T10:00:00.5Z",
        "term": 14 * 2_629_800_000_000_i64 - 3 * 86_400_000_000 + 14_706_500_000,
        "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "doc": "{\"a\": [1, 2]}", "addr": "192.168.0.1/24", "bit1": true, "mood": "happy",
        "tags": ["a", null], "nums": [1, -1], "days": [19_723, null], "big_doc": "long",
    })
}

fn event(operation: Operation) -> ChangeEvent {
    ChangeEvent {
        table: table(),
        operation,
        lsn: Lsn(0x0100_0040),
        commit_lsn: Lsn(0x0100_0080),
        timeline: 1,
        xid: 555,
        // 2025-01-01T00:00:00.25Z in µs since 2000-01-01.
        commit_time: 789_004_800_250_000,
        seq: 0,
        last_in_tx: true,
        columns: row(),
        old_columns: None,
        unchanged_toast: Vec::new(),
    }
}

const NOW_US: i64 = 1_735_689_600_500_000;

fn value_of(ev: &ChangeEvent, schemas: bool) -> J {
    let mut out = Vec::new();
    encode_debezium_value(&opts(schemas), ev, NOW_US, &mut out);
    serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
}

fn key_of(ev: &ChangeEvent, schemas: bool) -> Option<J> {
    let mut out = vec![b'x'];
    let has = encode_debezium_key(&opts(schemas), ev, &mut out);
    assert_eq!(has, !out.is_empty());
    has.then(|| serde_json::from_slice(&out).unwrap())
}

#[test]
fn insert_is_a_create_event_with_the_documented_source_block() {
    let v = value_of(&event(Operation::Insert), false);
    assert_eq!(v["before"], J::Null);
    assert_eq!(v["after"], expected_row());
    assert_eq!(v["op"], "c");
    assert_eq!(v["transaction"], J::Null);
    assert_eq!(v["ts_ms"], NOW_US / 1000);
    assert_eq!(v["ts_us"], NOW_US);
    assert_eq!(v["ts_ns"], NOW_US * 1000);
    let source = json!({
        "version": env!("CARGO_PKG_VERSION"), "connector": "postgresql", "name": "cdc",
        "ts_ms": 1_735_689_600_250_i64, "snapshot": "false", "db": "app",
        "sequence": "[\"16777344\",\"16777280\"]",
        "ts_us": 1_735_689_600_250_000_i64, "ts_ns": 1_735_689_600_250_000_000_i64,
        "schema": "public", "table": "all_types", "txId": 555, "lsn": 16_777_280, "xmin": null,
    });
    assert_eq!(v["source"], source);
    let mut out = Vec::new();
    encode_debezium_value(&opts(false), &event(Operation::Insert), NOW_US, &mut out);
    assert_in_order(
        &out,
        &[
            "{\"before\":",
            ",\"after\":",
            ",\"source\":",
            ",\"transaction\":",
            ",\"op\":",
        ],
    );
}

/// The fields appear in this order in the encoded text (JSON maps read back sorted).
fn assert_in_order(out: &[u8], parts: &[&str]) {
    let text = String::from_utf8_lossy(out);
    let mut at = 0;
    for part in parts {
        match text[at..].find(part) {
            Some(i) => at += i + part.len(),
            None => panic!("{part} not after byte {at} in {text}"),
        }
    }
}

#[test]
fn update_without_old_values_has_a_null_before_and_placeholders_for_unchanged_toast() {
    let mut ev = event(Operation::Update);
    ev.columns.retain(|c| &*c.name != "big_doc");
    ev.unchanged_toast = vec![Arc::from("big_doc")];
    let v = value_of(&ev, false);
    assert_eq!(v["op"], "u");
    assert_eq!(v["before"], J::Null);
    let mut after = expected_row();
    after["big_doc"] = json!(UNAVAILABLE_VALUE);
    assert_eq!(v["after"], after);
}

#[test]
fn unchanged_toast_placeholders_follow_the_column_type() {
    let mut ev = event(Operation::Update);
    let toasted = ["data", "tags", "nums", "days", "doc"];
    ev.columns.retain(|c| !toasted.contains(&&*c.name));
    ev.unchanged_toast = toasted.iter().map(|&n| Arc::from(n)).collect();
    let v = value_of(&ev, false);
    assert_eq!(
        v["after"]["data"],
        json!(base64(UNAVAILABLE_VALUE.as_bytes()))
    );
    assert_eq!(v["after"]["tags"], json!([UNAVAILABLE_VALUE]));
    let bytes: Vec<u8> = UNAVAILABLE_VALUE.bytes().collect();
    assert_eq!(v["after"]["nums"], json!(bytes));
    assert_eq!(v["after"]["days"], json!([UNAVAILABLE_VALUE]));
    assert_eq!(v["after"]["doc"], json!(UNAVAILABLE_VALUE));
}

/// The old key only: the key columns, every other column null (REPLICA IDENTITY DEFAULT).
fn old_key() -> Vec<ColumnValue> {
    vec![ColumnValue {
        name: Arc::from("id"),
        value: Value::Int(7),
    }]
}

fn key_only_row(id: i64) -> J {
    let mut row = expected_row();
    for (name, v) in row.as_object_mut().unwrap() {
        *v = if name == "id" { json!(id) } else { J::Null };
    }
    row
}

#[test]
fn update_of_the_key_carries_the_old_key_in_before() {
    let mut ev = event(Operation::Update);
    ev.old_columns = Some(old_key());
    let v = value_of(&ev, false);
    assert_eq!(v["before"], key_only_row(7));
    assert_eq!(v["after"], expected_row());
    assert_eq!(key_of(&ev, false), Some(json!({"id": 1})));
}

#[test]
fn update_with_replica_identity_full_carries_the_old_row() {
    let mut ev = event(Operation::Update);
    ev.old_columns = Some(row());
    assert_eq!(value_of(&ev, false)["before"], expected_row());
}

#[test]
fn delete_has_the_old_key_in_before_and_no_after() {
    let mut ev = event(Operation::Delete);
    ev.columns = old_key();
    ev.old_columns = Some(old_key());
    let v = value_of(&ev, false);
    assert_eq!(v["op"], "d");
    assert_eq!(v["before"], key_only_row(7));
    assert_eq!(v["after"], J::Null);
    assert_eq!(key_of(&ev, false), Some(json!({"id": 7})));
}

#[test]
fn truncate_has_neither_row_nor_key() {
    let mut ev = event(Operation::Truncate);
    ev.columns.clear();
    let v = value_of(&ev, false);
    assert_eq!(v["op"], "t");
    assert_eq!((&v["before"], &v["after"]), (&J::Null, &J::Null));
    assert_eq!(key_of(&ev, false), None);
}

#[test]
fn a_table_without_key_columns_has_no_key() {
    let mut ev = event(Operation::Insert);
    let mut t = (*ev.table).clone();
    t.columns.iter_mut().for_each(|c| c.key = false);
    ev.table = Arc::new(t);
    assert_eq!(key_of(&ev, true), None);
}

#[test]
fn composite_keys_list_their_columns_in_table_order() {
    let mut ev = event(Operation::Insert);
    let mut t = (*ev.table).clone();
    t.columns[6].key = true;
    ev.table = Arc::new(t);
    assert_eq!(key_of(&ev, false), Some(json!({"id": 1, "name": "Anne"})));
}

#[test]
fn schemas_wrap_the_payload_and_describe_each_column() {
    let ev = event(Operation::Insert);
    let plain = value_of(&ev, false);
    let v = value_of(&ev, true);
    assert_eq!(v["payload"], plain);
    let schema = &v["schema"];
    assert_eq!(schema["name"], "cdc.public.all_types.Envelope");
    let fields: Vec<&str> = schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "before",
            "after",
            "source",
            "transaction",
            "op",
            "ts_ms",
            "ts_us",
            "ts_ns"
        ]
    );
    let after = &schema["fields"][1];
    assert_eq!(after["name"], "cdc.public.all_types.Value");
    assert_eq!(after["optional"], true);
    let column = |name: &str| -> J {
        after["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["field"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no field {name}"))
    };
    assert_eq!(
        column("id"),
        json!({"type": "int32", "optional": false, "field": "id"})
    );
    assert_eq!(
        column("balance"),
        json!({"type": "bytes", "optional": true, "name": "org.apache.kafka.connect.data.Decimal",
               "version": 1, "parameters": {"scale": "2", "connect.decimal.precision": "12"},
               "field": "balance"})
    );
    assert_eq!(
        column("amount")["name"],
        "io.debezium.data.VariableScaleDecimal"
    );
    assert_eq!(column("day")["name"], "io.debezium.time.Date");
    assert_eq!(column("at")["name"], "io.debezium.time.MicroTime");
    assert_eq!(column("at_ms")["name"], "io.debezium.time.Time");
    assert_eq!(column("ts")["name"], "io.debezium.time.MicroTimestamp");
    assert_eq!(column("ts_ms")["name"], "io.debezium.time.Timestamp");
    assert_eq!(column("tstz")["name"], "io.debezium.time.ZonedTimestamp");
    assert_eq!(column("attz")["name"], "io.debezium.time.ZonedTime");
    assert_eq!(column("term")["name"], "io.debezium.time.MicroDuration");
    assert_eq!(column("doc")["name"], "io.debezium.data.Json");
    assert_eq!(column("uid")["name"], "io.debezium.data.Uuid");
    assert_eq!(column("ratio")["type"], "float");
    assert_eq!(column("score")["type"], "double");
    assert_eq!(column("bit1")["type"], "boolean");
    assert_eq!(
        column("tags"),
        json!({"type": "array", "items": {"type": "string", "optional": true},
               "optional": true, "field": "tags"})
    );
    assert_eq!(
        schema["fields"][2]["name"],
        "io.debezium.connector.postgresql.Source"
    );
    // Every schema field has a payload field and the other way round, in table order.
    let payload_fields: Vec<&String> = plain["after"].as_object().unwrap().keys().collect();
    let mut schema_fields: Vec<&str> = after["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    let t = table();
    let names: Vec<&str> = t.columns.iter().map(|c| &*c.name).collect();
    assert_eq!(schema_fields, names);
    schema_fields.sort_unstable();
    assert_eq!(payload_fields, schema_fields);
}

#[test]
fn schemas_wrap_the_key() {
    let key = key_of(&event(Operation::Insert), true).unwrap();
    assert_eq!(
        key,
        json!({"schema": {"type": "struct",
                          "fields": [{"type": "int32", "optional": false, "field": "id"}],
                          "optional": false, "name": "cdc.public.all_types.Key"},
               "payload": {"id": 1}})
    );
}

#[test]
fn with_replica_identity_full_no_column_is_required() {
    let mut ev = event(Operation::Insert);
    let mut t = (*ev.table).clone();
    t.columns.iter_mut().for_each(|c| c.key = true);
    ev.table = Arc::new(t);
    let v = value_of(&ev, true);
    let fields = v["schema"]["fields"][1]["fields"].as_array().unwrap();
    assert!(fields.iter().all(|f| f["optional"] == true), "{fields:?}");
    let key = key_of(&ev, true).unwrap();
    let fields = key["schema"]["fields"].as_array().unwrap();
    assert_eq!(fields.len(), ev.table.columns.len());
    assert!(fields.iter().all(|f| f["optional"] == true), "{fields:?}");
}

#[test]
fn events_without_column_metadata_write_the_values_as_they_are() {
    let mut ev = event(Operation::Insert);
    let mut t = (*ev.table).clone();
    t.columns.clear();
    ev.table = Arc::new(t);
    let v = value_of(&ev, false);
    assert_eq!(v["after"]["balance"], "-1234.50");
    assert_eq!(v["after"]["id"], 1);
}

/// The unscaled value of a numeric, as Kafka Connect's `Decimal` holds it.
fn decimal_b64(text: &str, scale: i32) -> String {
    let mut out = Vec::new();
    let meta = meta("n", 1700, ((20 << 16) | scale) + 4, false);
    values::push_mapped(
        values::mapping(meta.type_oid, meta.type_modifier),
        &Value::Text(text.into()),
        &mut out,
    );
    serde_json::from_slice::<String>(&out).unwrap()
}

/// Java's `BigInteger.toByteArray` for an `i128`.
fn java_bytes(v: i128) -> Vec<u8> {
    let all = v.to_be_bytes();
    let mut start = 0;
    while start < 15 {
        let (b, next) = (all[start], all[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    all[start..].to_vec()
}

#[test]
fn decimals_are_big_endian_twos_complement() {
    for (text, bytes) in [
        ("0.00", vec![0]),
        ("1.23", vec![123]),
        ("-0.01", vec![0xFF]),
        ("1.28", vec![0, 0x80]),
        ("-1.28", vec![0x80]),
        ("-1.29", vec![0xFF, 0x7F]),
        ("655.35", vec![0, 0xFF, 0xFF]),
    ] {
        assert_eq!(decimal_b64(text, 2), base64(&bytes), "{text}");
    }
    // NaN and the infinities have no Decimal form.
    let mut out = Vec::new();
    values::push_mapped(values::mapping(1700, NUMERIC_12_2), &text("NaN"), &mut out);
    assert_eq!(out, b"null");
    assert_eq!(parse_numeric("Infinity"), None);
}

proptest! {
    #[test]
    fn decimal_bytes_match_java(v in any::<i64>(), wide in any::<bool>()) {
        let v = if wide { i128::from(v) * 1_000_000_007 } else { i128::from(v) };
        let text = format!("{}{}.{:02}", if v < 0 { "-" } else { "" }, v.unsigned_abs() / 100, v.unsigned_abs() % 100);
        prop_assert_eq!(decimal_b64(&text, 2), base64(&java_bytes(v)));
    }
}

#[test]
fn dates_times_and_timestamps() {
    assert_eq!(parse_date("1970-01-01"), Some(0));
    assert_eq!(parse_date("1969-12-31"), Some(-1));
    // 1 BC is year 0, a leap year: 366 days before 0001-01-01 (day -719 162).
    assert_eq!(parse_date("0001-01-01 BC"), Some(-719_528));
    assert_eq!(parse_date("infinity"), None);
    assert_eq!(parse_time("24:00:00"), Some(86_400_000_000));
    assert_eq!(parse_time("00:00:00.000001"), Some(1));
    assert_eq!(parse_timestamp("1969-12-31 23:59:59.5"), Some(-500_000));
    assert_eq!(parse_timestamp("-infinity"), None);
    assert_eq!(
        zoned_timestamp("2025-01-01 00:30:00+05:30").as_deref(),
        Some("2024-12-31T19:00:00Z")
    );
    assert_eq!(
        zoned_timestamp("2025-01-01 00:00:00.12+00").as_deref(),
        Some("2025-01-01T00:00:00.12Z")
    );
    assert_eq!(zoned_timestamp("infinity"), None);
    assert_eq!(zoned_time("01:00:00-02").as_deref(), Some("03:00:00Z"));
    assert_eq!(
        zoned_time("01:00:00.25+02").as_deref(),
        Some("23:00:00.25Z")
    );
}

#[test]
fn intervals_count_a_month_as_30_4375_days() {
    assert_eq!(parse_interval("00:00:00"), Some(0));
    assert_eq!(parse_interval("1 mon"), Some(2_629_800_000_000));
    assert_eq!(parse_interval("1 year"), Some(12 * 2_629_800_000_000));
    assert_eq!(
        parse_interval("-1 days +02:00:00.25"),
        Some(-86_400_000_000 + 7_200_250_000)
    );
    assert_eq!(parse_interval("-00:00:01.5"), Some(-1_500_000));
    assert_eq!(parse_interval("5 days 15:00:01.25"), Some(486_001_250_000));
    assert_eq!(parse_interval("P1D"), None);
}

#[test]
fn op_codes() {
    let codes: Vec<&str> = [
        Operation::Insert,
        Operation::Update,
        Operation::Delete,
        Operation::Truncate,
    ]
    .into_iter()
    .map(op_code)
    .collect();
    assert_eq!(codes, ["c", "u", "d", "t"]);
}
