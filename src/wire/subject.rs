//! NATS subjects for tables: how a schema-qualified table name becomes subject tokens, and
//! back.
//!
//! # The rule
//!
//! A change event is published on
//!
//! | table                          | subject                          | example                       |
//! |--------------------------------|----------------------------------|-------------------------------|
//! | in schema `public`             | `{prefix}.{table}.{op}`          | `cdc.users.insert`            |
//! | in any other schema            | `{prefix}.{schema}.{table}.{op}` | `cdc.sales.invoices.update`   |
//!
//! with `{op}` one of `insert`, `update`, `delete`, `truncate` and `{prefix}` the stream's
//! subject prefix (`cdc` by default).
//!
//! Each schema or table name becomes exactly **one** subject token. Bytes of the name outside
//! `A`-`Z`, `a`-`z`, `0`-`9`, `_` and `-` are written as `%XX`, the uppercase hexadecimal value of
//! each byte of the name's UTF-8 encoding; that includes `%` itself. So `order.items` becomes
//! `order%2Eitems`, `my table` becomes `my%20table` and `straße` becomes `stra%C3%9Fe`. Names
//! are case-sensitive, as in PostgreSQL: `"Users"` becomes `Users`.
//!
//! Consequences a consumer can rely on:
//!
//! * A name never contains `.`, `*`, `>` or whitespace once encoded, so every subject is valid
//!   and wildcards only ever match whole names.
//! * A public table has one token and any other table two, so a public table can never
//!   collide with a schema-qualified one (schema `public` is never written out), and the
//!   token count tells them apart: `cdc.users.*` and `cdc.*.*` match only public tables,
//!   `cdc.sales.*.*` only the tables of schema `sales`, `cdc.*.*.*` only tables outside
//!   `public`. (`cdc.sales.>` would also match a public table named `sales`.)
//! * The encoding is a bijection: [`parse_table_token`] and [`parse_change_subject`] give the
//!   names back and accept only what the encoding produces.
//!
//! The same table token (`users`, `sales.invoices`) is used in the other per-table subjects,
//! e.g. `init.snap.{table}.{snapshot_id}.{chunk}`.

use super::event::Operation;
use super::names::{CDC_SUBJECT_PREFIX, INIT_SUBJECT_PREFIX, SNAPSHOT_REQUEST_PREFIX};

/// The schema whose tables get a subject without a schema token.
pub const DEFAULT_SCHEMA: &str = "public";

/// Uppercase hex digits for `%XX`.
const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// True for the bytes a name keeps as they are in a subject token.
#[inline]
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Appends `name` as one subject token (see the [module docs](self)).
///
/// PostgreSQL names are never empty; an empty name would give an empty token, which is not
/// a valid subject (and which [`parse_table_token`] rejects).
pub fn push_name_token(out: &mut String, name: &str) {
    // Names are mostly plain, so copy runs of plain bytes in one go. Plain bytes are ASCII,
    // so a non-empty run starts and ends on character boundaries.
    let bytes = name.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !is_plain(b) {
            if start < i {
                out.push_str(&name[start..i]);
            }
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xF)] as char);
            start = i + 1;
        }
    }
    out.push_str(&name[start..]);
}

/// Appends the table part of a subject: `{table}` for schema `public`, else `{schema}.{table}`.
pub fn push_table_token(out: &mut String, schema: &str, table: &str) {
    if schema != DEFAULT_SCHEMA {
        push_name_token(out, schema);
        out.push('.');
    }
    push_name_token(out, table);
}

/// The table part of a subject, between the prefix and what follows: `users` for
/// `public.users`, `sales.invoices` for `sales.invoices`, `stra%C3%9Fe` for `public.straße`.
pub fn table_token(schema: &str, table: &str) -> String {
    let mut s = String::with_capacity(schema.len() + table.len() + 1);
    push_table_token(&mut s, schema, table);
    s
}

/// The subject of a change event: `{prefix}.{table_token}.{op}`, e.g. `cdc.users.insert` or
/// `cdc.sales.invoices.delete`. `prefix` is used as it is (it may itself contain dots).
pub fn change_subject(prefix: &str, schema: &str, table: &str, op: Operation) -> String {
    let mut s = String::with_capacity(prefix.len() + schema.len() + table.len() + 11);
    s.push_str(prefix);
    s.push('.');
    push_table_token(&mut s, schema, table);
    s.push('.');
    s.push_str(op.as_lower());
    s
}

/// The consumer filter for every change of one table: `cdc.{table_token}.*`.
pub fn table_changes_filter(token: &str) -> String {
    format!("{CDC_SUBJECT_PREFIX}.{token}.*")
}

/// The subject of a table's snapshot requests: `snapshot.request.{table_token}`.
pub fn snapshot_request_subject(token: &str) -> String {
    format!("{SNAPSHOT_REQUEST_PREFIX}.{token}")
}

/// The subject of a table's snapshot metas (and failure documents):
/// `init.meta.{table_token}`.
pub fn snapshot_meta_subject(token: &str) -> String {
    format!("{INIT_SUBJECT_PREFIX}.meta.{token}")
}

/// The consumer filter for every chunk of one snapshot: `init.snap.{table_token}.{id}.*`.
pub fn snapshot_chunks_filter(token: &str, snapshot_id: &str) -> String {
    format!("{INIT_SUBJECT_PREFIX}.snap.{token}.{snapshot_id}.*")
}

/// The [`SCHEMAS_BUCKET`](super::names::SCHEMAS_BUCKET) key of a table: its subject token (`users`, or `sales.invoices`
/// outside `public`) with `%` written as `=`, because KV keys allow only `[-/_=.a-zA-Z0-9]`.
pub fn schema_key(schema: &str, table: &str) -> String {
    let mut token = String::new();
    push_table_token(&mut token, schema, table);
    token.replace('%', "=")
}

/// The table token of a [`schema_key`] (the inverse of the `%` → `=` replacement).
pub fn schema_key_token(key: &str) -> String {
    key.replace('=', "%")
}

/// A subject or token that the rule in the [module docs](self) does not produce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subject {input:?}: {reason}")]
pub struct InvalidSubject {
    input: String,
    reason: &'static str,
}

impl InvalidSubject {
    #[cold]
    fn new(input: &str, reason: &'static str) -> Self {
        InvalidSubject {
            input: input.to_owned(),
            reason,
        }
    }

    /// The subject or token that was rejected.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Why it was rejected.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// Decodes one name token; `Err` holds the reason.
fn decode_name(token: &str) -> Result<String, &'static str> {
    if token.is_empty() {
        return Err("empty name token");
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_plain(b) {
            out.push(b);
            i += 1;
        } else if b == b'%' {
            let hi = bytes.get(i + 1).and_then(|&c| hex_value(c));
            let lo = bytes.get(i + 2).and_then(|&c| hex_value(c));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err("'%' not followed by two uppercase hex digits");
            };
            let decoded = hi << 4 | lo;
            // Only bytes that must be escaped are, so each name has a single spelling.
            if is_plain(decoded) {
                return Err("escaped byte that needs no escaping");
            }
            out.push(decoded);
            i += 3;
        } else {
            return Err("byte that must be escaped as %XX");
        }
    }
    String::from_utf8(out).map_err(|_| "escapes that do not decode to UTF-8")
}

/// Value of an uppercase hex digit.
fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Schema and table from the table part of a subject (the inverse of [`table_token`]):
/// `users` gives `("public", "users")`, `sales.invoices` gives `("sales", "invoices")`.
///
/// Accepts exactly what [`table_token`] produces: one or two tokens, canonical `%XX` escapes
/// only, and no explicit `public.` schema token.
pub fn parse_table_token(token: &str) -> Result<(String, String), InvalidSubject> {
    let err = |reason| InvalidSubject::new(token, reason);
    let mut parts = token.split('.');
    let first = parts.next().unwrap_or_default();
    let (schema, table) = match (parts.next(), parts.next()) {
        (None, _) => (DEFAULT_SCHEMA.to_owned(), decode_name(first).map_err(err)?),
        (Some(second), None) => {
            let schema = decode_name(first).map_err(err)?;
            if schema == DEFAULT_SCHEMA {
                return Err(err("schema public is never written out"));
            }
            (schema, decode_name(second).map_err(err)?)
        }
        (Some(_), Some(_)) => return Err(err("more than two name tokens")),
    };
    Ok((schema, table))
}

/// Schema, table and operation from a change subject (the inverse of [`change_subject`]).
///
/// `prefix` must be the one the subject was published with, e.g. `cdc`.
pub fn parse_change_subject(
    prefix: &str,
    subject: &str,
) -> Result<(String, String, Operation), InvalidSubject> {
    let err = |reason| InvalidSubject::new(subject, reason);
    let rest = subject
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(|| err("does not start with the prefix"))?;
    let (token, op) = rest
        .rsplit_once('.')
        .ok_or_else(|| err("no operation token"))?;
    let op = Operation::from_lower(op).ok_or_else(|| err("unknown operation"))?;
    let (schema, table) = parse_table_token(token).map_err(|e| err(e.reason))?;
    Ok((schema, table, op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn public_tables_have_one_token() {
        assert_eq!(table_token("public", "users"), "users");
        assert_eq!(
            change_subject("cdc", "public", "users", Operation::Insert),
            "cdc.users.insert"
        );
        assert_eq!(
            change_subject("cdc", "public", "users", Operation::Truncate),
            "cdc.users.truncate"
        );
    }

    #[test]
    fn other_schemas_have_two_tokens() {
        assert_eq!(table_token("sales", "invoices"), "sales.invoices");
        assert_eq!(
            change_subject("cdc", "sales", "invoices", Operation::Update),
            "cdc.sales.invoices.update"
        );
        // Schema names are case-sensitive: only exactly `public` is left out.
        assert_eq!(table_token("Public", "users"), "Public.users");
    }

    #[test]
    fn prefix_is_used_as_is() {
        assert_eq!(
            change_subject("prod.cdc", "public", "t", Operation::Delete),
            "prod.cdc.t.delete"
        );
        assert_eq!(
            parse_change_subject("prod.cdc", "prod.cdc.t.delete").unwrap(),
            ("public".into(), "t".into(), Operation::Delete)
        );
    }

    #[test]
    fn per_table_subjects() {
        assert_eq!(
            table_changes_filter("sales.invoices"),
            "cdc.sales.invoices.*"
        );
        assert_eq!(snapshot_request_subject("users"), "snapshot.request.users");
        assert_eq!(snapshot_meta_subject("users"), "init.meta.users");
        assert_eq!(
            snapshot_chunks_filter("users", "s1"),
            "init.snap.users.s1.*"
        );
    }

    #[test]
    fn keys_are_valid_kv_keys() {
        assert_eq!(schema_key("public", "users"), "users");
        assert_eq!(schema_key("sales", "in voices"), "sales.in=20voices");
        let k = schema_key("public", "ü.x");
        assert!(
            k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)),
            "{k}"
        );
        assert_eq!(
            parse_table_token(&schema_key_token(&k)).unwrap(),
            ("public".to_owned(), "ü.x".to_owned())
        );
    }

    #[test]
    fn special_bytes_are_escaped() {
        let cases = [
            ("order.items", "order%2Eitems"),
            ("a*b", "a%2Ab"),
            ("a>b", "a%3Eb"),
            ("my table", "my%20table"),
            ("tab\there", "tab%09here"),
            ("100%", "100%25"),
            ("straße", "stra%C3%9Fe"),
            ("😀", "%F0%9F%98%80"),
            ("$sys", "%24sys"),
            ("Mixed_Case-1", "Mixed_Case-1"),
            ("\"quoted\"", "%22quoted%22"),
        ];
        for (name, token) in cases {
            assert_eq!(table_token("public", name), token, "{name:?}");
            assert_eq!(
                parse_table_token(token).unwrap(),
                ("public".to_owned(), name.to_owned())
            );
        }
        assert_eq!(table_token("a.b", "c.d"), "a%2Eb.c%2Ed");
    }

    #[test]
    fn public_and_qualified_tables_never_collide() {
        // A public table named like a qualified one keeps its dot inside one token.
        assert_eq!(table_token("public", "sales.invoices"), "sales%2Einvoices");
        assert_ne!(
            table_token("public", "sales.invoices"),
            table_token("sales", "invoices")
        );
    }

    #[test]
    fn parse_rejects_what_encoding_never_produces() {
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "public.users",
            "a b",
            "a*",
            ">",
            "%",
            "%2",
            "%2e",
            "%2G",
            "%41",
            "%5F",
            "%FF",
            "%C3",
            "é",
        ] {
            assert!(parse_table_token(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_table_token("%70ublic.users").is_err());
        let e = parse_table_token("public.users").unwrap_err();
        assert_eq!(e.input(), "public.users");
        assert_eq!(e.reason(), "schema public is never written out");
    }

    #[test]
    fn parse_change_subject_rejects_malformed_subjects() {
        for bad in [
            "cdc",
            "cdc.",
            "cdc.users",
            "cdc.users.upsert",
            "cdc.users.INSERT",
            "cdcx.users.insert",
            "other.users.insert",
            "cdc.a.b.c.insert",
            "cdc..insert",
            "cdc.public.users.insert",
        ] {
            assert!(
                parse_change_subject("cdc", bad).is_err(),
                "{bad:?} was accepted"
            );
        }
        assert_eq!(
            parse_change_subject("cdc", "cdc.sales.invoices.truncate").unwrap(),
            ("sales".into(), "invoices".into(), Operation::Truncate)
        );
    }

    fn any_op() -> impl Strategy<Value = Operation> {
        prop::sample::select(vec![
            Operation::Insert,
            Operation::Update,
            Operation::Delete,
            Operation::Truncate,
        ])
    }

    /// PostgreSQL names are never empty; mix arbitrary strings with tricky ASCII ones.
    fn any_name() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z._%*> $]{1,12}",
            Just("public".to_owned()),
        ]
        .prop_filter("names are not empty", |s| !s.is_empty())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn tokens_round_trip(schema in any_name(), table in any_name(), op in any_op()) {
            let token = table_token(&schema, &table);
            prop_assert!(token.bytes().all(|b| is_plain(b) || b == b'%' || b == b'.'));
            let dots = token.bytes().filter(|&b| b == b'.').count();
            prop_assert_eq!(dots, usize::from(schema != DEFAULT_SCHEMA));
            prop_assert_eq!(parse_table_token(&token).unwrap(), (schema.clone(), table.clone()));

            let subject = change_subject("cdc", &schema, &table, op);
            prop_assert_eq!(subject.split('.').count(), 3 + dots);
            prop_assert!(subject.split('.').all(|t| !t.is_empty()));
            prop_assert_eq!(parse_change_subject("cdc", &subject).unwrap(), (schema, table, op));
        }

        /// Whatever parses is canonical: encoding it again gives the same token.
        #[test]
        fn parse_accepts_only_canonical_tokens(token in "[a-zA-Z0-9_.%-]{0,8}|(%[0-9A-Fa-f]{2}){1,4}") {
            if let Ok((schema, table)) = parse_table_token(&token) {
                prop_assert_eq!(table_token(&schema, &table), token);
            }
        }
    }
}
