//! Column values as Debezium's PostgreSQL connector writes them with its default settings
//! (`decimal.handling.mode=precise`, `time.precision.mode=adaptive`,
//! `interval.handling.mode=numeric`, `binary.handling.mode=bytes`), decided per column from
//! its type OID and modifier, and converted from the text PostgreSQL printed.

use crate::pg::value::{decode_text, ElemKind, Value, ValueKind};
use crate::wire::encode::json::{json_str, json_u64, json_value};
use crate::wire::text::{civil_from_days, days_from_civil, push_base64};

/// Debezium's placeholder for a value that was not sent (an unchanged TOASTed value).
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;
/// Debezium's average month for `MicroDuration`: 365.25 / 12 days, exactly 2 629 800 s.
const MICROS_PER_MONTH: i64 = 2_629_800 * MICROS_PER_SECOND;

/// How one value is written, with its Kafka Connect schema type and logical name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scalar {
    /// `bool`; also `bit(1)`.
    Bool,
    /// `int2`.
    Int16,
    /// `int4`.
    Int32,
    /// `int8`, `oid`.
    Int64,
    /// `float4`.
    Float32,
    /// `float8`.
    Float64,
    /// Text as PostgreSQL printed it, with an optional logical name (`io.debezium.data.Json`…).
    Text(Option<&'static str>),
    /// `bytea`: base64.
    Bytes,
    /// `numeric(p, s)`: base64 of the unscaled value's two's complement, big-endian.
    Decimal { precision: i32, scale: i32 },
    /// `numeric` without a scale: `{"scale": s, "value": base64}`.
    VariableDecimal,
    /// `money` in the C locale's form (`-$1,234.56`): a decimal with scale 2.
    Money,
    /// `date`: days since 1970-01-01.
    Date,
    /// `time(0..3)`: milliseconds past midnight.
    TimeMillis,
    /// `time`, `time(4..6)`: microseconds past midnight.
    TimeMicros,
    /// `timestamp(0..3)`: milliseconds since the epoch.
    TimestampMillis,
    /// `timestamp`, `timestamp(4..6)`: microseconds since the epoch.
    TimestampMicros,
    /// `timestamptz`: ISO 8601 in UTC, `2025-01-01T10:00:00.5Z`.
    ZonedTimestamp,
    /// `timetz`: ISO 8601 in UTC, `10:00:00.5Z`.
    ZonedTime,
    /// `interval`: microseconds, a month counted as 30.4375 days.
    MicroDuration,
}

/// A column's mapping: a scalar, or a one-dimensional array of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub scalar: Scalar,
    pub array: bool,
}

/// The element type of the built-in array types whose element has a mapping of its own.
fn array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1000 => 16,
        1001 => 17,
        1002 => 18,
        1003 => 19,
        1005 => 21,
        1007 => 23,
        1016 => 20,
        1028 => 26,
        1009 => 25,
        1014 => 1042,
        1015 => 1043,
        1021 => 700,
        1022 => 701,
        1182 => 1082,
        1183 => 1083,
        1115 => 1114,
        1185 => 1184,
        1270 => 1266,
        1187 => 1186,
        1231 => 1700,
        791 => 790,
        2951 => 2950,
        199 => 114,
        3807 => 3802,
        143 => 142,
        1041 => 869,
        651 => 650,
        1040 => 829,
        _ => return None,
    })
}

/// The OID of a built-in type named as in a pgoutput Type message (`namespace` empty or
/// `pg_catalog`), for the types whose values have a form of their own; `None` otherwise.
pub fn builtin_type_oid(namespace: &str, name: &str) -> Option<u32> {
    if !namespace.is_empty() && namespace != "pg_catalog" {
        return None;
    }
    Some(match name {
        "bool" => 16,
        "bytea" => 17,
        "int8" => 20,
        "int2" => 21,
        "int4" => 23,
        "text" => 25,
        "oid" => 26,
        "json" => 114,
        "xml" => 142,
        "float4" => 700,
        "float8" => 701,
        "money" => 790,
        "varchar" => 1043,
        "date" => 1082,
        "time" => 1083,
        "timestamp" => 1114,
        "timestamptz" => 1184,
        "interval" => 1186,
        "timetz" => 1266,
        "numeric" => 1700,
        "uuid" => 2950,
        "jsonb" => 3802,
        _ => return None,
    })
}

/// The mapping of a column of type `oid` with modifier `typmod`.
pub(crate) fn mapping(oid: u32, typmod: i32) -> Mapping {
    match array_element(oid) {
        Some(elem) => Mapping {
            scalar: scalar(elem, typmod),
            array: true,
        },
        None => Mapping {
            scalar: scalar(oid, typmod),
            array: false,
        },
    }
}

/// Fractional-second digits of a time type's modifier (6 when unspecified).
fn time_precision(typmod: i32) -> i32 {
    if typmod < 0 {
        6
    } else {
        typmod
    }
}

fn scalar(oid: u32, typmod: i32) -> Scalar {
    match oid {
        16 => Scalar::Bool,
        21 => Scalar::Int16,
        23 => Scalar::Int32,
        20 | 26 => Scalar::Int64,
        700 => Scalar::Float32,
        701 => Scalar::Float64,
        17 => Scalar::Bytes,
        1700 if typmod >= 4 => {
            // atttypmod of numeric(p, s): ((p << 16) | s) + VARHDRSZ; s is 11-bit signed.
            let t = typmod - 4;
            Scalar::Decimal {
                precision: (t >> 16) & 0xFFFF,
                scale: ((t & 0x7FF) ^ 1024) - 1024,
            }
        }
        1700 => Scalar::VariableDecimal,
        790 => Scalar::Money,
        1082 => Scalar::Date,
        1083 if time_precision(typmod) <= 3 => Scalar::TimeMillis,
        1083 => Scalar::TimeMicros,
        1114 if time_precision(typmod) <= 3 => Scalar::TimestampMillis,
        1114 => Scalar::TimestampMicros,
        1184 => Scalar::ZonedTimestamp,
        1266 => Scalar::ZonedTime,
        1186 => Scalar::MicroDuration,
        1560 if typmod == 1 => Scalar::Bool,
        2950 => Scalar::Text(Some("io.debezium.data.Uuid")),
        114 | 3802 => Scalar::Text(Some("io.debezium.data.Json")),
        142 => Scalar::Text(Some("io.debezium.data.Xml")),
        // text, varchar, char, name, inet, cidr, macaddr, enums and every other type.
        _ => Scalar::Text(None),
    }
}

/// Appends `value` of a column mapped as `mapping`.
pub(crate) fn push_mapped(mapping: Mapping, value: &Value, out: &mut Vec<u8>) {
    if !mapping.array {
        return push_scalar(mapping.scalar, value, out);
    }
    match value {
        Value::Array(items) => push_items(mapping.scalar, items, out),
        // Arrays of types without a typed decoding arrive as their text: split it here.
        Value::Text(text) => match decode_text(ValueKind::Array(ElemKind::Text), text.as_bytes()) {
            Ok(Value::Array(items)) => push_items(mapping.scalar, &items, out),
            // Multi-dimensional arrays and arrays with bounds stay text.
            _ => json_str(out, text),
        },
        other => json_value(other, out),
    }
}

fn push_items(scalar: Scalar, items: &[Value], out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_scalar(scalar, item, out);
    }
    out.push(b']');
}

/// Debezium's placeholder for an unchanged TOASTed `uuid[]` element: the name-based UUID of
/// [`UNAVAILABLE_VALUE`].
pub const UNAVAILABLE_UUID: &str = "b68a35a7-17ad-35b3-af2a-ae46edb4545a";

/// Appends Debezium's placeholder for a value of `mapping` that was not sent: the placeholder
/// text; for `bytea` its bytes; for arrays a one-element array of the element's placeholder,
/// except integer arrays, which hold the placeholder's bytes as numbers.
pub(crate) fn push_unavailable(mapping: Mapping, out: &mut Vec<u8>) {
    let scalar = mapping.scalar;
    if mapping.array && matches!(scalar, Scalar::Int16 | Scalar::Int32 | Scalar::Int64) {
        out.push(b'[');
        for (i, b) in UNAVAILABLE_VALUE.bytes().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_u64(out, u64::from(b));
        }
        out.push(b']');
        return;
    }
    if mapping.array {
        out.push(b'[');
    }
    match scalar {
        Scalar::Bytes => {
            out.push(b'"');
            push_base64(out, UNAVAILABLE_VALUE.as_bytes());
            out.push(b'"');
        }
        Scalar::Text(Some("io.debezium.data.Uuid")) if mapping.array => {
            json_str(out, UNAVAILABLE_UUID)
        }
        _ => json_str(out, UNAVAILABLE_VALUE),
    }
    if mapping.array {
        out.push(b']');
    }
}

fn push_scalar(scalar: Scalar, value: &Value, out: &mut Vec<u8>) {
    let Value::Text(text) = value else {
        // Booleans, integers, floats, bytea and NULL are already typed.
        return json_value(value, out);
    };
    let done = match scalar {
        Scalar::Text(_)
        | Scalar::Int16
        | Scalar::Int32
        | Scalar::Int64
        | Scalar::Float32
        | Scalar::Float64
        | Scalar::Bytes => false,
        Scalar::Bool => match text.as_str() {
            "1" => push_raw(out, b"true"),
            "0" => push_raw(out, b"false"),
            _ => false,
        },
        Scalar::Decimal { scale, .. } => match parse_numeric(text) {
            Some(n) => push_decimal_bytes(&n.rescaled(scale), out),
            None => push_raw(out, b"null"),
        },
        Scalar::VariableDecimal => match parse_numeric(text) {
            Some(n) => {
                out.extend_from_slice(b"{\"scale\":");
                push_i64(out, i64::from(n.scale));
                out.extend_from_slice(b",\"value\":");
                push_decimal_bytes(&n, out);
                out.push(b'}');
                true
            }
            None => push_raw(out, b"null"),
        },
        Scalar::Money => match parse_money(text) {
            Some(n) => push_decimal_bytes(&n, out),
            None => false,
        },
        Scalar::Date => push_opt(out, parse_date(text)),
        Scalar::TimeMillis => push_opt(out, parse_time(text).map(|us| us / 1000)),
        Scalar::TimeMicros => push_opt(out, parse_time(text)),
        Scalar::TimestampMillis => {
            push_opt(out, parse_timestamp(text).map(|us| us.div_euclid(1000)))
        }
        Scalar::TimestampMicros => push_opt(out, parse_timestamp(text)),
        Scalar::ZonedTimestamp => match zoned_timestamp(text) {
            Some(iso) => {
                json_str(out, &iso);
                true
            }
            None => false,
        },
        Scalar::ZonedTime => match zoned_time(text) {
            Some(iso) => {
                json_str(out, &iso);
                true
            }
            None => false,
        },
        Scalar::MicroDuration => push_opt(out, parse_interval(text)),
    };
    if !done {
        json_str(out, text);
    }
}

fn push_raw(out: &mut Vec<u8>, text: &[u8]) -> bool {
    out.extend_from_slice(text);
    true
}

/// A number, or `null` for a value the form cannot hold (`infinity`); never falls back to text,
/// so a column keeps one JSON type.
fn push_opt(out: &mut Vec<u8>, v: Option<i64>) -> bool {
    match v {
        Some(v) => push_i64(out, v),
        None => out.extend_from_slice(b"null"),
    }
    true
}

fn push_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    json_u64(out, v.unsigned_abs());
}

/// A finite decimal: `digits` (ASCII, no sign, no point) × 10^-`scale`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Numeric {
    pub negative: bool,
    pub digits: Vec<u8>,
    pub scale: i32,
}

impl Numeric {
    /// The same value with `scale` fractional digits (zeros added or dropped; PostgreSQL
    /// prints a `numeric(p, s)` with exactly `s`, so nothing but zeros is ever dropped).
    fn rescaled(mut self, scale: i32) -> Numeric {
        while self.scale < scale {
            self.digits.push(b'0');
            self.scale += 1;
        }
        while self.scale > scale && self.digits.len() > 1 {
            self.digits.pop();
            self.scale -= 1;
        }
        self
    }
}

/// `numeric` output: `-123.4500`; `None` for `NaN` and `±Infinity`.
pub(crate) fn parse_numeric(text: &str) -> Option<Numeric> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = rest.split_once('.').unwrap_or((rest, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
    let lead = digits.iter().take_while(|&&d| d == b'0').count();
    digits.drain(..lead.min(digits.len() - 1));
    Some(Numeric {
        negative,
        digits,
        scale: i32::try_from(frac.len()).ok()?,
    })
}

/// `money` output in the C locale (`$1,234.56`, `-$1,234.56`); `None` for other locales' forms.
fn parse_money(text: &str) -> Option<Numeric> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let plain: String = rest
        .strip_prefix('$')?
        .chars()
        .filter(|&c| c != ',')
        .collect();
    let (_, frac) = plain.split_once('.')?;
    if frac.len() != 2 {
        return None;
    }
    let n = parse_numeric(&plain)?;
    Some(Numeric { negative, ..n })
}

/// Appends the base64 of the unscaled value in two's complement, big-endian, in the fewest
/// bytes (Java's `BigInteger.toByteArray`, what Kafka Connect's `Decimal` holds).
fn push_decimal_bytes(n: &Numeric, out: &mut Vec<u8>) -> bool {
    // Magnitude, little-endian base 256.
    let mut mag: Vec<u8> = Vec::with_capacity(n.digits.len() / 2 + 1);
    for &d in &n.digits {
        let mut carry = u32::from(d - b'0');
        for byte in &mut mag {
            let v = u32::from(*byte) * 10 + carry;
            *byte = (v & 0xFF) as u8;
            carry = v >> 8;
        }
        if carry > 0 {
            mag.push(carry as u8);
        }
    }
    while mag.last() == Some(&0) {
        mag.pop();
    }
    let mut be: Vec<u8> = mag.into_iter().rev().collect();
    if be.is_empty() {
        be.push(0);
    } else if n.negative {
        be.insert(0, 0);
        let mut carry = true;
        for byte in be.iter_mut().rev() {
            let (v, c) = (!*byte).overflowing_add(u8::from(carry));
            *byte = v;
            carry = c;
        }
        while be.len() > 1 && be[0] == 0xFF && be[1] & 0x80 != 0 {
            be.remove(0);
        }
    } else if be[0] & 0x80 != 0 {
        be.insert(0, 0);
    }
    out.push(b'"');
    push_base64(out, &be);
    out.push(b'"');
    true
}

/// `date` output (`2024-02-29`, `0044-03-15 BC`) as days since 1970-01-01; `None` for
/// `infinity` and `-infinity`.
pub(crate) fn parse_date(text: &str) -> Option<i64> {
    let (date, bc) = match text.strip_suffix(" BC") {
        Some(d) => (d, true),
        None => (text, false),
    };
    date_days(date, bc)
}

fn date_days(date: &str, bc: bool) -> Option<i64> {
    let mut parts = date.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: u32 = parts.next()?.parse().ok()?;
    let day: u32 = parts.next()?.parse().ok()?;
    // 1 BC is year 0 of the proleptic Gregorian calendar.
    let year = if bc { 1 - year } else { year };
    Some(days_from_civil(year, month, day))
}

/// `time` output (`04:05:06.789`, up to `24:00:00`) as microseconds past midnight.
pub(crate) fn parse_time(text: &str) -> Option<i64> {
    let mut parts = text.splitn(3, ':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let s = parse_seconds(parts.next()?)?;
    Some((h * 60 + m) * 60 * MICROS_PER_SECOND + s)
}

/// `SS` or `SS.ffffff` as microseconds.
fn parse_seconds(text: &str) -> Option<i64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut micros: i64 = whole.parse::<i64>().ok()? * MICROS_PER_SECOND;
    let mut unit = 100_000;
    for d in frac.bytes() {
        micros += i64::from(d - b'0') * unit;
        unit /= 10;
    }
    Some(micros)
}

/// `timestamp` output (`2025-01-01 10:00:00.5`, `… BC`) as microseconds since the epoch;
/// `None` for `infinity` and `-infinity`.
pub(crate) fn parse_timestamp(text: &str) -> Option<i64> {
    let (rest, bc) = match text.strip_suffix(" BC") {
        Some(r) => (r, true),
        None => (text, false),
    };
    let (date, time) = rest.split_once(' ')?;
    Some(date_days(date, bc)? * MICROS_PER_DAY + parse_time(time)?)
}

/// Splits a trailing UTC offset (`+00`, `-05:30`, `+05:45:10`) off a time; returns the time
/// text and the offset in microseconds.
fn split_offset(text: &str) -> Option<(&str, i64)> {
    let at = text.rfind(['+', '-'])?;
    let (time, offset) = text.split_at(at);
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut secs = 0;
    for (i, part) in offset[1..].split(':').enumerate() {
        let v: i64 = part.parse().ok()?;
        secs += v * [3600, 60, 1].get(i)?;
    }
    Some((time, sign * secs * MICROS_PER_SECOND))
}

/// `timestamptz` output (`2025-01-01 10:00:00.5+00`) as `2025-01-01T10:00:00.5Z`.
pub(crate) fn zoned_timestamp(text: &str) -> Option<String> {
    let (rest, bc) = match text.strip_suffix(" BC") {
        Some(r) => (r, true),
        None => (text, false),
    };
    let (date, time) = rest.split_once(' ')?;
    let (time, offset) = split_offset(time)?;
    let utc = date_days(date, bc)? * MICROS_PER_DAY + parse_time(time)? - offset;
    let (year, month, day) = civil_from_days(utc.div_euclid(MICROS_PER_DAY));
    let mut s = match year {
        0..=9999 => format!("{year:04}-{month:02}-{day:02}T"),
        10_000.. => format!("+{year}-{month:02}-{day:02}T"),
        _ => format!("-{:04}-{month:02}-{day:02}T", -year),
    };
    push_time_of_day(&mut s, utc.rem_euclid(MICROS_PER_DAY));
    s.push('Z');
    Some(s)
}

/// `timetz` output (`10:00:00.5+02`) as `08:00:00.5Z`.
pub(crate) fn zoned_time(text: &str) -> Option<String> {
    let (time, offset) = split_offset(text)?;
    let utc = (parse_time(time)? - offset).rem_euclid(MICROS_PER_DAY);
    let mut s = String::with_capacity(16);
    push_time_of_day(&mut s, utc);
    s.push('Z');
    Some(s)
}

/// `HH:MM:SS` and, when not zero, the fraction without trailing zeros (as Java's ISO
/// formatters print it).
fn push_time_of_day(s: &mut String, micros: i64) {
    use std::fmt::Write as _;
    let secs = micros / MICROS_PER_SECOND;
    let _ = write!(
        s,
        "{:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    let frac = micros % MICROS_PER_SECOND;
    if frac != 0 {
        let digits = format!("{frac:06}");
        s.push('.');
        s.push_str(digits.trim_end_matches('0'));
    }
}

/// `interval` output in the `postgres` style (`1 year -2 mons +3 days -04:05:06.5`) as
/// microseconds, a month being 30.4375 days as in Debezium's `MicroDuration`.
pub(crate) fn parse_interval(text: &str) -> Option<i64> {
    let mut total: i64 = 0;
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word.contains(':') {
            let (negative, time) = match word.as_bytes().first() {
                Some(b'-') => (true, &word[1..]),
                Some(b'+') => (false, &word[1..]),
                _ => (false, word),
            };
            let micros = parse_time(time)?;
            total = total.checked_add(if negative { -micros } else { micros })?;
            continue;
        }
        let n: i64 = word.parse().ok()?;
        let unit = match words.next()? {
            "year" | "years" => 12 * MICROS_PER_MONTH,
            "mon" | "mons" => MICROS_PER_MONTH,
            "day" | "days" => MICROS_PER_DAY,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    Some(total)
}
