//! Tests of the value decoding.

use super::array::is_array_space;
use super::decode::decode_bytea_hex;
use super::*;
use proptest::prelude::*;

const ALL_KINDS: [ValueKind; 10] = [
    ValueKind::Bool,
    ValueKind::Int,
    ValueKind::Float,
    ValueKind::Bytes,
    ValueKind::Text,
    ValueKind::Array(ElemKind::Bool),
    ValueKind::Array(ElemKind::Int),
    ValueKind::Array(ElemKind::Float),
    ValueKind::Array(ElemKind::Bytes),
    ValueKind::Array(ElemKind::Text),
];

/// Equality that treats floats bitwise (NaN equals NaN, -0 differs from 0).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => {
            (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits()
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        _ => a == b,
    }
}

#[track_caller]
fn check(kind: ValueKind, text: &str, want: Value) {
    let got = decode_text(kind, text.as_bytes()).unwrap();
    assert!(
        same(&got, &want),
        "{kind:?} {text:?}: got {got:?}, want {want:?}"
    );
}

fn int(oid: u32, text: &str) -> Value {
    decode_text(ValueKind::from_oid(oid), text.as_bytes()).unwrap()
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn ints(v: &[i64]) -> Value {
    Value::Array(v.iter().copied().map(Value::Int).collect())
}

#[test]
fn integers_at_their_limits() {
    assert_eq!(int(21, "-32768"), Value::Int(-32768));
    assert_eq!(int(21, "32767"), Value::Int(32767));
    assert_eq!(int(23, "-2147483648"), Value::Int(-2147483648));
    assert_eq!(int(23, "2147483647"), Value::Int(2147483647));
    assert_eq!(int(20, "-9223372036854775808"), Value::Int(i64::MIN));
    assert_eq!(int(20, "9223372036854775807"), Value::Int(i64::MAX));
    assert_eq!(int(26, "4294967295"), Value::Int(4294967295));
    assert_eq!(int(26, "0"), Value::Int(0));
    assert_eq!(int(23, "-0"), Value::Int(0));
}

#[test]
fn integers_rejected() {
    for bad in [
        "",
        "-",
        "+",
        "abc",
        "1.5",
        " 1",
        "1 ",
        "9223372036854775808",
        "-9223372036854775809",
        "1e3",
        "٣",
    ] {
        let err = decode_text(ValueKind::Int, bad.as_bytes()).unwrap_err();
        assert_eq!(err.what(), "integer");
        assert!(err.to_string().contains("decimal integer"), "{err}");
    }
    let err = decode_text(ValueKind::Int, b"abc").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid integer value: expected a decimal integer within the 64-bit range, got \"abc\""
    );
}

#[test]
fn floats_including_special_values() {
    check(ValueKind::Float, "NaN", Value::Float(f64::NAN));
    check(ValueKind::Float, "Infinity", Value::Float(f64::INFINITY));
    check(
        ValueKind::Float,
        "-Infinity",
        Value::Float(f64::NEG_INFINITY),
    );
    check(ValueKind::Float, "5e-324", Value::Float(5e-324));
    check(
        ValueKind::Float,
        "1.7976931348623157e+308",
        Value::Float(f64::MAX),
    );
    check(
        ValueKind::Float,
        "1.7976931348623157e308",
        Value::Float(f64::MAX),
    );
    check(ValueKind::Float, "-0", Value::Float(-0.0));
    check(ValueKind::Float, "0", Value::Float(0.0));
    check(ValueKind::Float, "0.1", Value::Float(0.1));
    check(ValueKind::Float, "-1.5e-07", Value::Float(-1.5e-7));
    for bad in ["", "abc", "1,5", "0x10", " 1"] {
        let err = decode_text(ValueKind::Float, bad.as_bytes()).unwrap_err();
        assert_eq!(err.what(), "float");
    }
}

#[test]
fn booleans() {
    check(ValueKind::Bool, "t", Value::Bool(true));
    check(ValueKind::Bool, "f", Value::Bool(false));
    let err = decode_text(ValueKind::Bool, b"yes").unwrap_err();
    assert!(err.to_string().contains("'t' or 'f'"), "{err}");
}

#[test]
fn bytea_hex_and_escape_formats() {
    check(ValueKind::Bytes, "\\x", Value::Bytes(vec![]));
    check(
        ValueKind::Bytes,
        "\\x000102ff00",
        Value::Bytes(vec![0, 1, 2, 255, 0]),
    );
    check(
        ValueKind::Bytes,
        "\\xDEADbeef",
        Value::Bytes(vec![0xde, 0xad, 0xbe, 0xef]),
    );
    // Legacy escape format (bytea_output = escape).
    check(ValueKind::Bytes, "", Value::Bytes(vec![]));
    check(
        ValueKind::Bytes,
        "a\\000\\\\\\377b",
        Value::Bytes(vec![b'a', 0, b'\\', 255, b'b']),
    );
    for bad in ["\\x0", "\\x0g", "\\xx0", "\\", "a\\4", "\\400", "\\12"] {
        let err = decode_text(ValueKind::Bytes, bad.as_bytes()).unwrap_err();
        assert_eq!(err.what(), "bytea", "{bad:?}");
    }
    let err = decode_text(ValueKind::Bytes, b"\\x012").unwrap_err();
    assert!(
        err.to_string().contains("even number of hex digits"),
        "{err}"
    );
}

#[test]
fn text_is_utf8_verbatim() {
    check(ValueKind::Text, "héllo ✓ 😀", text("héllo ✓ 😀"));
    check(ValueKind::Text, "", text(""));
    check(
        ValueKind::Text,
        "back\\slash \"q\"",
        text("back\\slash \"q\""),
    );
    let err = decode_text(ValueKind::Text, b"ab\xffcd").unwrap_err();
    assert_eq!(err.what(), "text");
    assert_eq!(err.input(), "\"ab\\xffcd\"");
    assert!(err.to_string().contains("valid UTF-8"), "{err}");
}

#[test]
fn other_types_stay_text_unchanged() {
    for (oid, s) in [
        (1700, "-123456789012345678901234567890.123456789"),
        (1700, "NaN"),
        (1114, "2025-12-10 10:30:00.123456"),
        (1184, "2025-12-10 10:30:00.123456+00"),
        (1186, "1 year 2 mons 3 days 04:05:06.789"),
        (2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (114, "{\"a\": [1, 2]}"),
        (3802, "{\"a\": 1, \"b\": null}"),
        (1042, "ab "),
        (1082, "0001-01-01 BC"),
        (1231, "{1.10,NaN}"),
    ] {
        assert_eq!(ValueKind::from_oid(oid), ValueKind::Text);
        check(ValueKind::from_oid(oid), s, text(s));
    }
}

#[test]
fn arrays_of_scalars() {
    let ai = ValueKind::Array(ElemKind::Int);
    check(ai, "{}", Value::Array(vec![]));
    check(
        ai,
        "{1,NULL,3}",
        Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)]),
    );
    check(
        ai,
        "{ 1 , null ,\t3\n}",
        Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)]),
    );
    check(ai, "{NULL}", Value::Array(vec![Value::Null]));
    check(
        ai,
        "{9223372036854775807,-9223372036854775808}",
        ints(&[i64::MAX, i64::MIN]),
    );
    check(ai, "{\"5\"}", ints(&[5]));
    check(
        ValueKind::Array(ElemKind::Float),
        "{NaN,Infinity,-Infinity,1.5,-0}",
        Value::Array(vec![
            Value::Float(f64::NAN),
            Value::Float(f64::INFINITY),
            Value::Float(f64::NEG_INFINITY),
            Value::Float(1.5),
            Value::Float(-0.0),
        ]),
    );
    check(
        ValueKind::Array(ElemKind::Bool),
        "{t,f,NULL}",
        Value::Array(vec![Value::Bool(true), Value::Bool(false), Value::Null]),
    );
    check(
        ValueKind::Array(ElemKind::Bytes),
        r#"{"\\x00ff",NULL,"\\x"}"#,
        Value::Array(vec![
            Value::Bytes(vec![0, 255]),
            Value::Null,
            Value::Bytes(vec![]),
        ]),
    );
}

#[test]
fn text_arrays_quoting() {
    let at = ValueKind::Array(ElemKind::Text);
    check(
        at,
        r#"{"a,b","c\"d",NULL,"NULL","",é,"back\\slash"}"#,
        Value::Array(vec![
            text("a,b"),
            text("c\"d"),
            Value::Null,
            text("NULL"),
            text(""),
            text("é"),
            text("back\\slash"),
        ]),
    );
    check(
        at,
        "{x,\"y z\"}",
        Value::Array(vec![text("x"), text("y z")]),
    );
    check(at, "{ a b ,c}", Value::Array(vec![text("a b"), text("c")]));
    // Escaped characters in unquoted elements, including escaped trailing space.
    check(
        at,
        r"{a\,b,c\ ,N\ULL}",
        Value::Array(vec![text("a,b"), text("c "), text("NULL")]),
    );
    check(at, "{nUlL}", Value::Array(vec![Value::Null]));
    check(at, "{\"{}\"}", Value::Array(vec![text("{}")]));
    check(at, "{\"😀\",✓}", Value::Array(vec![text("😀"), text("✓")]));
}

#[test]
fn arrays_that_stay_text() {
    let ai = ValueKind::Array(ElemKind::Int);
    for s in [
        "{{1,2},{3,4}}",
        "{{NULL}}",
        "[0:1]={1,2}",
        "[1:1][1:1]={{1}}",
        "{{}}",
    ] {
        check(ai, s, text(s));
    }
    check(
        ValueKind::Array(ElemKind::Text),
        r#"{{"a","b"}}"#,
        text(r#"{{"a","b"}}"#),
    );
}

#[test]
fn malformed_arrays_are_errors() {
    let ai = ValueKind::Array(ElemKind::Int);
    for bad in [
        "", "1,2", "{", "{1", "{1,", "{1,}", "{,1}", "{1}x", "{\"1}", "{1\"}", "{1 2}", "{\\",
    ] {
        let r = decode_text(ai, bad.as_bytes());
        assert!(r.is_err(), "{bad:?} gave {r:?}");
    }
    let err = decode_text(ai, b"{1,x,3}").unwrap_err();
    assert_eq!(err.element(), Some(1));
    assert_eq!(err.input(), "\"x\"");
    assert!(err.to_string().contains("in array element 1"), "{err}");
    let err = decode_text(ValueKind::Array(ElemKind::Text), b"{\"\xff\"}").unwrap_err();
    assert_eq!(err.what(), "text");
    assert_eq!(err.element(), Some(0));
}

#[test]
fn error_preview_is_bounded() {
    let long = "x".repeat(10_000);
    let err = decode_text(ValueKind::Int, long.as_bytes()).unwrap_err();
    assert!(err.input().len() < 100, "{}", err.input());
    assert!(
        err.input().ends_with("... (10000 bytes)"),
        "{}",
        err.input()
    );
    // The cut never splits a character into bogus escapes.
    let long = "é".repeat(100);
    let err = decode_text(ValueKind::Int, long.as_bytes()).unwrap_err();
    assert!(!err.input().contains("\\x"), "{}", err.input());
}

#[test]
fn built_in_and_registered_kinds() {
    let expect = [
        (16, ValueKind::Bool),
        (17, ValueKind::Bytes),
        (20, ValueKind::Int),
        (21, ValueKind::Int),
        (23, ValueKind::Int),
        (26, ValueKind::Int),
        (700, ValueKind::Float),
        (701, ValueKind::Float),
        (25, ValueKind::Text),
        (1043, ValueKind::Text),
        (1000, ValueKind::Array(ElemKind::Bool)),
        (1001, ValueKind::Array(ElemKind::Bytes)),
        (1005, ValueKind::Array(ElemKind::Int)),
        (1007, ValueKind::Array(ElemKind::Int)),
        (1016, ValueKind::Array(ElemKind::Int)),
        (1028, ValueKind::Array(ElemKind::Int)),
        (1021, ValueKind::Array(ElemKind::Float)),
        (1022, ValueKind::Array(ElemKind::Float)),
        (1009, ValueKind::Array(ElemKind::Text)),
        (1015, ValueKind::Array(ElemKind::Text)),
        (1231, ValueKind::Text),
        (1014, ValueKind::Text),
        (18, ValueKind::Text),
    ];
    for (oid, kind) in expect {
        assert_eq!(ValueKind::from_oid(oid), kind, "oid {oid}");
    }

    let mut reg = TypeRegistry::new();
    assert!(reg.is_empty());
    assert_eq!(reg.register(16_411, "public", "mood"), ValueKind::Text);
    assert_eq!(reg.register(16_416, "", "int4"), ValueKind::Int);
    assert_eq!(
        reg.register(16_417, "pg_catalog", "_float8"),
        ValueKind::Array(ElemKind::Float)
    );
    // Same name outside pg_catalog is a different type.
    assert_eq!(reg.register(16_418, "public", "int4"), ValueKind::Text);
    assert_eq!(reg.register(16_419, "", "numeric"), ValueKind::Text);
    assert_eq!(reg.len(), 5);
    assert_eq!(reg.kind(16_411), ValueKind::Text);
    assert_eq!(reg.kind(16_416), ValueKind::Int);
    assert_eq!(reg.kind(16_417), ValueKind::Array(ElemKind::Float));
    assert_eq!(reg.kind(99_999), ValueKind::Text);
    assert_eq!(reg.kind(23), ValueKind::Int);
    // A re-sent Type message (after ALTER DOMAIN ... TYPE, say) replaces the old kind.
    assert_eq!(reg.register(16_416, "", "int8"), ValueKind::Int);
    assert_eq!(reg.register(16_416, "", "text"), ValueKind::Text);
    assert_eq!(reg.kind(16_416), ValueKind::Text);
}

#[test]
fn session_settings() {
    assert_eq!(CLIENT_ENCODING, "UTF8");
    for opt in [
        "datestyle=ISO",
        "intervalstyle=postgres",
        "extra_float_digits=3",
        "timezone=UTC",
        "standard_conforming_strings=on",
    ] {
        assert!(SESSION_OPTIONS.contains(&format!("-c {opt}")), "{opt}");
    }
}

// ---- The real capture in tests/vectors/types.hex (PostgreSQL 15, pgoutput proto 1) ----

const TYPES_HEX: &str = include_str!("../../../tests/vectors/types.hex");

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        b
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    fn string(&mut self) -> &'a str {
        let len = self.buf[self.pos..].iter().position(|&b| b == 0).unwrap();
        let s = std::str::from_utf8(self.bytes(len)).unwrap();
        self.pos += 1;
        s
    }
}

fn unhex(s: &str) -> Vec<u8> {
    decode_bytea_hex(s.as_bytes()).expect("hex")
}

/// Parses the capture: column (name, kind) from R and Y messages, and the cells of every
/// Insert (None for NULL).
#[allow(clippy::type_complexity)]
fn load_capture() -> (Vec<(String, ValueKind)>, Vec<Vec<Option<Vec<u8>>>>) {
    let mut registry = TypeRegistry::new();
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for line in TYPES_HEX.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let msg = unhex(line.split_whitespace().nth(2).unwrap());
        let mut r = Reader { buf: &msg, pos: 1 };
        match msg[0] {
            b'Y' => {
                let oid = r.u32();
                let (ns, name) = (r.string(), r.string());
                registry.register(oid, ns, name);
            }
            b'R' => {
                let _relid = r.u32();
                assert_eq!((r.string(), r.string()), ("public", "ty"));
                let _replident = r.u8();
                let n = r.u16();
                columns = (0..n)
                    .map(|_| {
                        let _flags = r.u8();
                        let name = r.string().to_owned();
                        let oid = r.u32();
                        let _typmod = r.u32();
                        (name, registry.kind(oid))
                    })
                    .collect();
            }
            b'I' => {
                let _relid = r.u32();
                assert_eq!(r.u8(), b'N');
                let n = r.u16();
                let row = (0..n)
                    .map(|_| match r.u8() {
                        b'n' => None,
                        b't' => {
                            let len = r.u32() as usize;
                            Some(r.bytes(len).to_vec())
                        }
                        k => panic!("unexpected cell kind {}", k as char),
                    })
                    .collect();
                rows.push(row);
            }
            _ => {}
        }
        if matches!(msg[0], b'Y' | b'R' | b'I') {
            assert_eq!(r.pos, msg.len(), "trailing bytes in {}", msg[0] as char);
        }
    }
    (columns, rows)
}

#[test]
fn real_capture_types() {
    let (columns, rows) = load_capture();
    assert_eq!(columns.len(), 35);
    assert_eq!(rows.len(), 3);

    let kind_of = |n: &str| columns.iter().find(|(c, _)| c == n).unwrap().1;
    assert_eq!(kind_of("mo"), ValueKind::Text);
    assert_eq!(kind_of("pi"), ValueKind::Int);
    assert_eq!(kind_of("o"), ValueKind::Int);
    assert_eq!(kind_of("a2d"), ValueKind::Array(ElemKind::Int));
    assert_eq!(kind_of("anu"), ValueKind::Text);

    use Value::{Array as A, Bool as B, Bytes as Y, Float as F, Int as I, Null as N};
    let t = text;
    let nan = f64::NAN;
    let inf = f64::INFINITY;
    let expected: [Vec<(&str, Value)>; 3] = [
        vec![
            ("id", I(1)),
            ("i2", I(-32768)),
            ("i4", I(-2147483648)),
            ("i8", I(i64::MIN)),
            ("o", I(0)),
            ("f4", F(nan)),
            ("f8", F(-inf)),
            ("b", B(true)),
            ("by", Y(vec![0])),
            ("tx", t("plain")),
            ("vc", t("v")),
            ("ch", t("ab ")),
            ("nu", t("0")),
            ("d", t("2025-12-10")),
            ("tm", t("00:00:00")),
            ("tt", t("10:30:00+02")),
            ("ts", t("2025-12-10 10:30:00.123456")),
            ("tz", t("2025-12-10 10:30:00.123456+00")),
            ("iv", t("1 year 2 mons 3 days 04:05:06.789")),
            ("u", t("00000000-0000-0000-0000-000000000000")),
            ("j", t(r#"{"a": [1, 2]}"#)),
            ("jb", t(r#"{"a": 1, "b": null}"#)),
            ("ai4", A(vec![])),
            ("ai8", ints(&[i64::MAX, i64::MIN])),
            ("ai2", A(vec![I(1), N, I(3)])),
            ("af8", A(vec![F(nan), F(inf), F(-inf), F(1.5)])),
            ("af4", A(vec![F(0.1)])),
            ("ab", A(vec![B(true), B(false), N])),
            ("aby", A(vec![Y(vec![0, 255]), N])),
            (
                "atx",
                A(vec![t("a,b"), t("c\"d"), N, t("NULL"), t(""), t("é")]),
            ),
            ("avc", A(vec![t("x"), t("y z")])),
            ("a2d", t("{{1,2},{3,4}}")),
            ("anu", t("{1.10,NaN}")),
            ("mo", t("happy")),
            ("pi", I(7)),
        ],
        vec![
            ("id", I(2)),
            ("i2", I(32767)),
            ("i4", I(2147483647)),
            ("i8", I(i64::MAX)),
            ("o", I(4294967295)),
            ("f4", F(inf)),
            ("f8", F(f64::MAX)),
            ("b", B(false)),
            ("by", Y(vec![0, 1, 2, 255, 0])),
            ("tx", t("héllo ✓ 😀 \"quoted\" back\\slash")),
            ("vc", t("")),
            ("ch", t("   ")),
            ("nu", t("-123456789012345678901234567890.123456789")),
            ("d", t("0001-01-01 BC")),
            ("tm", t("24:00:00")),
            ("tt", t("23:59:59.999999-12")),
            ("ts", t("infinity")),
            ("tz", t("-infinity")),
            ("iv", t("-1 days -00:00:01")),
            ("u", t("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
            ("j", t("[]")),
            ("jb", t("{}")),
            ("ai4", A(vec![])),
            ("ai8", A(vec![])),
            ("ai2", A(vec![])),
            ("af8", A(vec![])),
            ("af4", A(vec![])),
            ("ab", A(vec![])),
            ("aby", A(vec![])),
            ("atx", A(vec![])),
            ("avc", A(vec![])),
            ("a2d", A(vec![])),
            ("anu", t("{}")),
            ("mo", t("sad")),
            ("pi", I(2147483647)),
        ],
        vec![
            ("id", I(3)),
            ("i2", I(0)),
            ("i4", I(0)),
            ("i8", I(0)),
            ("o", I(1)),
            ("f4", F(0.1)),
            ("f8", F(5e-324)),
            ("b", N),
            ("by", Y(vec![])),
            ("tx", t("")),
            ("vc", N),
            ("ch", N),
            ("nu", t("NaN")),
            ("d", N),
            ("tm", N),
            ("tt", N),
            ("ts", N),
            ("tz", t("1970-01-01 00:00:00+00")),
            ("iv", t("00:00:00")),
            ("u", N),
            ("j", t("null")),
            ("jb", t("\"s\"")),
            ("ai4", A(vec![N])),
            ("ai8", N),
            ("ai2", N),
            ("af8", A(vec![F(-0.0)])),
            ("af4", N),
            ("ab", N),
            ("aby", A(vec![Y(vec![])])),
            // SQL `'{"\\\\"}'` is one element of two backslashes.
            ("atx", A(vec![t("\\\\")])),
            ("avc", A(vec![N, N])),
            ("a2d", t("{{NULL}}")),
            ("anu", N),
            ("mo", N),
            ("pi", N),
        ],
    ];

    for (row, want) in rows.iter().zip(&expected) {
        assert_eq!(row.len(), columns.len());
        assert_eq!(want.len(), columns.len());
        for ((cell, (name, kind)), (want_name, want_value)) in row.iter().zip(&columns).zip(want) {
            assert_eq!(name, want_name);
            let got = match cell {
                None => Value::Null,
                Some(bytes) => {
                    decode_text(*kind, bytes).unwrap_or_else(|e| panic!("column {name}: {e}"))
                }
            };
            assert!(
                same(&got, want_value),
                "column {name}: got {got:?}, want {want_value:?} (text {:?})",
                cell.as_deref().map(String::from_utf8_lossy)
            );
        }
    }
}

// ---- Properties ----

/// `array_out` for text elements: quote only when needed.
fn array_out_minimal(items: &[Option<String>]) -> String {
    let mut s = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        match item {
            None => s.push_str("NULL"),
            Some(e) => {
                let quote = e.is_empty()
                    || e.eq_ignore_ascii_case("NULL")
                    || e.bytes().any(|c| {
                        matches!(c, b'{' | b'}' | b'"' | b',' | b'\\') || is_array_space(c)
                    });
                push_element(&mut s, e, quote);
            }
        }
    }
    s.push('}');
    s
}

fn array_out_quoted(items: &[Option<String>]) -> String {
    let mut s = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        match item {
            None => s.push_str("NULL"),
            Some(e) => push_element(&mut s, e, true),
        }
    }
    s.push('}');
    s
}

fn push_element(s: &mut String, e: &str, quote: bool) {
    if quote {
        s.push('"');
    }
    for c in e.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    if quote {
        s.push('"');
    }
}

fn as_values(items: &[Option<String>]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|i| i.clone().map_or(Value::Null, Value::Text))
            .collect(),
    )
}

fn any_kind() -> impl Strategy<Value = ValueKind> {
    prop::sample::select(ALL_KINDS.to_vec())
}

fn element_strings() -> impl Strategy<Value = Vec<Option<String>>> {
    let s = prop_oneof![
        any::<String>(),
        "[ a-z\"\\\\{},\t\n]{0,8}",
        prop::sample::select(vec!["NULL", "null", "", " ", "\\", "\"", "é😀"])
            .prop_map(str::to_owned),
    ];
    prop::collection::vec(prop::option::of(s), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(kind in any_kind(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_text(kind, &bytes);
    }

    #[test]
    fn array_like_bytes_never_panic(
        kind in any_kind(),
        bytes in prop::collection::vec(
            prop::sample::select(b"{}[]:=\",\\ NULnul\tx0f1-.e\xc3\xa9\xff".to_vec()),
            0..64,
        ),
    ) {
        let _ = decode_text(kind, &bytes);
    }

    #[test]
    fn quoted_text_arrays_round_trip(items in element_strings()) {
        let literal = array_out_quoted(&items);
        let got = decode_text(ValueKind::Array(ElemKind::Text), literal.as_bytes()).unwrap();
        prop_assert_eq!(got, as_values(&items), "literal {}", literal);
    }

    #[test]
    fn array_out_text_arrays_round_trip(items in element_strings()) {
        let literal = array_out_minimal(&items);
        let got = decode_text(ValueKind::Array(ElemKind::Text), literal.as_bytes()).unwrap();
        prop_assert_eq!(got, as_values(&items), "literal {}", literal);
    }

    #[test]
    fn integers_round_trip(n in any::<i64>()) {
        prop_assert_eq!(decode_text(ValueKind::Int, n.to_string().as_bytes()).unwrap(), Value::Int(n));
    }

    #[test]
    fn floats_round_trip_bitwise(bits in any::<u64>()) {
        let x = f64::from_bits(bits);
        let s = if x.is_nan() {
            "NaN".to_owned()
        } else if x.is_infinite() {
            if x > 0.0 { "Infinity".to_owned() } else { "-Infinity".to_owned() }
        } else {
            format!("{x:e}")
        };
        let got = decode_text(ValueKind::Float, s.as_bytes()).unwrap();
        prop_assert!(same(&got, &Value::Float(x)), "{} gave {:?}", s, got);
    }

    #[test]
    fn bytea_round_trips(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let got = decode_text(ValueKind::Bytes, format!("\\x{hex}").as_bytes()).unwrap();
        prop_assert_eq!(got, Value::Bytes(bytes.clone()));

        let mut escaped = Vec::new();
        for &b in &bytes {
            match b {
                b'\\' => escaped.extend_from_slice(b"\\\\"),
                0x20..=0x7e => escaped.push(b),
                _ => escaped.extend_from_slice(format!("\\{b:03o}").as_bytes()),
            }
        }
        // An escape-format value never starts with `\x`; `\\x` is a backslash then `x`.
        let got = decode_text(ValueKind::Bytes, &escaped).unwrap();
        prop_assert_eq!(got, Value::Bytes(bytes.clone()));

        // Inside a bytea[] literal the element is quoted and its backslash escaped.
        let literal = format!("{{\"\\\\x{hex}\",NULL}}");
        let got = decode_text(ValueKind::Array(ElemKind::Bytes), literal.as_bytes()).unwrap();
        prop_assert_eq!(got, Value::Array(vec![Value::Bytes(bytes), Value::Null]));
    }
}
