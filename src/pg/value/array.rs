//! `array_out` syntax: one-dimensional arrays of the typed element kinds; anything else
//! (more dimensions, explicit bounds) stays text.

use super::decode::{decode_scalar, ValueError};
use super::types::{ElemKind, Value};

/// Whitespace as `array_in` skips it (`scanner_isspace`).
pub(super) fn is_array_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

fn skip_space(text: &[u8], mut pos: usize) -> usize {
    while pos < text.len() && is_array_space(text[pos]) {
        pos += 1;
    }
    pos
}

/// One scanned array element: `text[start..end]` still holds its backslash escapes when
/// `escaped`; `next` is the position after it (after the closing quote, if quoted).
struct Element {
    start: usize,
    end: usize,
    quoted: bool,
    escaped: bool,
    next: usize,
}

fn array_error(expected: &'static str, text: &[u8]) -> ValueError {
    ValueError::new("array", expected, text)
}

/// `array_out` syntax with `,` as the delimiter (the delimiter of every element type we type).
pub(super) fn decode_array(elem: ElemKind, text: &[u8]) -> Result<Value, ValueError> {
    let mut pos = skip_space(text, 0);
    match text.get(pos) {
        Some(b'{') => pos += 1,
        // `[1:2]={...}`: non-default lower bounds, printed only for such arrays.
        Some(b'[') => return array_as_text(text),
        _ => return Err(array_error("'{' opening the array", text)),
    }
    let mut items = Vec::new();
    let mut scratch = Vec::new();
    pos = skip_space(text, pos);
    if text.get(pos) == Some(&b'}') {
        pos += 1;
    } else {
        loop {
            pos = skip_space(text, pos);
            let el = match text.get(pos) {
                // A nested array: multi-dimensional, kept as text.
                Some(b'{') => return array_as_text(text),
                Some(b'"') => scan_quoted(text, pos)?,
                Some(_) => scan_unquoted(text, pos)?,
                None => return Err(array_error("an element or '}'", text)),
            };
            let raw = &text[el.start..el.end];
            let value = if !el.quoted && !el.escaped && raw.eq_ignore_ascii_case(b"NULL") {
                Value::Null
            } else {
                let bytes = if el.escaped {
                    unescape_into(raw, &mut scratch);
                    &scratch[..]
                } else {
                    raw
                };
                decode_scalar(elem, bytes).map_err(|e| e.in_element(items.len()))?
            };
            items.push(value);
            pos = skip_space(text, el.next);
            match text.get(pos) {
                Some(b',') => pos += 1,
                Some(b'}') => {
                    pos += 1;
                    break;
                }
                _ => return Err(array_error("',' or '}' after an array element", text)),
            }
        }
    }
    if skip_space(text, pos) != text.len() {
        return Err(array_error("nothing after the closing '}'", text));
    }
    Ok(Value::Array(items))
}

fn array_as_text(text: &[u8]) -> Result<Value, ValueError> {
    match std::str::from_utf8(text) {
        Ok(s) => Ok(Value::Text(s.to_owned())),
        Err(_) => Err(array_error("valid UTF-8", text)),
    }
}

/// `text[open]` is the opening `"`.
fn scan_quoted(text: &[u8], open: usize) -> Result<Element, ValueError> {
    let mut escaped = false;
    let mut i = open + 1;
    loop {
        match text.get(i) {
            Some(b'"') => {
                return Ok(Element {
                    start: open + 1,
                    end: i,
                    quoted: true,
                    escaped,
                    next: i + 1,
                })
            }
            Some(b'\\') if i + 1 < text.len() => {
                escaped = true;
                i += 2;
            }
            Some(b'\\') | None => {
                return Err(array_error("a closing '\"' for a quoted element", text))
            }
            Some(_) => i += 1,
        }
    }
}

/// `text[start]` is the first non-space byte of an unquoted element; trailing unescaped
/// whitespace is not part of it.
fn scan_unquoted(text: &[u8], start: usize) -> Result<Element, ValueError> {
    let mut escaped = false;
    let mut end = start;
    let mut i = start;
    loop {
        match text.get(i) {
            Some(b',' | b'}') => break,
            Some(b'\\') if i + 1 < text.len() => {
                escaped = true;
                i += 2;
                end = i;
            }
            Some(b'"' | b'{') => {
                return Err(array_error(
                    "no '\"' or '{' inside an unquoted element",
                    text,
                ))
            }
            Some(&c) if is_array_space(c) => i += 1,
            Some(b'\\') | None => return Err(array_error("a closing '}'", text)),
            Some(_) => {
                i += 1;
                end = i;
            }
        }
    }
    if end == start {
        return Err(array_error("an element before ',' or '}'", text));
    }
    Ok(Element {
        start,
        end,
        quoted: false,
        escaped,
        next: i,
    })
}

/// Removes array backslash escapes: `\c` stands for `c`.
fn unescape_into(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        if b == b'\\' {
            if let Some(&next) = bytes.next() {
                out.push(next);
            }
        } else {
            out.push(b);
        }
    }
}
