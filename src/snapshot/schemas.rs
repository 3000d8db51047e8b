//! Table schemas in the JetStream key-value bucket `schemas` (docs/protocol.md, "The schemas bucket"), so consumers can
//! create their local tables and watch for changes.
//!
//! The key is the table's subject token (`users`, or `sales.invoices` outside `public`) with
//! `%` written as `=`, because KV keys allow only `[-/_=.a-zA-Z0-9]`. The value is
//! `{table, schema: "public.users", relation_id, timestamp, primary_key: [...], columns:
//! [{name, position, data_type, is_nullable, column_default}]}` in the bridge's message format;
//! `data_type` is PostgreSQL's `format_type` (e.g. `character varying(20)`). A new revision is
//! written at start and whenever a Relation message arrives for the table, but only when the
//! schema differs from the stored one.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv::Store;
use async_nats::jetstream::Context;
use bytes::Bytes;

use crate::config::Format;
use crate::pg::conn::{ConnectionKind, PgConnection, PgError};
use crate::shutdown::Shutdown;
use crate::wire::event::TableRef;

use crate::wire::encode::encode_document;
use crate::wire::fields;
use crate::wire::names::SCHEMAS_BUCKET;
use crate::wire::subject::schema_key;

/// Revisions kept per key.
const HISTORY: i64 = 16;
/// How long a Relation message's table and columns are waited for in the catalog.
pub const RELATION_VISIBLE_WAIT: Duration = Duration::from_secs(5);

/// Errors writing schemas.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// Reading the catalog failed.
    #[error("reading the schema of {table}: {source}")]
    Pg {
        /// `schema.table`.
        table: String,
        /// The error (boxed: it is large and rare).
        source: Box<PgError>,
    },
    /// The table does not exist (any more).
    #[error("table {0} does not exist")]
    Missing(String),
    /// The bucket could not be opened or written.
    #[error("key-value bucket {SCHEMAS_BUCKET}: {0}")]
    Kv(String),
}

/// Opens the bucket, creating it with `replicas` replicas when missing (an existing bucket
/// keeps its own).
pub async fn open_bucket(js: &Context, replicas: usize) -> Result<Store, SchemaError> {
    if let Ok(store) = js.get_key_value(SCHEMAS_BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: SCHEMAS_BUCKET.to_string(),
        description: "pgbridge table schemas".to_string(),
        history: HISTORY,
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| SchemaError::Kv(e.to_string()))
}

/// Reads a table's schema document from the catalog (without the timestamp).
pub fn read_schema(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<serde_json::Value, SchemaError> {
    let qualified = format!("{schema}.{table}");
    let r = conn
        .query_params(
            "SELECT c.oid::int8, a.attname, a.attnum, format_type(a.atttypid, a.atttypmod), \
                    NOT a.attnotnull, pg_get_expr(d.adbin, d.adrelid), \
                    COALESCE(a.attnum = ANY (i.indkey::int2[]), false), \
                    COALESCE(array_position(i.indkey::int2[], a.attnum), 0) \
               FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
               LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum \
               LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary \
              WHERE n.nspname = $1 AND c.relname = $2 \
              ORDER BY a.attnum",
            &[schema, table],
        )
        .map_err(|source| SchemaError::Pg {
            table: qualified.clone(),
            source: Box::new(source),
        })?;
    if r.rows.is_empty() {
        return Err(SchemaError::Missing(qualified));
    }
    let text = |row: &Vec<Option<String>>, i: usize| row.get(i).cloned().flatten();
    let relid: u64 = text(&r.rows[0], 0)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut pk: Vec<(i64, String)> = Vec::new();
    let columns: Vec<serde_json::Value> = r
        .rows
        .iter()
        .map(|row| {
            let name = text(row, 1).unwrap_or_default();
            if text(row, 6).as_deref() == Some("t") {
                let pos = text(row, 7).and_then(|s| s.parse().ok()).unwrap_or(0);
                pk.push((pos, name.clone()));
            }
            serde_json::json!({
                fields::NAME: name,
                fields::POSITION: text(row, 2).and_then(|s| s.parse::<i64>().ok()).unwrap_or(0),
                fields::DATA_TYPE: text(row, 3),
                fields::IS_NULLABLE: text(row, 4).as_deref() == Some("t"),
                fields::COLUMN_DEFAULT: text(row, 5),
            })
        })
        .collect();
    pk.sort();
    Ok(serde_json::json!({
        fields::TABLE: table,
        fields::SCHEMA: qualified,
        fields::RELATION_ID: relid,
        fields::PRIMARY_KEY: pk.into_iter().map(|(_, n)| n).collect::<Vec<_>>(),
        fields::COLUMNS: columns,
    }))
}

/// Whether a catalog reading may predate a Relation message: it does not show the table, or
/// lacks a column the message has (the message has the published ones only: column lists and
/// generated columns leave some out). A failed reading is not stale: waiting would not mend it.
fn stale_reading(reading: &Result<serde_json::Value, SchemaError>, relation: &TableRef) -> bool {
    let doc = match reading {
        Ok(doc) => doc,
        Err(SchemaError::Missing(_)) => return true,
        Err(_) => return false,
    };
    let Some(columns) = doc[fields::COLUMNS].as_array() else {
        return true;
    };
    !relation.columns.iter().all(|c| {
        columns
            .iter()
            .any(|d| d[fields::NAME].as_str() == Some(&*c.name))
    })
}

/// Keeps the bucket in line with the catalog.
pub struct SchemaWriter {
    store: Store,
    format: Format,
    conn: Option<PgConnection>,
    params: Vec<(&'static str, String)>,
    buf: Vec<u8>,
}

/// What [`SchemaWriter::refresh`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refreshed {
    /// The stored revision was the same.
    Unchanged,
    /// The bucket had no schema of the table: its first revision was written.
    New,
    /// A new revision was written over a different one.
    Changed,
}

impl SchemaWriter {
    /// A writer using its own normal PostgreSQL connection (opened on first use).
    pub fn new(store: Store, format: Format, params: Vec<(&'static str, String)>) -> Self {
        SchemaWriter {
            store,
            format,
            conn: None,
            params,
            buf: Vec::new(),
        }
    }

    /// Reads the catalog on `conn`, an open session (the set-up's), instead of logging in
    /// again: a SCRAM login costs tens of milliseconds of CPU.
    pub fn with_connection(mut self, conn: PgConnection) -> Self {
        self.conn = Some(conn);
        self
    }

    /// Writes the table's schema if it differs from the stored revision, and says which.
    pub async fn refresh(&mut self, schema: &str, table: &str) -> Result<Refreshed, SchemaError> {
        let doc = self.read(schema, table)?;
        self.write(schema, table, doc).await
    }

    /// [`refresh`](Self::refresh) for a table whose Relation message the stream just brought.
    /// Logical decoding can send a transaction a moment before other sessions see it
    /// committed, so the catalog may still show the table missing or without a column the
    /// message has: it is read again, a little later each time, for at most
    /// [`RELATION_VISIBLE_WAIT`], before the stale reading stands (with a warning).
    pub async fn refresh_relation(
        &mut self,
        relation: &TableRef,
        shutdown: &Shutdown,
    ) -> Result<Refreshed, SchemaError> {
        let (schema, table) = (&*relation.schema, &*relation.table);
        let deadline = Instant::now() + RELATION_VISIBLE_WAIT;
        let mut pause = Duration::from_millis(10);
        loop {
            let reading = self.read(schema, table);
            let stale = stale_reading(&reading, relation);
            if stale && Instant::now() + pause <= deadline {
                if shutdown.sleep(pause).await {
                    return Ok(Refreshed::Unchanged);
                }
                pause = (pause * 2).min(Duration::from_millis(500));
                continue;
            }
            if stale {
                log::warn!(
                    "schema of {schema}.{table}: the catalog still did not show the table \
                     or all of its published columns after {RELATION_VISIBLE_WAIT:?}; \
                     writing what it shows"
                );
            }
            return self.write(schema, table, reading?).await;
        }
    }

    /// Reads the table's schema from the catalog, opening the connection if needed. A kept
    /// session may have ended while idle (an administrator, an idle timeout, a server
    /// restart): then the reading is tried once more on a new one.
    fn read(&mut self, schema: &str, table: &str) -> Result<serde_json::Value, SchemaError> {
        let kept = self.conn.is_some();
        match self.read_once(schema, table) {
            Err(SchemaError::Pg { source, .. }) if kept && source.is_connection_problem() => {
                log::debug!(
                    "schema writer's PostgreSQL session ended ({source}); opening a new one"
                );
                self.read_once(schema, table)
            }
            reading => reading,
        }
    }

    fn read_once(&mut self, schema: &str, table: &str) -> Result<serde_json::Value, SchemaError> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(
                PgConnection::connect(&self.params, ConnectionKind::Normal).map_err(|source| {
                    SchemaError::Pg {
                        table: format!("{schema}.{table}"),
                        source: Box::new(source),
                    }
                })?,
            ),
        };
        let reading = read_schema(conn, schema, table);
        if matches!(reading, Err(SchemaError::Pg { .. })) {
            // A broken connection is reopened next time.
            self.conn = None;
        }
        reading
    }

    /// Stores `doc`, a reading of the table's schema, unless the stored revision is the same.
    async fn write(
        &mut self,
        schema: &str,
        table: &str,
        mut doc: serde_json::Value,
    ) -> Result<Refreshed, SchemaError> {
        let key = schema_key(schema, table);
        let mut written = Refreshed::New;
        if let Ok(Some(current)) = self.store.get(key.clone()).await {
            if decoded_without_timestamp(self.format, &current).as_ref() == Some(&doc) {
                return Ok(Refreshed::Unchanged);
            }
            written = Refreshed::Changed;
        }
        if let Some(map) = doc.as_object_mut() {
            map.insert(
                fields::TIMESTAMP.into(),
                serde_json::Value::String(crate::wire::text::now_timestamp()),
            );
        }
        encode_document(self.format, &doc, &mut self.buf);
        self.store
            .put(key, Bytes::copy_from_slice(&self.buf))
            .await
            .map_err(|e| SchemaError::Kv(e.to_string()))?;
        Ok(written)
    }
}

/// The stored document without its timestamp, for comparison (`None` if unreadable).
fn decoded_without_timestamp(format: Format, bytes: &[u8]) -> Option<serde_json::Value> {
    let mut v: serde_json::Value = match format {
        Format::Json => serde_json::from_slice(bytes).ok()?,
        Format::Msgpack => msgpack_to_json(&rmp_value(bytes)?)?,
    };
    v.as_object_mut()?.remove(fields::TIMESTAMP);
    Some(v)
}

fn rmp_value(bytes: &[u8]) -> Option<rmpv::Value> {
    rmpv::decode::read_value(&mut &bytes[..]).ok()
}

fn msgpack_to_json(v: &rmpv::Value) -> Option<serde_json::Value> {
    use rmpv::Value as M;
    Some(match v {
        M::Nil => serde_json::Value::Null,
        M::Boolean(b) => serde_json::Value::Bool(*b),
        M::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => serde_json::Value::from(u),
            (None, Some(n)) => serde_json::Value::from(n),
            _ => return None,
        },
        M::F32(f) => serde_json::Value::from(f64::from(*f)),
        M::F64(f) => serde_json::Value::from(*f),
        M::String(s) => serde_json::Value::String(s.as_str()?.to_string()),
        M::Array(a) => {
            serde_json::Value::Array(a.iter().map(msgpack_to_json).collect::<Option<_>>()?)
        }
        M::Map(m) => serde_json::Value::Object(
            m.iter()
                .map(|(k, v)| Some((k.as_str()?.to_string(), msgpack_to_json(v)?)))
                .collect::<Option<_>>()?,
        ),
        M::Binary(_) | M::Ext(..) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::event::ColumnMeta;

    #[test]
    fn a_reading_without_a_published_column_is_stale() {
        let relation = |names: &[&str]| TableRef {
            columns: names
                .iter()
                .map(|n| ColumnMeta {
                    name: (*n).into(),
                    type_oid: 23,
                    type_modifier: -1,
                    key: false,
                })
                .collect(),
            schema: "public".into(),
            table: "t".into(),
            relation_id: 1,
            key_columns: Vec::new(),
        };
        let doc =
            Ok(serde_json::json!({"columns": [{"name": "id"}, {"name": "v"}, {"name": "secret"}]}));
        // A column list may leave catalog columns out of the message.
        assert!(!stale_reading(&doc, &relation(&["id", "v"])));
        assert!(stale_reading(&doc, &relation(&["id", "v", "added"])));
        assert!(stale_reading(
            &Ok(serde_json::json!({})),
            &relation(&["id"])
        ));
        let missing = Err(SchemaError::Missing("public.t".into()));
        assert!(stale_reading(&missing, &relation(&["id"])));
        let failed = Err(SchemaError::Pg {
            table: "public.t".into(),
            source: Box::new(PgError::ConnectionLost("reset by peer".into())),
        });
        assert!(!stale_reading(&failed, &relation(&["id"])));
    }

    #[test]
    fn stored_documents_compare_without_timestamp() {
        let doc = serde_json::json!({"table": "t", "columns": [{"name": "id", "position": 1, "is_nullable": false, "column_default": null}], "relation_id": 16384});
        let mut with_ts = doc.clone();
        with_ts
            .as_object_mut()
            .unwrap()
            .insert("timestamp".into(), "x".into());
        for format in [Format::Msgpack, Format::Json] {
            let mut out = Vec::new();
            encode_document(format, &with_ts, &mut out);
            assert_eq!(decoded_without_timestamp(format, &out), Some(doc.clone()));
        }
    }
}
