//! The field names of every message kind, and the values of the contract's enumerated
//! fields. Encoders write these names; consumers read them (see [`super::decode`]).
//!
//! | message                         | fields                                                |
//! |---------------------------------|-------------------------------------------------------|
//! | change event (`cdc.…`)          | [`TABLE`] [`SCHEMA`] [`OPERATION`] [`RELATION_ID`] [`LSN`] [`COMMIT_LSN`] [`XID`] [`COMMIT_TIME`] [`SEQ`] [`LAST_IN_TX`] [`COLUMNS`] [`OLD_COLUMNS`] [`UNCHANGED_TOAST`]; each column [`NAME`] [`VALUE`] |
//! | snapshot chunk (`init.snap.…`)  | [`TABLE`] [`SCHEMA`] [`OPERATION`] (= [`OPERATION_SNAPSHOT`]) [`SNAPSHOT_ID`] [`CHUNK`] [`LSN`] [`DATA`] |
//! | snapshot meta (`init.meta.…`)   | [`SNAPSHOT_ID`] [`LSN`] [`TIMESTAMP`] [`BATCH_COUNT`] [`ROW_COUNT`] [`TABLE`] [`SCHEMA`] [`CDC_STREAM_SEQ`] |
//! | snapshot meta (Kafka init topic)| as above, with [`CDC_TOPIC`] [`CDC_OFFSETS`] in place of [`CDC_STREAM_SEQ`] |
//! | snapshot failure (`init.meta.…`)| [`SNAPSHOT_ID`] [`TABLE`] [`SCHEMA`] [`TIMESTAMP`] [`ERROR`] |
//! | snapshot request reply          | [`STATUS`] [`SNAPSHOT_ID`] [`TABLE`] [`SCHEMA`] [`ESTIMATED_ROWS`]; refused: [`STATUS`] [`REASON`] [`ERROR`] [`RETRY_AFTER_SECS`] |
//! | Debezium envelope (`--envelope debezium`) | [`DBZ_BEFORE`] [`DBZ_AFTER`] [`DBZ_SOURCE`] [`DBZ_TRANSACTION`] [`DBZ_OP`] [`DBZ_TS_MS`] [`DBZ_TS_US`] [`DBZ_TS_NS`]; with schemas inside [`DBZ_PAYLOAD`] beside [`DBZ_SCHEMA`]; `source`: [`DBZ_SOURCE_FIELDS`] |
//! | table schema (KV `schemas`)     | [`TABLE`] [`SCHEMA`] [`RELATION_ID`] [`TIMESTAMP`] [`PRIMARY_KEY`] [`COLUMNS`]; each column [`NAME`] [`POSITION`] [`DATA_TYPE`] [`IS_NULLABLE`] [`COLUMN_DEFAULT`] |

// ---- Change events (and shared by the other kinds) ----

/// Table name.
pub const TABLE: &str = "table";
/// Schema name (`schema.table` in a table schema document).
pub const SCHEMA: &str = "schema";
/// `INSERT`, `UPDATE`, `DELETE`, `TRUNCATE`, or [`OPERATION_SNAPSHOT`] in a chunk.
pub const OPERATION: &str = "operation";
/// pg_class OID.
pub const RELATION_ID: &str = "relation_id";
/// WAL position (`X/X`): the change's record, or a snapshot's consistent point.
pub const LSN: &str = "lsn";
/// Start of the transaction's commit record (`X/X`).
pub const COMMIT_LSN: &str = "commit_lsn";
/// Top-level transaction id.
pub const XID: &str = "xid";
/// Commit time, RFC 3339 UTC with microseconds.
pub const COMMIT_TIME: &str = "commit_time";
/// Ordinal of the change in its transaction.
pub const SEQ: &str = "seq";
/// True on the last published change of its transaction.
pub const LAST_IN_TX: &str = "last_in_tx";
/// The row's columns (`[{name, value}]` in a change, `[{name, position, …}]` in a schema).
pub const COLUMNS: &str = "columns";
/// The old key or row of an UPDATE or DELETE.
pub const OLD_COLUMNS: &str = "old_columns";
/// Columns left out because their value is an unchanged TOASTed value.
pub const UNCHANGED_TOAST: &str = "unchanged_toast";
/// A column's name.
pub const NAME: &str = "name";
/// A column's value.
pub const VALUE: &str = "value";

// ---- Snapshots ----

/// The [`OPERATION`] of a snapshot chunk.
pub const OPERATION_SNAPSHOT: &str = "snapshot";
/// The snapshot's id.
pub const SNAPSHOT_ID: &str = "snapshot_id";
/// Chunk number, from 0.
pub const CHUNK: &str = "chunk";
/// A chunk's rows, each a map `{column: value}`.
pub const DATA: &str = "data";
/// When the document was written.
pub const TIMESTAMP: &str = "timestamp";
/// Chunks the snapshot published.
pub const BATCH_COUNT: &str = "batch_count";
/// Rows the snapshot published.
pub const ROW_COUNT: &str = "row_count";
/// The CDC stream sequence to continue after.
pub const CDC_STREAM_SEQ: &str = "cdc_stream_seq";
/// Kafka: the CDC topic of the snapshot's table.
pub const CDC_TOPIC: &str = "cdc_topic";
/// Kafka: the CDC topic's end offset of each partition (`{"0": 12, "1": 40}`), read before
/// the snapshot's slot existed; consumers continue each partition from its offset.
pub const CDC_OFFSETS: &str = "cdc_offsets";
/// Why a snapshot failed, or a request was refused.
pub const ERROR: &str = "error";

// ---- Snapshot request replies ----

/// [`STATUS_ACCEPTED`] or [`STATUS_ERROR`].
pub const STATUS: &str = "status";
/// The [`STATUS`] of an accepted request.
pub const STATUS_ACCEPTED: &str = "accepted";
/// The [`STATUS`] of a refused request.
pub const STATUS_ERROR: &str = "error";
/// PostgreSQL's estimate of the table's rows.
pub const ESTIMATED_ROWS: &str = "estimated_rows";
/// The refusal's code, e.g. [`REASON_IN_PROGRESS`].
pub const REASON: &str = "reason";
/// Seconds to wait before asking again.
pub const RETRY_AFTER_SECS: &str = "retry_after_secs";
/// Refused: a snapshot of the table is running.
pub const REASON_IN_PROGRESS: &str = "in_progress";
/// Refused: a snapshot of the table started within the cooldown.
pub const REASON_COOLDOWN: &str = "cooldown";
/// Refused: the bridge runs as many snapshots as it allows.
pub const REASON_BUSY: &str = "busy";

// ---- Table schemas ----

/// Primary key column names, in key order.
pub const PRIMARY_KEY: &str = "primary_key";
/// A column's position in the table, from 1.
pub const POSITION: &str = "position";
/// A column's type as PostgreSQL's `format_type` prints it.
pub const DATA_TYPE: &str = "data_type";
/// Whether a column allows NULL.
pub const IS_NULLABLE: &str = "is_nullable";
/// A column's default expression, or nil.
pub const COLUMN_DEFAULT: &str = "column_default";

// ---- The Debezium envelope ----

/// The row before the change.
pub const DBZ_BEFORE: &str = "before";
/// The row after the change.
pub const DBZ_AFTER: &str = "after";
/// Where the change comes from.
pub const DBZ_SOURCE: &str = "source";
/// Transaction metadata (always null).
pub const DBZ_TRANSACTION: &str = "transaction";
/// `c`, `u`, `d` or `t`.
pub const DBZ_OP: &str = "op";
/// When the bridge encoded the change, ms since the epoch (also in `source`: commit time).
pub const DBZ_TS_MS: &str = "ts_ms";
/// The same in µs.
pub const DBZ_TS_US: &str = "ts_us";
/// The same in ns.
pub const DBZ_TS_NS: &str = "ts_ns";
/// With schemas: the envelope's Kafka Connect schema.
pub const DBZ_SCHEMA: &str = "schema";
/// With schemas: the envelope itself.
pub const DBZ_PAYLOAD: &str = "payload";
/// The fields of `source`, in order.
pub const DBZ_SOURCE_FIELDS: [&str; 14] = [
    "version",
    "connector",
    "name",
    "ts_ms",
    "snapshot",
    "db",
    "sequence",
    "ts_us",
    "ts_ns",
    "schema",
    "table",
    "txId",
    "lsn",
    "xmin",
];
