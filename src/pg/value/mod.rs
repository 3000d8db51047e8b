//! Column values: PostgreSQL *text output* decoded into the typed values of the message
//! formats (docs/protocol.md, "Values").
//!
//! pgoutput sends tuple cells in text form (`'t'`), and a snapshot reads rows with
//! `COPY ... TO STDOUT` in text format; both carry what the type's output function printed.
//! The mapping is decided once per column ([`ValueKind`], from the type OID or a Type
//! message through [`TypeRegistry`]) so that decoding a cell is a `match`, not a lookup.
//!
//! | PostgreSQL type                               | [`Value`]                    |
//! |-----------------------------------------------|------------------------------|
//! | `int2`, `int4`, `int8`, `oid`                 | [`Value::Int`]               |
//! | `float4`, `float8` (also `NaN`, `±Infinity`)  | [`Value::Float`]             |
//! | `bool`                                        | [`Value::Bool`]              |
//! | `bytea`                                       | [`Value::Bytes`]             |
//! | `text`, `varchar`                             | [`Value::Text`]              |
//! | one-dimensional arrays of the types above     | [`Value::Array`]             |
//! | everything else, multi-dimensional arrays, arrays with explicit bounds | [`Value::Text`], verbatim |
//!
//! Text output of dates, times, intervals and floats depends on the session's settings, so the
//! connections that read values must use [`CLIENT_ENCODING`] and [`SESSION_OPTIONS`].

mod array;
mod decode;
#[cfg(test)]
mod tests;
mod types;

pub use decode::{parse_bool, parse_int, ValueError};
pub use types::{
    ElemKind, TypeRegistry, Value, ValueKind, CLIENT_ENCODING, FIRST_USER_TYPE_OID, SESSION_OPTIONS,
};

use array::decode_array;
use decode::decode_scalar;

/// Decodes one value from PostgreSQL text output.
///
/// `text` is the cell exactly as the output function printed it: the bytes of a pgoutput
/// `'t'` cell, or a COPY text-format field *after* COPY's own backslash escapes have been
/// undone (and `\N` turned into NULL by the caller). NULL never reaches this function.
///
/// Scalars other than text and bytea decode without allocating. Invalid input (not a
/// number, invalid UTF-8, malformed bytea or array syntax) is an error, never a panic.
pub fn decode_text(kind: ValueKind, text: &[u8]) -> Result<Value, ValueError> {
    match kind {
        ValueKind::Bool => decode_scalar(ElemKind::Bool, text),
        ValueKind::Int => decode_scalar(ElemKind::Int, text),
        ValueKind::Float => decode_scalar(ElemKind::Float, text),
        ValueKind::Bytes => decode_scalar(ElemKind::Bytes, text),
        ValueKind::Text => decode_scalar(ElemKind::Text, text),
        ValueKind::Array(elem) => decode_array(elem, text),
    }
}

/// [`decode_text`], or the text itself when it is not valid for `kind` (a cell that does
/// not decode is passed on verbatim, never dropped); invalid UTF-8 is replaced (U+FFFD).
pub fn decode_or_verbatim(kind: ValueKind, text: &[u8]) -> Value {
    decode_text(kind, text)
        .unwrap_or_else(|_| Value::Text(String::from_utf8_lossy(text).into_owned()))
}

/// [`decode_text`] into `slot`, reusing the allocation of the text value `slot` holds when
/// the new value is text too (the hot path reuses decoded rows).
pub fn decode_text_into(kind: ValueKind, text: &[u8], slot: &mut Value) -> Result<(), ValueError> {
    if let (ValueKind::Text, Value::Text(s)) = (kind, &mut *slot) {
        let t =
            std::str::from_utf8(text).map_err(|_| ValueError::new("text", "valid UTF-8", text))?;
        s.clear();
        s.push_str(t);
        return Ok(());
    }
    *slot = decode_text(kind, text)?;
    Ok(())
}
