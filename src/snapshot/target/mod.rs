//! Where snapshots are published: the seam between the snapshot service and a broker.
//!
//! - [`nats::NatsInit`]: the INIT stream, chunks `init.snap.{table}.{id}.{chunk}` and the meta
//!   on `init.meta.{table}`, the meta carrying the CDC stream's last sequence;
//! - [`kafka::KafkaInit`] (`--sink kafka`): one init topic per table
//!   ([`crate::wire::kafka::init_topic`]), the chunks and then the meta as records of its one
//!   partition, the meta carrying the CDC topic's end offset of each partition.
//!
//! The service takes, encodes and orders the snapshot the same way for both; a target only
//! stores what it is given and says where consumers continue the change stream.

pub(super) mod nats;

#[cfg(feature = "kafka")]
pub(super) mod kafka;

use std::time::Duration;

use super::chunks::SnapshotFailure;

/// The last meta document stored for a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LastMeta {
    /// None: no snapshot of the table was ever published (or it expired).
    Missing,
    /// A finished snapshot.
    Finished,
    /// A failure document.
    Failed,
}

/// A broker snapshots are published to.
pub(super) trait InitTarget: Send + Sync {
    /// What the target is, for logs (`stream 'INIT'`, `Kafka topics cdc.pgbridge.init.*`).
    fn name(&self) -> String;

    /// Where the meta of a table is kept, for logs: (the stream or topic, the subject or
    /// record), e.g. (`stream 'INIT'`, `init.meta.users`).
    fn meta_location(&self, schema: &str, table: &str) -> (String, String);

    /// What a client whose request was refused because a snapshot of the table runs should
    /// wait for: the meta where this target stores it.
    fn awaited_meta(&self, schema: &str, table: &str) -> String;

    /// What the last meta stored for the table is. Blocks (call it off the runtime).
    fn last_meta(&self, schema: &str, table: &str) -> Result<LastMeta, String>;

    /// Opens the writer of one snapshot of the table (creating what it is written to when
    /// missing). Blocks.
    fn open<'a>(
        &'a self,
        schema: &str,
        table: &str,
    ) -> Result<Box<dyn InitWriter + 'a>, SnapshotFailure>;
}

/// The writer of one snapshot: chunks in order, a few awaiting their acknowledgement at once,
/// then the meta once every chunk is stored. Every call blocks.
pub(super) trait InitWriter {
    /// Where consumers continue the change stream after this snapshot: the meta's position
    /// fields. Read before the snapshot's slot exists.
    fn cdc_position(&mut self) -> Result<Vec<(&'static str, serde_json::Value)>, SnapshotFailure>;

    /// The most bytes one message may take, headers included.
    fn max_payload(&self) -> usize;

    /// The failure of a row that does not fit in a chunk under [`Self::max_payload`].
    fn row_too_large(&self, table: String, row: u64, key: String, size: usize) -> SnapshotFailure;

    /// Sends chunk `chunk` of snapshot `id`; waits for the oldest chunk's acknowledgement when
    /// too many are outstanding.
    fn send_chunk(&mut self, id: &str, chunk: u64, payload: Vec<u8>)
        -> Result<(), SnapshotFailure>;

    /// Waits for every chunk's acknowledgement, then stores the meta (or failure document) of
    /// snapshot `id`, waiting at most `timeout` for it.
    fn send_meta(
        &mut self,
        id: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), SnapshotFailure>;
}
