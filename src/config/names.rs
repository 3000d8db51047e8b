//! Name rules: replication slots, PostgreSQL identifiers and tables, JetStream streams,
//! message-id namespaces and snapshot reply prefixes. Each check returns a reason without the
//! field's name; the caller adds it.

/// PostgreSQL's identifier length limit (NAMEDATALEN - 1), in bytes.
pub(super) const MAX_PG_IDENTIFIER_BYTES: usize = 63;
/// JetStream's stream name length limit, in bytes.
pub(super) const MAX_STREAM_NAME_BYTES: usize = 255;
/// Longest message-id namespace, in characters.
pub(super) const MAX_ID_NAMESPACE_LEN: usize = 64;

/// Subject prefixes of the bridge's own streams and of the NATS system subjects: a reply
/// prefix overlapping one would let a requester have replies stored or sent to an API.
const RESERVED_SUBJECT_PREFIXES: &[&str] = &["cdc.", "init.", "snapshot.", "outbox.", "dlq."];

/// Checks a snapshot reply prefix: printable, no wildcards, whole tokens ending in `.`, and
/// clear of the bridge's streams and of `$`-subjects (JetStream API, KV buckets, system).
pub(super) fn check_reply_prefix(prefix: &str) -> Result<(), String> {
    let shown = format!("{prefix:?}");
    if prefix.is_empty() {
        return Err("is empty: use the NATS inbox prefix, e.g. _INBOX.".into());
    }
    if !prefix.ends_with('.') {
        return Err(format!(
            "{shown} must end with '.' so it matches whole tokens, e.g. \"{prefix}.\""
        ));
    }
    check_subject_prefix(prefix, &shown)
}

/// Checks the bridge's inbox prefix: as a reply prefix, but without the final `.`, which the
/// NATS client adds itself before each inbox's unique token.
pub(super) fn check_inbox_prefix(prefix: &str) -> Result<(), String> {
    let shown = format!("{prefix:?}");
    if prefix.is_empty() {
        return Err(
            "is empty: use _INBOX (the default) or a prefix of the bridge's own, e.g. \
                    _INBOX_pgbridge"
                .into(),
        );
    }
    if prefix.ends_with('.') {
        return Err(format!(
            "{shown} must not end with '.': the client adds '.' and a unique token to it"
        ));
    }
    check_subject_prefix(&format!("{prefix}."), &shown)
}

/// The rules reply and inbox prefixes share, on `dotted` (the prefix ending in `.`); errors
/// name it as `shown`.
fn check_subject_prefix(dotted: &str, shown: &str) -> Result<(), String> {
    if dotted.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "{shown} contains whitespace or non-ASCII characters"
        ));
    }
    if dotted.contains(['*', '>']) {
        return Err(format!("{shown} contains a wildcard (* or >)"));
    }
    let body = dotted.strip_suffix('.').unwrap_or(dotted);
    if body.is_empty() || body.split('.').any(str::is_empty) {
        return Err(format!("{shown} has an empty subject token"));
    }
    if dotted.starts_with('$') {
        return Err(format!(
            "{shown} reaches system subjects ($JS, $KV, $SYS): use an inbox prefix such as _INBOX."
        ));
    }
    let lower = dotted.to_ascii_lowercase();
    if let Some(r) = RESERVED_SUBJECT_PREFIXES
        .iter()
        .find(|r| lower.starts_with(*r) || r.starts_with(&lower))
    {
        return Err(format!(
            "{shown} overlaps the bridge's subjects {r}>: use an inbox prefix such as _INBOX."
        ));
    }
    Ok(())
}

/// PostgreSQL's replication slot rule: lower-case letters, digits and underscore, 1-63 bytes.
pub(super) fn check_slot_name(slot: &str) -> Result<(), String> {
    if slot.is_empty() {
        return Err("is empty".into());
    }
    if slot.len() > MAX_PG_IDENTIFIER_BYTES
        || !slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "'{slot}' must be 1-{MAX_PG_IDENTIFIER_BYTES} characters of a-z, 0-9 and _ \
             (PostgreSQL's rule for replication slot names)"
        ));
    }
    Ok(())
}

/// A message-id namespace: 1-64 characters of `[A-Za-z0-9_-]`, so an id stays one NATS header
/// value and is easy to match.
pub(super) fn check_id_namespace(ns: &str) -> Result<(), String> {
    if ns.is_empty()
        || ns.len() > MAX_ID_NAMESPACE_LEN
        || !ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "{ns:?} must be 1-{MAX_ID_NAMESPACE_LEN} characters of A-Z, a-z, 0-9, _ and -"
        ));
    }
    Ok(())
}

/// An unquoted PostgreSQL identifier: a letter or `_`, then letters, digits, `_` or `$`, at
/// most 63 bytes. Names that need quoting are refused: they would also need escaping in
/// subjects and SQL.
pub(super) fn check_identifier(name: &str) -> Result<(), String> {
    let Some(first) = name.chars().next() else {
        return Err("name is empty".into());
    };
    if name.len() > MAX_PG_IDENTIFIER_BYTES {
        return Err(format!(
            "name '{name}' is longer than {MAX_PG_IDENTIFIER_BYTES} bytes"
        ));
    }
    if !(first.is_alphabetic() || first == '_') {
        return Err(format!("name '{name}' must start with a letter or '_'"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || *c == '_' || *c == '$'))
    {
        return Err(format!(
            "name '{name}' contains {bad:?}; use letters, digits, '_' and '$' \
             (names that need quoting are not supported)"
        ));
    }
    Ok(())
}

/// `table` or `schema.table`, each part an unquoted identifier.
pub(super) fn check_table_name(table: &str) -> Result<(), String> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2 {
        return Err(format!(
            "table '{table}' has more than one '.'; write table or schema.table"
        ));
    }
    for part in parts {
        check_identifier(part).map_err(|r| format!("table '{table}': {r}"))?;
    }
    Ok(())
}

/// JetStream's rule: no whitespace, `.`, `*`, `>`, path separators or control characters.
pub(super) fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("stream name is empty".into());
    }
    if name.len() > MAX_STREAM_NAME_BYTES {
        return Err(format!(
            "stream name is longer than {MAX_STREAM_NAME_BYTES} bytes"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(format!(
            "stream name '{name}' contains {bad:?}; JetStream stream names cannot contain \
             whitespace, '.', '*', '>', '/' or '\\'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sections::DEFAULT_SNAPSHOT_REPLY_PREFIX;
    use crate::config::SnapshotConfig;

    #[test]
    fn only_inbox_like_prefixes_are_accepted() {
        for ok in ["_INBOX.", "_INBOX_app.", "replies.bridge.", "a."] {
            assert_eq!(check_reply_prefix(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "_INBOX",
            ".",
            "a..b.",
            ".a.",
            "_IN BOX.",
            "_INBOX.*.",
            "_INBOX.>",
            "$JS.API.",
            "$KV.schemas.",
            "cdc.",
            "CDC.",
            "init.x.",
            "snapshot.",
            "c",
            "dlq.",
        ] {
            assert!(check_reply_prefix(bad).is_err(), "{bad:?} accepted");
        }
        let mut c = SnapshotConfig {
            reply_prefix: "cdc.".into(),
            ..SnapshotConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("snapshot.reply_prefix"), "{e}");
        c.reply_prefix = DEFAULT_SNAPSHOT_REPLY_PREFIX.into();
        c.max_concurrent = 0;
        assert!(c.validate().is_err());
        c.max_concurrent = 2;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn inbox_prefixes_are_whole_tokens_without_the_final_dot() {
        for ok in ["_INBOX", "_INBOX_pgbridge", "pgbridge.inbox", "a"] {
            assert_eq!(check_inbox_prefix(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "is empty"),
            ("_INBOX.", "must not end with '.'"),
            ("a..b", "empty subject token"),
            (".a", "empty subject token"),
            ("_IN BOX", "whitespace"),
            ("_INBOX.*", "wildcard"),
            ("_INBOX.>", "wildcard"),
            ("$JS.API", "system subjects"),
            ("cdc", "overlaps the bridge's subjects cdc.>"),
            ("DLQ.x", "overlaps the bridge's subjects dlq.>"),
        ] {
            let e = check_inbox_prefix(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let mut n = crate::config::NatsConfig::default();
        assert_eq!(n.inbox_prefix, "_INBOX", "the clients' own default");
        n.inbox_prefix = "_INBOX.".into();
        let e = n.validate().unwrap_err().to_string();
        assert!(
            e.contains("nats.inbox_prefix") && e.contains("NATS_INBOX_PREFIX"),
            "{e}"
        );
    }
}
