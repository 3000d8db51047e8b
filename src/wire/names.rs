//! Names outside the messages: subject prefixes, the snapshot request prefix, the schemas
//! bucket, header names and stream metadata keys. Subjects and bucket keys built from them
//! are in [`super::subject`].

/// Subject prefix of change events: `cdc.{table}.{op}` (see [`super::subject`]).
pub const CDC_SUBJECT_PREFIX: &str = "cdc";

/// Subject prefix of snapshots: chunks on `init.snap.{table}.{snapshot_id}.{chunk}`, the
/// meta (or failure document) on `init.meta.{table}`.
pub const INIT_SUBJECT_PREFIX: &str = "init";

/// Subject prefix of snapshot requests (core NATS request/reply): `snapshot.request.{table}`.
pub const SNAPSHOT_REQUEST_PREFIX: &str = "snapshot.request";

/// Name of the key-value bucket holding each table's schema document.
pub const SCHEMAS_BUCKET: &str = "schemas";

/// Header set to [`LAST_IN_TX_VALUE`] on the message of the last published change of each
/// transaction.
pub const LAST_IN_TX_HEADER: &str = "Pgbridge-Last-In-Tx";
/// The value of [`LAST_IN_TX_HEADER`].
pub const LAST_IN_TX_VALUE: &str = "true";

/// Stream metadata key naming the format of the stream's messages (`msgpack` or `json`).
pub const FORMAT_METADATA_KEY: &str = "pgbridge.format";

/// Subject prefix of outbox events: `outbox.{aggregate_type}.{event_type}`.
pub const OUTBOX_SUBJECT_PREFIX: &str = "outbox";
/// Name of the stream holding outbox events (`outbox.>`).
pub const OUTBOX_STREAM: &str = "OUTBOX";
/// Subject prefix of dead letters: `dlq.{origin}.{table}` (see [`super::outbox`]).
pub const DLQ_SUBJECT_PREFIX: &str = "dlq";
/// Name of the stream holding dead letters (`dlq.>`).
pub const DLQ_STREAM: &str = "DLQ";
/// Header of an outbox event: the aggregate id (absent when the column is NULL or missing).
pub const AGGREGATE_ID_HEADER: &str = "Pgbridge-Aggregate-Id";
/// Header of an outbox event: the event type.
pub const EVENT_TYPE_HEADER: &str = "Pgbridge-Event-Type";
/// Header of an outbox event: the commit LSN of its transaction (`0/25CB5E8`).
pub const COMMIT_LSN_HEADER: &str = "Pgbridge-Commit-Lsn";
/// Header of a dead letter: why it is one ([`super::outbox::DeadReason::as_str`]).
pub const ERROR_HEADER: &str = "Pgbridge-Error";
/// Header of a dead letter: the reason in words, for people.
pub const ERROR_DETAIL_HEADER: &str = "Pgbridge-Error-Detail";
/// Header of a dead letter: the subject it was meant for, as it would have been written.
pub const SOURCE_HEADER: &str = "Pgbridge-Source";
/// Header of a dead letter whose body was cut to fit: the original body's size in bytes.
pub const TRUNCATED_HEADER: &str = "Pgbridge-Truncated";
