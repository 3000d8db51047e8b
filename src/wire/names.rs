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
