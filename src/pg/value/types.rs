//! The typed values and the kind of each column, decided once per column.

use std::collections::HashMap;

/// `client_encoding` for every connection whose text output we decode.
///
/// Output functions run in the walsender (or COPY) session and their result is converted to
/// the session's client encoding before it is sent, so the bytes are UTF-8 only if we ask
/// for it; [`super::decode_text`] rejects anything that is not UTF-8.
pub const CLIENT_ENCODING: &str = "UTF8";

/// Libpq `options` for every connection whose text output we decode.
///
/// Output functions run inside the walsender session with *its* GUCs, so a server-side or
/// per-role `DateStyle`, `IntervalStyle`, `TimeZone` or `extra_float_digits` would otherwise
/// change what consumers receive. These are the settings PostgreSQL's own subscriber uses
/// (plus `timezone=UTC`): ISO dates, `postgres` intervals, shortest exact floats, and
/// timestamptz printed in UTC. Snapshot (COPY) connections must use the same settings so a
/// consumer never sees two forms of one value.
///
/// `standard_conforming_strings=on` keeps backslashes in string literals literal whatever the
/// server or role says, so the literals the bridge quotes mean what they say.
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c timezone=UTC -c standard_conforming_strings=on";

/// First OID that is not assigned by `initdb` (`FirstGenbkiObjectId`); pgoutput sends a Type
/// message for every column whose type OID is at least this.
pub const FIRST_USER_TYPE_OID: u32 = 10_000;

/// A decoded column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL (a `'n'` cell, or a NULL array element).
    Null,
    /// `bool`.
    Bool(bool),
    /// `int2`, `int4`, `int8` and `oid`.
    Int(i64),
    /// `float4` and `float8`, including NaN and the infinities. A `float4` is the decimal
    /// PostgreSQL printed read as an `f64` (`0.1` stays `0.1`), not the widened `f32`.
    Float(f64),
    /// `text`, `varchar`, and the exact text PostgreSQL printed for every other type.
    Text(String),
    /// `bytea`.
    Bytes(Vec<u8>),
    /// A one-dimensional array of one of the scalar kinds above; elements may be [`Value::Null`].
    Array(Vec<Value>),
}

/// Element type of an array column (and the scalar part of [`ValueKind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemKind {
    /// `bool`.
    Bool,
    /// `int2`, `int4`, `int8`, `oid`.
    Int,
    /// `float4`, `float8`.
    Float,
    /// `bytea`.
    Bytes,
    /// `text`, `varchar`.
    Text,
}

/// How to decode one column, resolved once from its type OID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueKind {
    /// `bool` → [`Value::Bool`].
    Bool,
    /// `int2`, `int4`, `int8`, `oid` → [`Value::Int`].
    Int,
    /// `float4`, `float8` → [`Value::Float`].
    Float,
    /// `bytea` → [`Value::Bytes`].
    Bytes,
    /// Any other type → [`Value::Text`] with the text unchanged.
    Text,
    /// One-dimensional array of the given element kind → [`Value::Array`]; arrays that are
    /// multi-dimensional or have explicit bounds become [`Value::Text`].
    Array(ElemKind),
}

impl From<ElemKind> for ValueKind {
    fn from(e: ElemKind) -> Self {
        match e {
            ElemKind::Bool => ValueKind::Bool,
            ElemKind::Int => ValueKind::Int,
            ElemKind::Float => ValueKind::Float,
            ElemKind::Bytes => ValueKind::Bytes,
            ElemKind::Text => ValueKind::Text,
        }
    }
}

impl ValueKind {
    /// Kind of a built-in type (OID below [`FIRST_USER_TYPE_OID`]); [`ValueKind::Text`] for
    /// every type without a typed mapping.
    pub const fn from_oid(oid: u32) -> ValueKind {
        match oid {
            16 => ValueKind::Bool,
            17 => ValueKind::Bytes,
            20 | 21 | 23 | 26 => ValueKind::Int,
            25 | 1043 => ValueKind::Text,
            700 | 701 => ValueKind::Float,
            1000 => ValueKind::Array(ElemKind::Bool),
            1001 => ValueKind::Array(ElemKind::Bytes),
            1005 | 1007 | 1016 | 1028 => ValueKind::Array(ElemKind::Int),
            1021 | 1022 => ValueKind::Array(ElemKind::Float),
            1009 | 1015 => ValueKind::Array(ElemKind::Text),
            _ => ValueKind::Text,
        }
    }

    /// Kind of a type named as in a pgoutput Type message: `namespace` is `""` (or
    /// `"pg_catalog"`) for built-in types. Only `pg_catalog` names map to typed kinds; types
    /// of any other schema (enums, extension types, ...) are [`ValueKind::Text`].
    pub fn from_type_name(namespace: &str, name: &str) -> ValueKind {
        if !namespace.is_empty() && namespace != "pg_catalog" {
            return ValueKind::Text;
        }
        match name {
            "bool" => ValueKind::Bool,
            "bytea" => ValueKind::Bytes,
            "int2" | "int4" | "int8" | "oid" => ValueKind::Int,
            "float4" | "float8" => ValueKind::Float,
            "text" | "varchar" => ValueKind::Text,
            "_bool" => ValueKind::Array(ElemKind::Bool),
            "_bytea" => ValueKind::Array(ElemKind::Bytes),
            "_int2" | "_int4" | "_int8" | "_oid" => ValueKind::Array(ElemKind::Int),
            "_float4" | "_float8" => ValueKind::Array(ElemKind::Float),
            "_text" | "_varchar" => ValueKind::Array(ElemKind::Text),
            _ => ValueKind::Text,
        }
    }
}

/// Kinds of user types (OID ≥ [`FIRST_USER_TYPE_OID`]) learned from pgoutput Type messages.
///
/// A Type message names the column type's *base* type, so a domain over `int4` arrives as
/// `("", "int4")` and decodes as an integer, while an enum arrives under its own schema and
/// decodes as text. User type OIDs differ between databases, hence the per-session map.
#[derive(Debug, Clone, Default)]
pub struct TypeRegistry {
    kinds: HashMap<u32, ValueKind>,
}

impl TypeRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a Type message (`oid`, base type `namespace` and `name`) and returns the kind
    /// it resolves to. A later message for the same OID replaces the earlier one.
    pub fn register(&mut self, oid: u32, namespace: &str, name: &str) -> ValueKind {
        let kind = ValueKind::from_type_name(namespace, name);
        self.kinds.insert(oid, kind);
        kind
    }

    /// Kind of a column type: the built-in table below [`FIRST_USER_TYPE_OID`], the
    /// registered kind otherwise, [`ValueKind::Text`] for an unknown user type.
    pub fn kind(&self, oid: u32) -> ValueKind {
        if oid < FIRST_USER_TYPE_OID {
            ValueKind::from_oid(oid)
        } else {
            self.kinds.get(&oid).copied().unwrap_or(ValueKind::Text)
        }
    }

    /// Number of registered user types.
    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    /// True when no user type has been registered.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }
}
