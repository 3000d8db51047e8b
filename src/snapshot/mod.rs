//! Snapshots of published tables, and the table schemas consumers need to read them.
//!
//! - [`slot`]: a consistent snapshot of one table, lined up with the replication stream (a
//!   temporary slot exporting its snapshot, then `COPY` in that snapshot);
//! - [`service`]: the request service on `snapshot.request.{table}` and
//!   `POST /snapshots/{table}` (requests are checked in `request`, the rows are encoded in
//!   chunks in `chunks` and published through `target`: the INIT stream, or with
//!   `--sink kafka` a per-table init topic);
//! - [`schemas`]: the `schemas` key-value bucket.
//!
//! This room sits beside the change pipeline: it reads PostgreSQL itself and publishes
//! through its own connection to the broker, so change streaming never waits for a snapshot.

mod chunks;
mod request;
pub mod schemas;
pub mod service;
pub mod slot;
mod target;
pub(crate) mod threads;

pub use chunks::SnapshotFailure;
pub use request::{Accepted, Refusal};
pub use service::SnapshotService;

/// Where the running snapshot service is found once it is ready: the HTTP
/// endpoint `POST /snapshots/{table}` reads it, the snapshot thread sets it.
pub type ServiceSlot = std::sync::Arc<std::sync::OnceLock<std::sync::Arc<SnapshotService>>>;
