//! Publishing one snapshot: the rows of the COPY in chunks, a few awaiting their
//! acknowledgement at once, then the meta, or a failure document in its place when the
//! snapshot fails after it was accepted. Where they go is the [`super::target`]'s business.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Format;
use crate::pg::value::Value;
use crate::pg::Lsn;
use crate::shutdown::Shutdown;
use crate::sink::nats::NatsError;
use crate::wire::encode::{
    encode_chunk, encode_document, take_chunk, ChunkHeader, ChunkRows, ColumnKeys,
};
use crate::wire::fields;

use super::slot::{take_snapshot, CopyRow, SnapshotColumns, SnapshotError};
use super::target::InitTarget;

/// How long publishing one chunk may take before the snapshot fails.
pub(super) const CHUNK_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// How long publishing a failure document may take. Short: when it does not get through,
/// the broker is the problem and the log is all that is left.
const FAILURE_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Room left in a chunk for the message headers (`Nats-Msg-Id: snap-{id}-{chunk}`, Kafka's
/// `pgbridge-id` and `pgbridge-op`), which count against the broker's limit too.
const HEADER_ALLOWANCE: usize = 128;
/// What the length of a chunk's `data` may take beyond the one byte of an empty one
/// (MessagePack's array32: 5 bytes).
const ARRAY_LEN_ALLOWANCE: usize = 4;
/// Rows between two updates of the progress gauge.
const PROGRESS_EVERY_ROWS: u64 = 1000;

/// Why an accepted snapshot failed. The text is what consumers find in the failure document
/// on `init.meta.{table}`, so each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFailure {
    /// The CDC stream's last sequence (the meta's `cdc_stream_seq`) could not be read.
    #[error(
        "cannot read the last sequence of stream '{stream}', which the snapshot needs as its \
         cdc_stream_seq: {source}; request the snapshot again once NATS answers"
    )]
    CdcSequence {
        /// The CDC stream's name.
        stream: String,
        /// What NATS said.
        source: NatsError,
    },
    /// One row does not fit in a message under the server's `max_payload`.
    #[error(
        "row {row} of {table}{key} encodes to {size} bytes, so a snapshot chunk holding it \
         exceeds the NATS server's max_payload of {max} bytes: raise max_payload in the \
         nats-server configuration (changes to this row need it too), then request the \
         snapshot again"
    )]
    RowTooLarge {
        /// `schema.table`.
        table: String,
        /// The row's ordinal in the COPY, from 1.
        row: u64,
        /// ` (first column name = value)` when the value is short enough to show, else empty.
        key: String,
        /// The row's encoded size.
        size: usize,
        /// The server's max_payload.
        max: usize,
    },
    /// JetStream did not store a chunk or the meta.
    #[error("publishing {subject} to JetStream failed: {reason}; request the snapshot again")]
    Publish {
        /// The subject of the message that failed.
        subject: String,
        /// What went wrong.
        reason: String,
    },
    /// One row does not fit in a Kafka record.
    #[error(
        "row {row} of {table}{key} encodes to {size} bytes, so a snapshot chunk holding it \
         exceeds the {max} bytes a record of Kafka topic {topic} may take: raise \
         max.message.bytes on the topic (and the producer's message.max.bytes with \
         --kafka-property), then request the snapshot again"
    )]
    RowTooLargeForKafka {
        /// `schema.table`.
        table: String,
        /// The row's ordinal in the COPY, from 1.
        row: u64,
        /// ` (first column name = value)` when the value is short enough to show, else empty.
        key: String,
        /// The row's encoded size.
        size: usize,
        /// What one record may take.
        max: usize,
        /// The init topic.
        topic: String,
    },
    /// The init topic could not be found or created, or its producer not started.
    #[error("cannot find or create Kafka topic {topic}: {reason}; request the snapshot again once Kafka answers")]
    InitTopic {
        /// The init topic.
        topic: String,
        /// What went wrong.
        reason: String,
    },
    /// The CDC topic's end offsets (the meta's `cdc_offsets`) could not be read.
    #[error(
        "cannot read the end offsets of Kafka topic {topic}, which the snapshot needs as its \
         cdc_offsets: {reason}; request the snapshot again once Kafka answers"
    )]
    CdcOffsets {
        /// The CDC topic.
        topic: String,
        /// What went wrong.
        reason: String,
    },
    /// Kafka did not store a chunk or the meta.
    #[error("producing to Kafka topic {topic} failed: {reason}; request the snapshot again")]
    Produce {
        /// The init topic.
        topic: String,
        /// What went wrong.
        reason: String,
    },
    /// The bridge is stopping.
    #[error(
        "the bridge shut down before the snapshot finished; request it again once the bridge \
         runs"
    )]
    ShuttingDown,
    /// PostgreSQL refused, failed or could not be reached.
    #[error("{}", postgres_failure(.0))]
    Postgres(#[from] SnapshotError),
}

/// The text of a PostgreSQL failure, with what to do for the common cases.
fn postgres_failure(e: &SnapshotError) -> String {
    match e {
        SnapshotError::Pg(pg) if pg.is_connection_problem() => format!(
            "{pg}; PostgreSQL is unreachable or went away: request the snapshot again once it \
             accepts connections"
        ),
        // configuration_limit_exceeded: no free replication slot or walsender.
        SnapshotError::Pg(pg) if pg.sqlstate() == Some("53400") => format!(
            "{pg}; each running snapshot uses a temporary replication slot and a walsender: \
             raise max_replication_slots and max_wal_senders, or request the snapshot again \
             when other snapshots have finished"
        ),
        other => format!("{other}; request the snapshot again once this is fixed"),
    }
}

/// What a finished snapshot published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Published {
    pub(super) lsn: Lsn,
    pub(super) rows: u64,
    pub(super) chunks: u64,
    pub(super) row_filter: Option<String>,
}

/// What publishing a snapshot needs: where it goes, the PostgreSQL connection parameters
/// and the settings.
pub(super) struct Chunks {
    pub(super) target: Box<dyn InitTarget>,
    pub(super) pg_params: Vec<(&'static str, String)>,
    pub(super) publication: String,
    pub(super) format: Format,
    pub(super) chunk_rows: usize,
    pub(super) shutdown: Shutdown,
}

impl Chunks {
    /// Publishes the failure document; when even that fails (the broker is the problem), logs
    /// it.
    pub(super) fn publish_failure(
        &self,
        schema: &str,
        table: &str,
        id: &str,
        failure: &SnapshotFailure,
    ) {
        let (_, subject) = self.target.meta_location(schema, table);
        let doc = failure_document(
            id,
            schema,
            table,
            &crate::wire::text::now_timestamp(),
            &failure.to_string(),
        );
        let mut out = Vec::new();
        encode_document(self.format, &doc, &mut out);
        let sent = self
            .target
            .open(schema, table)
            .and_then(|mut w| w.send_meta(id, out, FAILURE_ACK_TIMEOUT));
        match sent {
            Ok(()) => log::info!("snapshot {id} of {schema}.{table}: failure published to {subject}"),
            Err(e) => log::error!(
                "snapshot {id} of {schema}.{table}: the failure could not be published to {subject} ({e}); consumers waiting for it will time out"
            ),
        }
    }

    /// Takes and publishes the snapshot.
    /// `on_connected` is told PostgreSQL's row estimate once the snapshot's connection is up
    /// (see [`take_snapshot`]; never when the snapshot fails before); `progress` the rows
    /// copied so far, every [`PROGRESS_EVERY_ROWS`].
    pub(super) fn run_snapshot(
        &self,
        schema: &str,
        table: &str,
        id: &str,
        on_connected: impl FnOnce(Option<u64>),
        progress: &dyn Fn(u64),
    ) -> Result<Published, SnapshotFailure> {
        let mut writer = self.target.open(schema, table)?;
        // Read before the slot exists: consumers continue the change stream after it.
        let cdc_position = writer.cdc_position()?;
        let mut out = Vec::new();
        let max = writer.max_payload();
        // Half the broker's limit leaves room for the chunk's own fields and the next row.
        let max_chunk_bytes = max / 2;
        // What a chunk may hold in rows: the limit less its own fields (measured with the
        // widest chunk number) and the message headers.
        let frame = {
            let header = ChunkHeader {
                table,
                schema,
                snapshot_id: id,
                chunk: u64::MAX,
                lsn: Lsn(u64::MAX),
            };
            encode_chunk(self.format, &header, &ChunkRows::new(self.format), &mut out);
            out.len()
        };
        let row_budget = max.saturating_sub(frame + HEADER_ALLOWANCE);
        // The chunk's fields are written in front of its rows when it is sent: keep room for
        // them (the frame, with the widest length of `data`).
        let room = frame + ARRAY_LEN_ALLOWANCE;
        let mut rows = ChunkRows::with_room(self.format, room);
        // A row that would push a chunk past the broker's limit waits here to start the next.
        let mut carried = ChunkRows::with_room(self.format, room);
        // Consistent point, column names and their encoded keys, set before the first row.
        let started: std::cell::RefCell<(Lsn, Vec<Arc<str>>, ColumnKeys)> =
            std::cell::RefCell::new((Lsn(0), Vec::new(), ColumnKeys::new(self.format, &[])));
        let mut chunk = 0u64;
        let mut row_number = 0u64;
        let writer_cell = std::cell::RefCell::new(&mut writer);
        let flush =
            |rows: &mut ChunkRows, chunk: &mut u64, lsn: Lsn| -> Result<(), SnapshotFailure> {
                let header = ChunkHeader {
                    table,
                    schema,
                    snapshot_id: id,
                    chunk: *chunk,
                    lsn,
                };
                let payload = take_chunk(self.format, &header, rows);
                writer_cell.borrow_mut().send_chunk(id, *chunk, payload)?;
                *chunk += 1;
                Ok(())
            };
        // The typed reason a row callback stopped the COPY (it can only pass text through).
        let mut stopped: Option<SnapshotFailure> = None;
        let outcome = take_snapshot(
            &self.pg_params,
            &self.publication,
            schema,
            table,
            on_connected,
            |c: Lsn, cols: &SnapshotColumns| {
                *started.borrow_mut() = (
                    c,
                    cols.names.clone(),
                    ColumnKeys::new(self.format, &cols.names),
                );
                Ok(())
            },
            |row: &CopyRow<'_>| {
                let mut step = || -> Result<(), SnapshotFailure> {
                    if self.shutdown.is_triggered() {
                        return Err(SnapshotFailure::ShuttingDown);
                    }
                    let (lsn, names, keys) = &*started.borrow();
                    row_number += 1;
                    if row_number.is_multiple_of(PROGRESS_EVERY_ROWS) {
                        progress(row_number);
                    }
                    let size = rows.push_fields(keys, row.fields(), row.is_ascii());
                    if size > row_budget {
                        return Err(writer_cell.borrow().row_too_large(
                            format!("{schema}.{table}"),
                            row_number,
                            first_column(names, &[row.value(0)]),
                            size,
                        ));
                    }
                    if rows.encoded_len() > row_budget {
                        // The rows before fit; this one starts the next chunk.
                        rows.move_last_row(&mut carried);
                        flush(&mut rows, &mut chunk, *lsn)?;
                        std::mem::swap(&mut rows, &mut carried);
                    }
                    // A chunk also ends before it could outgrow the broker's limit.
                    if rows.len() >= self.chunk_rows || rows.encoded_len() >= max_chunk_bytes {
                        flush(&mut rows, &mut chunk, *lsn)?;
                    }
                    Ok(())
                };
                step().map_err(|e| {
                    let text = e.to_string();
                    stopped = Some(e);
                    text
                })
            },
        );
        let outcome = match (outcome, stopped) {
            (Ok(outcome), _) => outcome,
            (Err(SnapshotError::Stopped(..)), Some(reason)) => return Err(reason),
            (Err(e), _) => return Err(e.into()),
        };
        if !rows.is_empty() || chunk == 0 {
            flush(&mut rows, &mut chunk, outcome.lsn)?;
        }
        let mut meta = serde_json::json!({
            fields::SNAPSHOT_ID: id,
            fields::LSN: outcome.lsn.to_string(),
            fields::TIMESTAMP: crate::wire::text::now_timestamp(),
            fields::BATCH_COUNT: chunk,
            fields::ROW_COUNT: outcome.rows,
            fields::TABLE: table,
            fields::SCHEMA: schema,
        });
        if let Some(m) = meta.as_object_mut() {
            for (k, v) in cdc_position {
                m.insert(k.to_string(), v);
            }
        }
        encode_document(self.format, &meta, &mut out);
        // The writer waits for every chunk before the meta says the snapshot is complete.
        writer.send_meta(id, out, CHUNK_ACK_TIMEOUT)?;
        Ok(Published {
            lsn: outcome.lsn,
            rows: outcome.rows,
            chunks: chunk,
            row_filter: outcome.row_filter,
        })
    }
}

/// The document published on `init.meta.{table}` when an accepted snapshot fails: like a
/// meta, but with `error` in place of the position fields, so no consumer can mistake it for
/// a snapshot to load.
fn failure_document(
    id: &str,
    schema: &str,
    table: &str,
    timestamp: &str,
    error: &str,
) -> serde_json::Value {
    serde_json::json!({
        fields::SNAPSHOT_ID: id,
        fields::TABLE: table,
        fields::SCHEMA: schema,
        fields::TIMESTAMP: timestamp,
        fields::ERROR: error,
    })
}

/// Whether an `init.meta.{table}` payload is a failure document: a map with an `error` key,
/// in either format (the format may have changed since it was written).
pub(super) fn is_failure_document(payload: &[u8]) -> bool {
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(payload) {
        return m.contains_key("error");
    }
    match rmpv::decode::read_value(&mut &payload[..]) {
        Ok(rmpv::Value::Map(m)) => m.iter().any(|(k, _)| k.as_str() == Some("error")),
        _ => false,
    }
}

/// ` (first column name = value)` to help find an oversized row, when the value is a number
/// or a short text; empty otherwise.
fn first_column(names: &[Arc<str>], values: &[Value]) -> String {
    let value = match values.first() {
        Some(Value::Int(i)) => i.to_string(),
        Some(Value::Text(t)) if t.len() <= 64 && !t.contains(char::is_control) => format!("'{t}'"),
        _ => return String::new(),
    };
    match names.first() {
        Some(name) => format!(" (first column {name} = {value})"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::pg::conn::{DbError, PgError};

    #[test]
    fn failure_documents_carry_the_error_and_no_position() {
        let doc = failure_document("id1", "public", "users", "2025-01-01T00:00:00Z", "boom");
        let keys: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys.iter().copied().collect::<HashSet<_>>(),
            HashSet::from(["snapshot_id", "table", "schema", "timestamp", "error"])
        );
        assert_eq!(doc["error"], "boom");
        for format in [Format::Msgpack, Format::Json] {
            let mut out = Vec::new();
            encode_document(format, &doc, &mut out);
            assert!(is_failure_document(&out), "{format:?}");
            let meta = serde_json::json!({"snapshot_id": "id1", "lsn": "0/1", "batch_count": 1,
                "row_count": 0, "table": "users", "schema": "public", "cdc_stream_seq": 0,
                "timestamp": "2025-01-01T00:00:00Z"});
            encode_document(format, &meta, &mut out);
            assert!(!is_failure_document(&out), "{format:?}");
        }
        assert!(!is_failure_document(b""));
        assert!(!is_failure_document(b"\xc1"));
    }

    #[test]
    fn failures_say_what_to_do() {
        let e = SnapshotFailure::RowTooLarge {
            table: "public.docs".into(),
            row: 51,
            key: first_column(&[Arc::from("id")], &[Value::Int(51)]),
            size: 10034,
            max: 4096,
        };
        let text = e.to_string();
        assert!(
            text.contains("row 51 of public.docs (first column id = 51)"),
            "{text}"
        );
        assert!(text.contains("10034 bytes"), "{text}");
        assert!(text.contains("max_payload of 4096 bytes"), "{text}");
        assert!(text.contains("raise max_payload"), "{text}");

        let down = SnapshotFailure::from(SnapshotError::Pg(PgError::Connect(
            "connection refused".into(),
        )));
        assert!(
            down.to_string().contains("PostgreSQL is unreachable"),
            "{down}"
        );
        let slots = SnapshotFailure::from(SnapshotError::Pg(PgError::Db(DbError {
            sqlstate: "53400".into(),
            severity: "ERROR".into(),
            message: "all replication slots are in use".into(),
            detail: None,
            hint: None,
        })));
        assert!(
            slots.to_string().contains("max_replication_slots"),
            "{slots}"
        );
        assert!(SnapshotFailure::ShuttingDown
            .to_string()
            .contains("request it again"));
    }

    #[test]
    fn only_short_first_columns_are_shown() {
        let names = [Arc::from("k")];
        assert_eq!(
            first_column(&names, &[Value::Text("abc".into())]),
            " (first column k = 'abc')"
        );
        assert_eq!(first_column(&names, &[Value::Text("x".repeat(65))]), "");
        assert_eq!(first_column(&names, &[Value::Bytes(vec![1])]), "");
        assert_eq!(first_column(&[], &[]), "");
    }
}
