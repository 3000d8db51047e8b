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

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

use super::chunks::{SnapshotFailure, CHUNK_ACK_TIMEOUT};

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
    fn send_chunk(&mut self, id: &str, chunk: u64, payload: Bytes) -> Result<(), SnapshotFailure>;

    /// Waits for every chunk's acknowledgement, then stores the meta (or failure document) of
    /// snapshot `id`, waiting at most `timeout` for it.
    fn send_meta(
        &mut self,
        id: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), SnapshotFailure>;
}

/// Chunks sent and not yet acknowledged, oldest first, bounded by their bytes: waiting for
/// each acknowledgement before reading on would make PostgreSQL, the bridge and the broker
/// take turns; with chunks in flight they work at the same time. Bounded by bytes, not by
/// count, so that small chunks (a low `snapshot.chunk_rows`) keep as much in flight as large
/// ones, and memory stays within the budget whatever the chunk size.
pub(super) struct AckWindow<P> {
    in_flight: VecDeque<(P, usize)>,
    bytes: usize,
    max_bytes: usize,
}

impl<P> AckWindow<P> {
    /// A window holding at most `max_bytes` of chunks (always at least one chunk).
    pub(super) fn new(max_bytes: usize) -> Self {
        AckWindow {
            in_flight: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Sends a chunk of `size` bytes with `send` once it fits, waiting with `wait` (at most
    /// [`CHUNK_ACK_TIMEOUT`] each) for the oldest acknowledgements until it does.
    pub(super) fn send(
        &mut self,
        size: usize,
        mut wait: impl FnMut(P, Duration) -> Result<(), SnapshotFailure>,
        send: impl FnOnce() -> Result<P, SnapshotFailure>,
    ) -> Result<(), SnapshotFailure> {
        while !self.in_flight.is_empty() && self.bytes + size > self.max_bytes {
            if let Some((oldest, n)) = self.in_flight.pop_front() {
                self.bytes -= n;
                wait(oldest, CHUNK_ACK_TIMEOUT)?;
            }
        }
        let pending = send()?;
        self.bytes += size;
        self.in_flight.push_back((pending, size));
        Ok(())
    }

    /// Waits with `wait` for every chunk's acknowledgement, oldest first: before the meta,
    /// which says the snapshot is complete.
    pub(super) fn drain(
        &mut self,
        mut wait: impl FnMut(P, Duration) -> Result<(), SnapshotFailure>,
    ) -> Result<(), SnapshotFailure> {
        while let Some((pending, n)) = self.in_flight.pop_front() {
            self.bytes -= n;
            wait(pending, CHUNK_ACK_TIMEOUT)?;
        }
        Ok(())
    }

    /// Chunks in flight.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(acked: &mut Vec<u32>, chunk: u32) -> Result<(), SnapshotFailure> {
        acked.push(chunk);
        Ok(())
    }

    #[test]
    fn the_window_waits_for_the_oldest_chunks_until_the_next_fits() {
        let mut window = AckWindow::new(100);
        let mut acked = Vec::new();
        for (chunk, size) in [(0, 40), (1, 40), (2, 10)] {
            window
                .send(size, |p, _| record(&mut acked, p), || Ok(chunk))
                .unwrap();
        }
        assert!(acked.is_empty());
        assert_eq!(window.len(), 3);
        // 90 bytes in flight: 30 more wait for chunk 0 only.
        window
            .send(30, |p, _| record(&mut acked, p), || Ok(3))
            .unwrap();
        assert_eq!(acked, [0]);
        // A chunk larger than the budget goes alone, after all the others.
        window
            .send(500, |p, _| record(&mut acked, p), || Ok(4))
            .unwrap();
        assert_eq!(acked, [0, 1, 2, 3]);
        window
            .send(1, |p, _| record(&mut acked, p), || Ok(5))
            .unwrap();
        assert_eq!(acked, [0, 1, 2, 3, 4]);
        window.drain(|p, _| record(&mut acked, p)).unwrap();
        assert_eq!(acked, [0, 1, 2, 3, 4, 5]);
        assert_eq!(window.len(), 0);
    }

    #[test]
    fn a_failed_acknowledgement_stops_the_send() {
        let mut window = AckWindow::new(10);
        window.send(10, |_, _| Ok(()), || Ok(0)).unwrap();
        let mut sent = false;
        let failed = window.send(
            5,
            |_, _| Err(SnapshotFailure::ShuttingDown),
            || {
                sent = true;
                Ok(1)
            },
        );
        assert!(matches!(failed, Err(SnapshotFailure::ShuttingDown)));
        assert!(!sent, "nothing is sent after a failed acknowledgement");
    }
}
