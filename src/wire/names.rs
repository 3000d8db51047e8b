//! Names outside the messages: subject prefixes, the snapshot request prefix, the schemas
//! bucket and its keys, header names and stream metadata keys.

use super::subject::push_table_token;

/// Subject prefix of change events: `cdc.{table}.{op}` (see [`super::subject`]).
pub const CDC_SUBJECT_PREFIX: &str = "cdc";

/// Subject prefix of snapshots: chunks on `init.snap.{table}.{snapshot_id}.{chunk}`, the
/// meta (or failure document) on `init.meta.{table}`.
pub const INIT_SUBJECT_PREFIX: &str = "init";

/// Subject prefix of snapshot requests (core NATS request/reply): `snapshot.request.{table}`.
pub const SNAPSHOT_REQUEST_PREFIX: &str = "snapshot.request";

/// Name of the key-value bucket holding each table's schema document.
pub const SCHEMAS_BUCKET: &str = "schemas";

/// Header set to `true` on the message of the last published change of each transaction.
pub const LAST_IN_TX_HEADER: &str = "Pgbridge-Last-In-Tx";

/// Stream metadata key naming the format of the stream's messages (`msgpack` or `json`).
pub const FORMAT_METADATA_KEY: &str = "pgbridge.format";

/// The [`SCHEMAS_BUCKET`] key of a table: its subject token (`users`, or `sales.invoices`
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

#[cfg(test)]
mod tests {
    use super::*;

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
            super::super::subject::parse_table_token(&schema_key_token(&k)).unwrap(),
            ("public".to_owned(), "ü.x".to_owned())
        );
    }
}
