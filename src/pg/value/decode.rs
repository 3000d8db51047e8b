//! Decoding scalars and bytea from PostgreSQL text output, and the error that names what
//! was wrong with the input.

use std::fmt;

use super::types::{ElemKind, Value};

/// Maximum number of input bytes an error shows.
const PREVIEW_BYTES: usize = 64;

/// A cell whose text is not valid for the column's kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} value{}: expected {expected}, got {input}", ElementAt(*.element))]
pub struct ValueError {
    what: &'static str,
    expected: &'static str,
    element: Option<usize>,
    input: String,
}

impl ValueError {
    #[cold]
    pub(super) fn new(what: &'static str, expected: &'static str, input: &[u8]) -> Self {
        ValueError {
            what,
            expected,
            element: None,
            input: preview(input),
        }
    }

    #[cold]
    pub(super) fn in_element(mut self, index: usize) -> Self {
        self.element = Some(index);
        self
    }

    /// The kind of value that was being decoded (`"integer"`, `"float"`, `"array"`, ...).
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// What the input should have looked like.
    pub fn expected(&self) -> &'static str {
        self.expected
    }

    /// Zero-based index of the offending array element, when the error is inside an array.
    pub fn element(&self) -> Option<usize> {
        self.element
    }

    /// The start of the offending input, quoted and escaped (at most 64 bytes of it).
    pub fn input(&self) -> &str {
        &self.input
    }
}

struct ElementAt(Option<usize>);

impl fmt::Display for ElementAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(i) => write!(f, " in array element {i}"),
            None => Ok(()),
        }
    }
}

/// Quoted, escaped, bounded rendering of (the start of) an input; invalid UTF-8 shows as `\xNN`.
fn preview(input: &[u8]) -> String {
    use fmt::Write;
    let mut cut = input.len().min(PREVIEW_BYTES);
    // Cut at a character boundary so a truncated character does not look like bad UTF-8.
    let mut back = 0;
    while cut > 0 && cut < input.len() && back < 3 && input[cut] & 0xC0 == 0x80 {
        cut -= 1;
        back += 1;
    }
    let mut s = String::with_capacity(cut + 24);
    s.push('"');
    for chunk in input[..cut].utf8_chunks() {
        let _ = write!(s, "{}", chunk.valid().escape_debug());
        for b in chunk.invalid() {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    s.push('"');
    if cut < input.len() {
        let _ = write!(s, "... ({} bytes)", input.len());
    }
    s
}

pub(super) fn decode_scalar(kind: ElemKind, text: &[u8]) -> Result<Value, ValueError> {
    match kind {
        ElemKind::Bool => parse_bool(text)
            .map(Value::Bool)
            .ok_or_else(|| ValueError::new("boolean", "'t' or 'f'", text)),
        ElemKind::Int => parse_int(text).map(Value::Int).ok_or_else(|| {
            ValueError::new("integer", "a decimal integer within the 64-bit range", text)
        }),
        ElemKind::Float => parse_float(text).map(Value::Float).ok_or_else(|| {
            ValueError::new(
                "float",
                "a decimal floating-point number, NaN, Infinity or -Infinity",
                text,
            )
        }),
        ElemKind::Bytes => decode_bytea(text).map(Value::Bytes),
        ElemKind::Text => match std::str::from_utf8(text) {
            Ok(s) => Ok(Value::Text(s.to_owned())),
            Err(_) => Err(ValueError::new("text", "valid UTF-8", text)),
        },
    }
}

/// `boolout`'s `t` and `f`, and the `true` and `false` of array literals.
#[inline]
pub fn parse_bool(text: &[u8]) -> Option<bool> {
    match text {
        b"t" | b"true" => Some(true),
        b"f" | b"false" => Some(false),
        _ => None,
    }
}

/// `int8in` without the whitespace tolerance: optional sign, then ASCII digits.
#[inline]
pub fn parse_int(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, text),
    };
    if digits.is_empty() {
        return None;
    }
    // Accumulate negatively so i64::MIN does not overflow.
    let mut acc: i64 = 0;
    for &c in digits {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        acc = acc.checked_mul(10)?.checked_sub(i64::from(d))?;
    }
    if negative {
        Some(acc)
    } else {
        acc.checked_neg()
    }
}

fn parse_float(text: &[u8]) -> Option<f64> {
    match text {
        // The spellings float8out uses; `str::parse` would also take them, this is the fast path.
        b"NaN" => Some(f64::NAN),
        b"Infinity" => Some(f64::INFINITY),
        b"-Infinity" => Some(f64::NEG_INFINITY),
        _ => std::str::from_utf8(text).ok()?.parse().ok(),
    }
}

/// `byteain`: hex format (`\x0001ff`, the default `bytea_output`) or the legacy escape format.
fn decode_bytea(text: &[u8]) -> Result<Vec<u8>, ValueError> {
    match text {
        [b'\\', b'x', hex @ ..] => decode_bytea_hex(hex).ok_or_else(|| {
            ValueError::new(
                "bytea",
                "\\x followed by an even number of hex digits",
                text,
            )
        }),
        _ => decode_bytea_escape(text).ok_or_else(|| {
            ValueError::new(
                "bytea",
                "hex format (\\x...) or escape format (\\\\ or \\ooo octal escapes)",
                text,
            )
        }),
    }
}

pub(super) fn decode_bytea_hex(hex: &[u8]) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Vec::with_capacity(hex.len() / 2);
    for pair in hex.chunks_exact(2) {
        out.push(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?);
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn decode_bytea_escape(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'\\' {
            out.push(text[i]);
            i += 1;
            continue;
        }
        match text.get(i + 1..i + 4) {
            Some(&[a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7']) => {
                out.push((a - b'0') << 6 | (b - b'0') << 3 | (c - b'0'));
                i += 4;
            }
            _ if text.get(i + 1) == Some(&b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            _ => return None,
        }
    }
    Some(out)
}
