//! The encoders against an independent model of what a consumer decodes.

use std::fmt;
use std::sync::Arc;

use proptest::prelude::*;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::*;
use crate::pg::Lsn;
use crate::wire::event::{ColumnValue, Operation, TableRef};
use crate::wire::fields;
use crate::wire::text::tests::base64_reference;
use crate::wire::text::{format_timestamp, TIMESTAMP_LEN};

#[test]
fn documents_in_both_formats() {
    let doc = serde_json::json!({"a": [1, -2, 1.5, null, true], "b": "x"});
    let mut out = Vec::new();
    encode_document(Format::Json, &doc, &mut out);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
        doc
    );
    encode_document(Format::Msgpack, &doc, &mut out);
    let mp = rmpv::decode::read_value(&mut out.as_slice()).unwrap();
    assert_eq!(mp.as_map().unwrap()[1].1.as_str(), Some("x"));
    assert_eq!(
        mp.as_map().unwrap()[0].1.as_array().unwrap()[1].as_i64(),
        Some(-2)
    );
}

// ---- An independent model of a decoded message ----

/// A decoded message: what a consumer sees, with map keys in wire order and floats as
/// bits so NaN compares equal to itself.
#[derive(Debug, Clone, PartialEq)]
enum M {
    Nil,
    Bool(bool),
    Int(i128),
    Float(u64),
    Str(String),
    Bin(Vec<u8>),
    Arr(Vec<M>),
    Map(Vec<(String, M)>),
}

fn s(x: &str) -> M {
    M::Str(x.to_owned())
}

fn decode_msgpack(bytes: &[u8]) -> M {
    let mut rd = bytes;
    let v = rmpv::decode::read_value(&mut rd).expect("valid MessagePack");
    assert!(rd.is_empty(), "{} trailing bytes", rd.len());
    from_rmpv(v)
}

fn from_rmpv(v: rmpv::Value) -> M {
    use rmpv::Value as V;
    match v {
        V::Nil => M::Nil,
        V::Boolean(b) => M::Bool(b),
        V::Integer(i) => M::Int(
            i.as_i64()
                .map(i128::from)
                .or(i.as_u64().map(i128::from))
                .unwrap(),
        ),
        V::F64(x) => M::Float(x.to_bits()),
        V::String(s) => M::Str(s.into_str().expect("valid UTF-8 str")),
        V::Binary(b) => M::Bin(b),
        V::Array(items) => M::Arr(items.into_iter().map(from_rmpv).collect()),
        V::Map(entries) => M::Map(
            entries
                .into_iter()
                .map(|(k, v)| (k.as_str().expect("string key").to_owned(), from_rmpv(v)))
                .collect(),
        ),
        other => panic!("unexpected MessagePack value {other:?}"),
    }
}

/// JSON read by serde_json into the model, keeping key order (serde_json::Value sorts
/// keys). Duplicate keys show up as such.
struct Ordered(M);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OrderedVisitor)
    }
}

struct OrderedVisitor;

impl<'de> Visitor<'de> for OrderedVisitor {
    type Value = Ordered;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Ordered, E> {
        Ok(Ordered(M::Nil))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Ordered, E> {
        Ok(Ordered(M::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Ordered, E> {
        Ok(Ordered(M::Int(v.into())))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Ordered, E> {
        Ok(Ordered(M::Int(v.into())))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Ordered, E> {
        Ok(Ordered(M::Float(v.to_bits())))
    }
    fn visit_str<E>(self, v: &str) -> Result<Ordered, E> {
        Ok(Ordered(s(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ordered, A::Error> {
        let mut items = Vec::new();
        while let Some(Ordered(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Ordered(M::Arr(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, Ordered(v))) = map.next_entry::<String, Ordered>()? {
            entries.push((k, v));
        }
        Ok(Ordered(M::Map(entries)))
    }
}

fn decode_json(bytes: &[u8]) -> M {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .unwrap_or_else(|e| panic!("invalid JSON ({e}): {}", String::from_utf8_lossy(bytes)));
    serde_json::from_slice::<Ordered>(bytes).unwrap().0
}

/// What a consumer should decode from `event` (the contract in the module docs), built straight from the
/// event without the encoder.
fn expected(event: &ChangeEvent, json: bool) -> M {
    let columns = |cols: &[ColumnValue]| {
        M::Arr(
            cols.iter()
                .map(|c| {
                    M::Map(vec![
                        (fields::NAME.into(), s(&c.name)),
                        (fields::VALUE.into(), expected_value(&c.value, json)),
                    ])
                })
                .collect(),
        )
    };
    let mut time = [0; TIMESTAMP_LEN];
    let mut m = vec![
        (fields::TABLE, s(&event.table.table)),
        (fields::SCHEMA, s(&event.table.schema)),
        (fields::OPERATION, s(event.operation.as_upper())),
        (fields::RELATION_ID, M::Int(event.table.relation_id.into())),
        (fields::LSN, s(&event.lsn.to_string())),
        (fields::COMMIT_LSN, s(&event.commit_lsn.to_string())),
        (fields::XID, M::Int(event.xid.into())),
        (
            fields::COMMIT_TIME,
            s(format_timestamp(event.commit_time, &mut time)),
        ),
        (fields::SEQ, M::Int(event.seq.into())),
        (fields::LAST_IN_TX, M::Bool(event.last_in_tx)),
        (fields::COLUMNS, columns(&event.columns)),
    ];
    if matches!(event.operation, Operation::Update | Operation::Delete)
        || event.old_columns.is_some()
    {
        let old = event.old_columns.as_deref().map_or(M::Nil, columns);
        m.push((fields::OLD_COLUMNS, old));
    }
    m.push((
        fields::UNCHANGED_TOAST,
        M::Arr(event.unchanged_toast.iter().map(|n| s(n)).collect()),
    ));
    M::Map(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn expected_value(v: &Value, json: bool) -> M {
    match v {
        Value::Null => M::Nil,
        Value::Bool(b) => M::Bool(*b),
        Value::Int(n) => M::Int((*n).into()),
        Value::Float(x) if json && x.is_nan() => s("NaN"),
        Value::Float(x) if json && x.is_infinite() => {
            s(if *x > 0.0 { "Infinity" } else { "-Infinity" })
        }
        Value::Float(x) => M::Float(x.to_bits()),
        Value::Text(t) => s(t),
        Value::Bytes(b) if json => M::Str(base64_reference(b)),
        Value::Bytes(b) => M::Bin(b.clone()),
        Value::Array(items) => M::Arr(items.iter().map(|i| expected_value(i, json)).collect()),
    }
}

fn encode(format: Format, event: &ChangeEvent) -> Vec<u8> {
    let mut out = Vec::new();
    encode_change(format, event, &mut out);
    out
}

/// Field `key` of a decoded map.
fn field<'a>(m: &'a M, key: &str) -> &'a M {
    let M::Map(entries) = m else {
        panic!("not a map: {m:?}")
    };
    &entries.iter().find(|(k, _)| k == key).unwrap().1
}

fn keys(m: &M) -> Vec<&str> {
    let M::Map(entries) = m else {
        panic!("not a map: {m:?}")
    };
    entries.iter().map(|(k, _)| k.as_str()).collect()
}

// ---- Sample events ----

fn col(name: &str, value: Value) -> ColumnValue {
    ColumnValue {
        name: Arc::from(name),
        value,
    }
}

fn table(schema: &str, name: &str, relation_id: u32) -> Arc<TableRef> {
    Arc::new(TableRef {
        columns: Vec::new(),
        schema: Arc::from(schema),
        table: Arc::from(name),
        relation_id,
        key_columns: Vec::new(),
    })
}

/// 2025-12-10T10:30:00.123456Z in µs since 2000-01-01.
const SAMPLE_TIME: i64 = 818_677_800_123_456;

const UNICODE: &str = "héllo ✓ 😀 \"q\" back\\slash\n\t\u{1}\u{1f}\u{7f}\u{2028}";

fn insert_every_kind() -> ChangeEvent {
    ChangeEvent {
        table: table("public", "users", 16384),
        operation: Operation::Insert,
        lsn: Lsn(0x025C_B3C8),
        commit_lsn: Lsn(0x025C_B5E8),
        timeline: 1,
        xid: 742,
        commit_time: SAMPLE_TIME,
        seq: 0,
        last_in_tx: false,
        columns: vec![
            col("id", Value::Int(1)),
            col("big", Value::Int(i64::MAX)),
            col("small", Value::Int(i64::MIN)),
            col("neg", Value::Int(-1)),
            col("f", Value::Float(1.5)),
            col("integral", Value::Float(3.0)),
            col("tiny", Value::Float(5e-324)),
            col("huge", Value::Float(f64::MAX)),
            col("negzero", Value::Float(-0.0)),
            col("nan", Value::Float(f64::NAN)),
            col("pinf", Value::Float(f64::INFINITY)),
            col("ninf", Value::Float(f64::NEG_INFINITY)),
            col("yes", Value::Bool(true)),
            col("no", Value::Bool(false)),
            col("bytes", Value::Bytes(vec![0, 1, 0, 0xff, 0])),
            col("nobytes", Value::Bytes(vec![])),
            col("text", Value::Text(UNICODE.to_owned())),
            col("empty", Value::Text(String::new())),
            col("null", Value::Null),
            col("none", Value::Array(vec![])),
            col(
                "ints",
                Value::Array(vec![Value::Int(1), Value::Null, Value::Int(-3)]),
            ),
            col(
                "floats",
                Value::Array(vec![Value::Float(f64::NAN), Value::Float(-0.5)]),
            ),
            col(
                "texts",
                Value::Array(vec![Value::Text("a,b".into()), Value::Null]),
            ),
            col(
                "blobs",
                Value::Array(vec![Value::Bytes(vec![0]), Value::Null]),
            ),
            col("名前", Value::Text("値".into())),
        ],
        old_columns: None,
        unchanged_toast: vec![],
    }
}

fn update_with_old() -> ChangeEvent {
    ChangeEvent {
        table: table("sales", "invoices", 16500),
        operation: Operation::Update,
        lsn: Lsn(0x1_0000_0000),
        commit_lsn: Lsn(u64::MAX),
        timeline: 1,
        xid: u32::MAX,
        commit_time: -1,
        seq: u32::MAX,
        last_in_tx: true,
        columns: vec![col("id", Value::Int(7)), col("total", Value::Float(9.99))],
        old_columns: Some(vec![col("id", Value::Int(6))]),
        unchanged_toast: vec![Arc::from("body"), Arc::from("attachments")],
    }
}

fn update_without_old() -> ChangeEvent {
    ChangeEvent {
        old_columns: None,
        unchanged_toast: vec![],
        ..update_with_old()
    }
}

fn delete() -> ChangeEvent {
    ChangeEvent {
        table: table("public", "users", 16384),
        operation: Operation::Delete,
        lsn: Lsn(0),
        commit_lsn: Lsn(0x0_0000_00F0),
        timeline: 1,
        xid: 0,
        commit_time: 0,
        seq: 3,
        last_in_tx: false,
        columns: vec![col("id", Value::Int(1))],
        old_columns: None,
        unchanged_toast: vec![],
    }
}

fn truncate() -> ChangeEvent {
    ChangeEvent {
        table: table("public", "users", 16384),
        operation: Operation::Truncate,
        lsn: Lsn(0x016B_3748),
        commit_lsn: Lsn(0x016B_3748),
        timeline: 1,
        xid: 1,
        commit_time: SAMPLE_TIME,
        seq: 0,
        last_in_tx: true,
        columns: vec![],
        old_columns: None,
        unchanged_toast: vec![],
    }
}

fn samples() -> Vec<ChangeEvent> {
    vec![
        insert_every_kind(),
        update_with_old(),
        update_without_old(),
        delete(),
        truncate(),
    ]
}

const ALL_KEYS: [&str; 13] = [
    fields::TABLE,
    fields::SCHEMA,
    fields::OPERATION,
    fields::RELATION_ID,
    fields::LSN,
    fields::COMMIT_LSN,
    fields::XID,
    fields::COMMIT_TIME,
    fields::SEQ,
    fields::LAST_IN_TX,
    fields::COLUMNS,
    fields::OLD_COLUMNS,
    fields::UNCHANGED_TOAST,
];

// ---- Sample tests ----

#[test]
fn samples_decode_to_the_contract() {
    for event in samples() {
        let msgpack = decode_msgpack(&encode(Format::Msgpack, &event));
        assert_eq!(msgpack, expected(&event, false), "{event:?}");
        let json = decode_json(&encode(Format::Json, &event));
        assert_eq!(json, expected(&event, true), "{event:?}");
    }
}

#[test]
fn insert_fields_and_values() {
    let event = insert_every_kind();
    let m = decode_msgpack(&encode(Format::Msgpack, &event));
    let j = decode_json(&encode(Format::Json, &event));
    let without_old: Vec<&str> = ALL_KEYS
        .iter()
        .copied()
        .filter(|&k| k != "old_columns")
        .collect();
    assert_eq!(keys(&m), without_old);
    assert_eq!(keys(&j), without_old);

    for d in [&m, &j] {
        assert_eq!(field(d, "table"), &s("users"));
        assert_eq!(field(d, "schema"), &s("public"));
        assert_eq!(field(d, "operation"), &s("INSERT"));
        assert_eq!(field(d, "relation_id"), &M::Int(16384));
        assert_eq!(field(d, "lsn"), &s("0/25CB3C8"));
        assert_eq!(field(d, "commit_lsn"), &s("0/25CB5E8"));
        assert_eq!(field(d, "xid"), &M::Int(742));
        assert_eq!(field(d, "commit_time"), &s("2025-12-10T10:30:00.123456Z"));
        assert_eq!(field(d, "seq"), &M::Int(0));
        assert_eq!(field(d, "unchanged_toast"), &M::Arr(vec![]));
    }

    let values = |d: &M| -> Vec<(String, M)> {
        let M::Arr(cols) = field(d, "columns") else {
            panic!()
        };
        cols.iter()
            .map(|c| {
                assert_eq!(keys(c), ["name", "value"]);
                let M::Str(name) = field(c, "name") else {
                    panic!()
                };
                (name.clone(), field(c, "value").clone())
            })
            .collect()
    };
    let f = |x: f64| M::Float(x.to_bits());
    let common = [
        ("id", M::Int(1)),
        ("big", M::Int(i64::MAX.into())),
        ("small", M::Int(i64::MIN.into())),
        ("neg", M::Int(-1)),
        ("f", f(1.5)),
        ("integral", f(3.0)),
        ("tiny", f(5e-324)),
        ("huge", f(f64::MAX)),
        ("negzero", f(-0.0)),
        ("yes", M::Bool(true)),
        ("no", M::Bool(false)),
        ("text", s(UNICODE)),
        ("empty", s("")),
        ("null", M::Nil),
        ("none", M::Arr(vec![])),
        ("ints", M::Arr(vec![M::Int(1), M::Nil, M::Int(-3)])),
        ("texts", M::Arr(vec![s("a,b"), M::Nil])),
        ("名前", s("値")),
    ];
    let msgpack_only = [
        ("nan", f(f64::NAN)),
        ("pinf", f(f64::INFINITY)),
        ("ninf", f(f64::NEG_INFINITY)),
        ("bytes", M::Bin(vec![0, 1, 0, 0xff, 0])),
        ("nobytes", M::Bin(vec![])),
        ("floats", M::Arr(vec![f(f64::NAN), f(-0.5)])),
        ("blobs", M::Arr(vec![M::Bin(vec![0]), M::Nil])),
    ];
    let json_only = [
        ("nan", s("NaN")),
        ("pinf", s("Infinity")),
        ("ninf", s("-Infinity")),
        ("bytes", s("AAEA/wA=")),
        ("nobytes", s("")),
        ("floats", M::Arr(vec![s("NaN"), f(-0.5)])),
        ("blobs", M::Arr(vec![s("AA=="), M::Nil])),
    ];
    for (d, specific) in [(&m, msgpack_only), (&j, json_only)] {
        let got = values(d);
        assert_eq!(got.len(), common.len() + specific.len());
        for (name, want) in common.iter().chain(&specific) {
            let value = &got.iter().find(|(n, _)| n == name).unwrap().1;
            assert_eq!(value, want, "column {name}");
        }
    }
    // Column order is the event's.
    let names: Vec<String> = values(&m).into_iter().map(|(n, _)| n).collect();
    let want: Vec<String> = event.columns.iter().map(|c| c.name.to_string()).collect();
    assert_eq!(names, want);
}

#[test]
fn update_carries_old_columns_and_unchanged_toast() {
    let event = update_with_old();
    for d in [
        decode_msgpack(&encode(Format::Msgpack, &event)),
        decode_json(&encode(Format::Json, &event)),
    ] {
        assert_eq!(keys(&d), ALL_KEYS);
        assert_eq!(field(&d, "schema"), &s("sales"));
        assert_eq!(field(&d, "table"), &s("invoices"));
        assert_eq!(field(&d, "operation"), &s("UPDATE"));
        assert_eq!(field(&d, "lsn"), &s("1/0"));
        assert_eq!(field(&d, "commit_lsn"), &s("FFFFFFFF/FFFFFFFF"));
        assert_eq!(field(&d, "xid"), &M::Int(u32::MAX.into()));
        assert_eq!(field(&d, "seq"), &M::Int(u32::MAX.into()));
        assert_eq!(field(&d, "commit_time"), &s("1999-12-31T23:59:59.999999Z"));
        assert_eq!(
            field(&d, "old_columns"),
            &M::Arr(vec![M::Map(vec![
                ("name".into(), s("id")),
                ("value".into(), M::Int(6)),
            ])])
        );
        assert_eq!(
            field(&d, "unchanged_toast"),
            &M::Arr(vec![s("body"), s("attachments")])
        );
    }
}

#[test]
fn update_and_delete_without_old_columns_have_nil() {
    for event in [update_without_old(), delete()] {
        for d in [
            decode_msgpack(&encode(Format::Msgpack, &event)),
            decode_json(&encode(Format::Json, &event)),
        ] {
            assert_eq!(keys(&d), ALL_KEYS);
            assert_eq!(field(&d, "old_columns"), &M::Nil);
        }
    }
    let d = decode_json(&encode(Format::Json, &delete()));
    assert_eq!(field(&d, "operation"), &s("DELETE"));
    assert_eq!(field(&d, "lsn"), &s("0/0"));
    assert_eq!(field(&d, "commit_lsn"), &s("0/F0"));
    assert_eq!(field(&d, "commit_time"), &s("2000-01-01T00:00:00.000000Z"));
}

#[test]
fn truncate_has_empty_columns_and_no_old_columns() {
    let event = truncate();
    for d in [
        decode_msgpack(&encode(Format::Msgpack, &event)),
        decode_json(&encode(Format::Json, &event)),
    ] {
        assert!(!keys(&d).contains(&"old_columns"));
        assert_eq!(field(&d, "operation"), &s("TRUNCATE"));
        assert_eq!(field(&d, "columns"), &M::Arr(vec![]));
        assert_eq!(field(&d, "unchanged_toast"), &M::Arr(vec![]));
    }
}

#[test]
fn json_text_is_exact() {
    let event = ChangeEvent {
        columns: vec![
            col("id", Value::Int(-42)),
            col("f", Value::Float(1.0)),
            col("e", Value::Float(1e-7)),
            col("n", Value::Float(f64::NEG_INFINITY)),
            col("b", Value::Bytes(b"foobar".to_vec())),
            col("t", Value::Text("a\"b\\c\n\u{0}é".into())),
            col("a", Value::Array(vec![Value::Bool(true), Value::Null])),
        ],
        old_columns: Some(vec![]),
        unchanged_toast: vec![Arc::from("x")],
        operation: Operation::Update,
        ..insert_every_kind()
    };
    let text = String::from_utf8(encode(Format::Json, &event)).unwrap();
    assert_eq!(
        text,
        concat!(
            r#"{"table":"users","schema":"public","operation":"UPDATE","relation_id":16384,"#,
            r#""lsn":"0/25CB3C8","commit_lsn":"0/25CB5E8","xid":742,"#,
            r#""commit_time":"2025-12-10T10:30:00.123456Z","seq":0,"last_in_tx":false,"columns":["#,
            r#"{"name":"id","value":-42},{"name":"f","value":1.0},"#,
            r#"{"name":"e","value":1e-7},{"name":"n","value":"-Infinity"},"#,
            r#"{"name":"b","value":"Zm9vYmFy"},"#,
            r#"{"name":"t","value":"a\"b\\c\u000A\u0000é"},"#,
            r#"{"name":"a","value":[true,null]}],"#,
            r#""old_columns":[],"unchanged_toast":["x"]}"#
        )
    );
}

#[test]
fn msgpack_bytes_of_small_values() {
    let cases: [(Value, &[u8]); 12] = [
        (Value::Null, &[0xc0]),
        (Value::Bool(true), &[0xc3]),
        (Value::Int(0), &[0x00]),
        (Value::Int(127), &[0x7f]),
        (Value::Int(200), &[0xcc, 0xc8]),
        (Value::Int(-1), &[0xff]),
        (Value::Int(-33), &[0xd0, 0xdf]),
        (
            Value::Int(i64::MAX),
            &[0xcf, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        (Value::Int(i64::MIN), &[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        (
            Value::Float(f64::NAN),
            &[0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0],
        ),
        (Value::Bytes(vec![0, 1]), &[0xc4, 0x02, 0x00, 0x01]),
        (
            Value::Array(vec![Value::Text("é".into()), Value::Null]),
            &[0x92, 0xa2, 0xc3, 0xa9, 0xc0],
        ),
    ];
    for (value, want) in cases {
        let mut out = Vec::new();
        push_value(Format::Msgpack, &value, &mut out);
        assert_eq!(out, want, "{value:?}");
    }
}

#[test]
fn content_types() {
    assert_eq!(content_type(Format::Msgpack), "application/msgpack");
    assert_eq!(content_type(Format::Json), "application/json");
}

// ---- Buffer reuse ----

#[test]
fn reused_buffer_keeps_its_capacity() {
    for format in [Format::Msgpack, Format::Json] {
        let mut out = Vec::new();
        let first = insert_every_kind();
        encode_change(format, &first, &mut out);
        let (len, capacity) = (out.len(), out.capacity());
        let first_bytes = out.clone();
        for i in 0..100 {
            // Same shape and sizes, different values.
            let mut event = insert_every_kind();
            event.seq = i % 10;
            event.columns[0].value = Value::Int(i64::from(i % 10));
            event.commit_time = SAMPLE_TIME + i64::from(i);
            encode_change(format, &event, &mut out);
            assert_eq!(out.len(), len);
            assert_eq!(out.capacity(), capacity, "{format} grew on call {i}");
        }
        encode_change(format, &first, &mut out);
        assert_eq!(out, first_bytes);
        assert_eq!(out.capacity(), capacity);
    }
}

#[test]
fn commit_text_follows_each_transaction() {
    for format in [Format::Msgpack, Format::Json] {
        let mut commit = CommitText::default();
        let mut out = Vec::new();
        // Changes of three transactions, the second with the first one's commit time, and
        // the first one's again after them (a resend).
        for (i, (lsn, time)) in [(1, 0), (1, 0), (2, 0), (2, 0), (3, 7), (1, 0)]
            .into_iter()
            .enumerate()
        {
            let mut event = insert_every_kind();
            event.seq = i as u32;
            event.commit_lsn = Lsn(0x16B_3748 + lsn);
            event.commit_time = SAMPLE_TIME + time;
            encode_change_in(format, &event, &mut commit, &mut out);
            assert_eq!(out, encode(format, &event), "{format}, change {i}");
        }
    }
}

// ---- Properties ----

pub(super) fn any_float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<u64>().prop_map(f64::from_bits),
        prop::sample::select(vec![
            0.0,
            -0.0,
            1.0,
            0.1,
            f64::NAN,
            -f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::MIN,
            f64::EPSILON,
            5e-324,
            1e16,
            1e-5,
        ]),
        any::<f64>(),
    ]
}

fn any_scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        (-300i64..300).prop_map(Value::Int),
        any_float().prop_map(Value::Float),
        any::<String>().prop_map(Value::Text),
        "[\\x00-\\x1f\"\\\\a-z]{0,8}".prop_map(Value::Text),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
    ]
}

fn any_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => any_scalar(),
        1 => prop::collection::vec(any_scalar(), 0..6).prop_map(Value::Array),
    ]
}

fn any_columns() -> impl Strategy<Value = Vec<ColumnValue>> {
    prop::collection::vec(
        (any::<String>(), any_value()).prop_map(|(name, value)| ColumnValue {
            name: Arc::from(name),
            value,
        }),
        0..8,
    )
}

fn any_event() -> impl Strategy<Value = ChangeEvent> {
    let op = prop::sample::select(vec![
        Operation::Insert,
        Operation::Update,
        Operation::Delete,
        Operation::Truncate,
    ]);
    let table = (any::<String>(), any::<String>(), any::<u32>()).prop_map(|(s, t, r)| {
        Arc::new(TableRef {
            columns: Vec::new(),
            schema: Arc::from(s),
            table: Arc::from(t),
            relation_id: r,
            key_columns: Vec::new(),
        })
    });
    let position = (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<i64>(),
        any::<u32>(),
    );
    let rows = (
        any_columns(),
        prop::option::of(any_columns()),
        prop::collection::vec(any::<String>().prop_map(Arc::from), 0..4),
    );
    (table, op, position, rows).prop_map(
        |(
            table,
            operation,
            (lsn, commit_lsn, xid, commit_time, seq),
            (columns, old_columns, unchanged_toast),
        )| {
            ChangeEvent {
                table,
                operation,
                lsn: Lsn(lsn),
                commit_lsn: Lsn(commit_lsn),
                timeline: 1,
                xid,
                commit_time,
                seq,
                last_in_tx: seq % 2 == 1,
                columns,
                old_columns,
                unchanged_toast,
            }
        },
    )
}

/// Equal, except that floats may differ in the last bits: serde_json without its
/// `float_roundtrip` feature does not always read the closest `f64` (it reads
/// `2.2041813239700426e-271` two units in the last place off). That the text itself reads
/// back exactly is checked in `float_text_reads_back_exactly`.
fn nearly_equal(a: &M, b: &M) -> bool {
    match (a, b) {
        (M::Float(x), M::Float(y)) => x.abs_diff(*y) <= 8,
        (M::Arr(x), M::Arr(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| nearly_equal(a, b))
        }
        (M::Map(x), M::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, a), (kb, b))| ka == kb && nearly_equal(a, b))
        }
        _ => a == b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn msgpack_round_trips(event in any_event()) {
        let decoded = decode_msgpack(&encode(Format::Msgpack, &event));
        prop_assert_eq!(decoded, expected(&event, false));
    }

    #[test]
    fn json_parses_and_round_trips(event in any_event()) {
        let bytes = encode(Format::Json, &event);
        prop_assert!(std::str::from_utf8(&bytes).is_ok());
        let decoded = decode_json(&bytes);
        let want = expected(&event, true);
        prop_assert!(nearly_equal(&decoded, &want), "got {:?}\nwant {:?}", decoded, want);
    }
}
