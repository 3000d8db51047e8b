//! The wal loop: reads the replication stream, decodes pgoutput, assembles committed
//! transactions (including streamed ones, honouring subtransaction aborts), answers keepalives
//! and sends standby status updates.
//!
//! Until the JetStream publisher exists nothing downstream is durable, so the flush position
//! reported to PostgreSQL stays unset (`0/0`, which never moves the slot) and committed
//! transactions are logged. The write position follows what was received, which is what lets
//! PostgreSQL shut down cleanly while we are connected.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::pg::conn::PgError;
use crate::pg::framing::{parse_copy_data, FramingError, ReplicationMessage};
use crate::pg::pgoutput::{DecodeError, Decoder, LogicalMessage};
use crate::pg::replication::{PgOutputOptions, ReplicationConnection};
use crate::pg::setup::DatabaseInfo;
use crate::pg::Lsn;
use crate::shutdown::Shutdown;

/// How long one wait for the server may last before shutdown is checked again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long to wait for the server to end the stream at shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the replication stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection or a command failed.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// A CopyData message was not XLogData or a keepalive.
    #[error("malformed replication message: {0}")]
    Framing(#[from] FramingError),
    /// A pgoutput message could not be decoded.
    #[error("malformed pgoutput message: {0}")]
    Decode(#[from] DecodeError),
    /// A change referred to a relation that was never described.
    #[error("pgoutput change for relation {0} without a preceding Relation message")]
    UnknownRelation(u32),
}

/// Totals since start.
#[derive(Debug, Clone, Default)]
pub struct WalStats {
    /// CopyData messages received.
    pub wal_messages: u64,
    /// Committed transactions seen with at least one change of a streamed table.
    pub transactions: u64,
    /// Row changes (and truncates) of streamed tables in committed transactions.
    pub changes: u64,
    /// Reconnects to PostgreSQL.
    pub reconnects: u64,
    /// End LSN of the last committed transaction seen.
    pub last_commit_end: Lsn,
    /// Time since start.
    pub uptime: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// Changes of one transaction, run-length encoded by (subtransaction, table, operation) so a
/// huge streamed transaction costs little memory and a subtransaction abort can cut it.
#[derive(Default)]
struct TxnChanges {
    runs: Vec<(u32, u32, Op, u64)>,
}

impl TxnChanges {
    fn push(&mut self, xid: u32, relid: u32, op: Op) {
        if let Some(last) = self.runs.last_mut() {
            if last.0 == xid && last.1 == relid && last.2 == op {
                last.3 += 1;
                return;
            }
        }
        self.runs.push((xid, relid, op, 1));
    }

    /// Drops everything from the subtransaction's first change on, as PostgreSQL's own apply
    /// worker does (later changes belong to nested subtransactions aborted with it).
    fn abort_subxact(&mut self, subxid: u32) {
        if let Some(pos) = self.runs.iter().position(|r| r.0 == subxid) {
            self.runs.truncate(pos);
        }
    }
}

/// The replication stream of one connection.
pub struct WalStream<'c> {
    repl: ReplicationConnection,
    config: &'c Config,
    shutdown: Shutdown,
    decoder: Decoder,
    relations: HashMap<u32, String>,
    streamed_tables: Option<HashSet<String>>,
    publications: Vec<String>,
    server_version: i32,
    txn: Option<(u32, TxnChanges)>,
    streams: HashMap<u32, TxnChanges>,
    current_stream: Option<u32>,
    last_received: Lsn,
}

impl<'c> WalStream<'c> {
    /// Wraps a replication connection whose slot exists.
    pub fn new(
        repl: ReplicationConnection,
        info: &DatabaseInfo,
        config: &'c Config,
        shutdown: Shutdown,
    ) -> Self {
        let streamed_tables = (!config.replication.tables.is_empty())
            .then(|| info.tables.iter().map(|t| t.qualified()).collect());
        WalStream {
            repl,
            config,
            shutdown,
            decoder: Decoder::new(),
            relations: HashMap::new(),
            streamed_tables,
            publications: vec![config.replication.publication.clone()],
            server_version: info.server_version,
            txn: None,
            streams: HashMap::new(),
            current_stream: None,
            last_received: Lsn::INVALID,
        }
    }

    /// Streams from the slot's confirmed position until shutdown or an error.
    pub fn run(&mut self, stats: &mut WalStats) -> Result<(), StreamError> {
        let options = PgOutputOptions::for_server(self.server_version, self.publications.clone());
        self.repl
            .start_logical(&self.config.replication.slot, Lsn::INVALID, &options)?;
        let status_interval = self.config.replication.standby_status_interval();
        let mut last_status = Instant::now();
        while !self.shutdown.is_triggered() {
            if let Some(buf) = self.repl.recv(POLL_INTERVAL)? {
                stats.wal_messages += 1;
                match parse_copy_data(&buf)? {
                    ReplicationMessage::XLogData(x) => {
                        self.last_received = self.last_received.max(x.wal_end);
                        let msg = self.decoder.decode(x.data)?;
                        self.handle(msg, stats)?;
                    }
                    ReplicationMessage::Keepalive(k) => {
                        self.last_received = self.last_received.max(k.wal_end);
                        if k.reply_requested {
                            self.send_status()?;
                            last_status = Instant::now();
                        }
                    }
                }
            }
            if last_status.elapsed() >= status_interval {
                self.send_status()?;
                last_status = Instant::now();
            }
        }
        self.send_status()?;
        self.repl.stop(STOP_TIMEOUT)?;
        Ok(())
    }

    fn send_status(&mut self) -> Result<(), PgError> {
        // Nothing is durable downstream yet: report what was received, confirm nothing.
        self.repl
            .send_status(self.last_received, Lsn::INVALID, Lsn::INVALID, false)
    }

    fn record(&mut self, xid: Option<u32>, relid: u32, op: Op) -> Result<(), StreamError> {
        let name = self
            .relations
            .get(&relid)
            .ok_or(StreamError::UnknownRelation(relid))?;
        if let Some(filter) = &self.streamed_tables {
            if !filter.contains(name) {
                return Ok(());
            }
        }
        match (self.current_stream, xid) {
            (Some(top), Some(sub)) => self.streams.entry(top).or_default().push(sub, relid, op),
            _ => {
                if let Some((top, changes)) = self.txn.as_mut() {
                    let top = *top;
                    changes.push(top, relid, op);
                }
            }
        }
        Ok(())
    }

    fn handle(&mut self, msg: LogicalMessage<'_>, stats: &mut WalStats) -> Result<(), StreamError> {
        match msg {
            LogicalMessage::Begin(b) => self.txn = Some((b.xid, TxnChanges::default())),
            LogicalMessage::Commit(c) => {
                if let Some((xid, changes)) = self.txn.take() {
                    self.committed(xid, c.commit_lsn, c.end_lsn, changes, stats);
                }
            }
            LogicalMessage::Relation(r) => {
                self.relations
                    .insert(r.relid, format!("{}.{}", r.namespace, r.name));
            }
            LogicalMessage::Insert(i) => self.record(i.xid, i.relid, Op::Insert)?,
            LogicalMessage::Update(u) => self.record(u.xid, u.relid, Op::Update)?,
            LogicalMessage::Delete(d) => self.record(d.xid, d.relid, Op::Delete)?,
            LogicalMessage::Truncate(t) => {
                for relid in &t.relids {
                    self.record(t.xid, *relid, Op::Truncate)?;
                }
            }
            LogicalMessage::StreamStart(s) => self.current_stream = Some(s.xid),
            LogicalMessage::StreamStop => self.current_stream = None,
            LogicalMessage::StreamCommit(c) => {
                let changes = self.streams.remove(&c.xid).unwrap_or_default();
                self.committed(c.xid, c.commit_lsn, c.end_lsn, changes, stats);
            }
            LogicalMessage::StreamAbort(a) => {
                if a.is_whole_transaction() {
                    self.streams.remove(&a.xid);
                } else if let Some(changes) = self.streams.get_mut(&a.xid) {
                    changes.abort_subxact(a.subxid);
                }
            }
            // Origins, types, logical messages and two-phase messages carry no row changes
            // for the log; the publisher will handle them.
            _ => {}
        }
        Ok(())
    }

    fn committed(
        &mut self,
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        changes: TxnChanges,
        stats: &mut WalStats,
    ) {
        stats.last_commit_end = end_lsn;
        let mut per_table: BTreeMap<(&str, Op), u64> = BTreeMap::new();
        let mut total = 0;
        for (_, relid, op, n) in &changes.runs {
            let name = self.relations.get(relid).map_or("?", String::as_str);
            *per_table.entry((name, *op)).or_default() += n;
            total += n;
        }
        if total == 0 {
            return;
        }
        stats.transactions += 1;
        stats.changes += total;
        let detail: Vec<String> = per_table
            .iter()
            .map(|((t, op), n)| format!("{t} {}={n}", op.name()))
            .collect();
        log::info!(
            "committed xid={xid} commit_lsn={commit_lsn} end_lsn={end_lsn} changes={total} [{}]",
            detail.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtransaction_abort_cuts_from_its_first_change() {
        let mut c = TxnChanges::default();
        for _ in 0..3 {
            c.push(10, 1, Op::Insert);
        }
        c.push(11, 1, Op::Insert);
        c.push(11, 1, Op::Insert);
        c.push(12, 1, Op::Insert); // nested in 11: aborted with it
        assert_eq!(c.runs.len(), 3);
        assert_eq!(c.runs[0].3, 3);
        c.abort_subxact(11);
        assert_eq!(c.runs, vec![(10, 1, Op::Insert, 3)]);
        c.abort_subxact(99);
        c.push(10, 1, Op::Update);
        assert_eq!(c.runs, vec![(10, 1, Op::Insert, 3), (10, 1, Op::Update, 1)]);
    }
}
