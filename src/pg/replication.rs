//! The logical replication connection: `IDENTIFY_SYSTEM`, slot creation and removal,
//! `START_REPLICATION ... LOGICAL` with pgoutput options, and the CopyBoth message loop
//! primitives (receive one CopyData, send a standby status update).

use std::time::Duration;

use super::conn::{
    quote_ident, quote_literal, ConnectionKind, CopyBuf, CopyData, PgConnection, PgError,
};
use super::framing;
use super::lsn::Lsn;

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier (decimal text of a u64).
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// Database of this connection (`None` for physical replication connections).
    pub dbname: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT` should do with the slot's initial snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Do not export or use it.
    Nothing,
    /// Export it for `SET TRANSACTION SNAPSHOT` (outside a transaction).
    Export,
    /// Install it as the snapshot of the current transaction, which must be
    /// `REPEATABLE READ READ ONLY` and have run no query yet (reference §3.1).
    Use,
}

/// The result row of `CREATE_REPLICATION_SLOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// Slot name as the server reports it.
    pub slot_name: String,
    /// The consistent point: streaming from here yields exactly the transactions the slot's
    /// snapshot does not see.
    pub consistent_point: Lsn,
    /// The exported snapshot's name with [`SnapshotAction::Export`].
    pub snapshot_name: Option<String>,
}

/// pgoutput's `streaming` option: whether (and how) large in-progress transactions are sent
/// before they commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streaming {
    /// Only committed transactions.
    Off,
    /// In blocks before the commit (proto 2, PostgreSQL 14+).
    On,
    /// As `On`, and a Stream Abort carries the abort's LSN and time (proto 4, PostgreSQL 16+).
    /// The name comes from the subscriber side (parallel apply); what is sent is the same.
    Parallel,
}

/// pgoutput options for `START_REPLICATION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOutputOptions {
    /// `proto_version`: 1; 2 for streaming (14+); 3 for two-phase (15+); 4 for parallel
    /// streaming (16+).
    pub proto_version: u32,
    /// Publications to stream.
    pub publication_names: Vec<String>,
    /// Streaming of large in-progress transactions.
    pub streaming: Streaming,
    /// Include `pg_logical_emit_message` messages (PostgreSQL 14+).
    pub messages: bool,
    /// Send prepared transactions at PREPARE TRANSACTION (Begin Prepare .. Prepare) and their
    /// outcome as Commit/Rollback Prepared (proto 3, PostgreSQL 15+). A slot created without
    /// two-phase becomes two-phase from the start position on.
    pub two_phase: bool,
}

impl PgOutputOptions {
    /// The richest options a server of `server_version` (e.g. 150018) accepts: proto 4 with
    /// parallel streaming and two-phase on 16 and later, proto 3 with streaming and two-phase
    /// on 15, proto 2 with streaming on 14 (all with messages), proto 1 before. pgoutput
    /// refuses options and versions it does not know, so older servers get none of the newer
    /// ones.
    pub fn for_server(server_version: i32, publication_names: Vec<String>) -> Self {
        let (proto_version, streaming) = match server_version {
            v if v >= 160000 => (4, Streaming::Parallel),
            v if v >= 150000 => (3, Streaming::On),
            v if v >= 140000 => (2, Streaming::On),
            _ => (1, Streaming::Off),
        };
        PgOutputOptions {
            proto_version,
            publication_names,
            streaming,
            messages: proto_version >= 2,
            two_phase: proto_version >= 3,
        }
    }

    /// A short description for the log, e.g. `protocol 4, streaming parallel, two-phase`.
    pub fn describe(&self) -> String {
        let streaming = match self.streaming {
            Streaming::Off => "off",
            Streaming::On => "on",
            Streaming::Parallel => "parallel",
        };
        format!(
            "protocol {}, streaming {streaming}{}",
            self.proto_version,
            if self.two_phase { ", two-phase" } else { "" }
        )
    }

    /// The parenthesised option list of `START_REPLICATION`.
    fn to_sql(&self) -> String {
        // publication_names is parsed with SplitIdentifierString: quote each name.
        let pubs = self
            .publication_names
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join(",");
        let mut s = format!(
            "(\"proto_version\" '{}', \"publication_names\" {}",
            self.proto_version,
            quote_literal(&pubs)
        );
        if self.messages {
            s.push_str(", \"messages\" 'true'");
        }
        match self.streaming {
            Streaming::Off => {}
            Streaming::On => s.push_str(", \"streaming\" 'on'"),
            Streaming::Parallel => s.push_str(", \"streaming\" 'parallel'"),
        }
        if self.two_phase {
            s.push_str(", \"two_phase\" 'true'");
        }
        s.push(')');
        s
    }
}

/// A `replication=database` connection to PostgreSQL.
#[derive(Debug)]
pub struct ReplicationConnection {
    conn: PgConnection,
}

impl ReplicationConnection {
    /// Opens a logical walsender session with the given libpq keywords.
    pub fn connect<K: AsRef<str>, V: AsRef<str>>(params: &[(K, V)]) -> Result<Self, PgError> {
        Ok(Self::from_connection(PgConnection::connect(
            params,
            ConnectionKind::Replication,
        )?))
    }

    /// Wraps an open replication connection.
    pub fn from_connection(conn: PgConnection) -> Self {
        ReplicationConnection { conn }
    }

    /// The underlying connection, for SQL in the same session (e.g. `BEGIN`, `COPY`).
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Server version, e.g. 150018.
    pub fn server_version(&self) -> i32 {
        self.conn.server_version()
    }

    /// `IDENTIFY_SYSTEM`.
    pub fn identify_system(&mut self) -> Result<SystemIdentity, PgError> {
        let r = self.conn.query("IDENTIFY_SYSTEM")?;
        let bad = |what: &str| PgError::UnexpectedResult {
            command: "IDENTIFY_SYSTEM".into(),
            status: format!("missing or invalid {what}"),
        };
        Ok(SystemIdentity {
            system_id: r
                .get(0, "systemid")
                .ok_or_else(|| bad("systemid"))?
                .to_string(),
            timeline: r
                .get(0, "timeline")
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("timeline"))?,
            xlogpos: r
                .get(0, "xlogpos")
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("xlogpos"))?,
            dbname: r.get(0, "dbname").map(str::to_string),
        })
    }

    /// `TIMELINE_HISTORY tli`: the text of the timeline's history file (lines
    /// `parentTLI<TAB>switchpoint<TAB>reason`). Timeline 1 has none.
    pub fn timeline_history(&mut self, tli: u32) -> Result<String, PgError> {
        let sql = format!("TIMELINE_HISTORY {tli}");
        let r = self.conn.query(&sql)?;
        r.get(0, "content")
            .map(str::to_string)
            .ok_or_else(|| PgError::UnexpectedResult {
                command: sql,
                status: "missing content".into(),
            })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput ...`, in the syntax the server
    /// understands (generic options on 15+, legacy keywords before). A permanent slot is
    /// two-phase on 15+, as the streaming options ask for (a temporary one only serves a
    /// snapshot).
    pub fn create_slot(
        &mut self,
        name: &str,
        temporary: bool,
        snapshot: SnapshotAction,
    ) -> Result<CreatedSlot, PgError> {
        let modern = self.conn.server_version() >= 150000;
        let action = match (snapshot, modern) {
            (SnapshotAction::Nothing, true) => "(SNAPSHOT 'nothing'",
            (SnapshotAction::Export, true) => "(SNAPSHOT 'export'",
            (SnapshotAction::Use, true) => "(SNAPSHOT 'use'",
            (SnapshotAction::Nothing, false) => "NOEXPORT_SNAPSHOT",
            (SnapshotAction::Export, false) => "EXPORT_SNAPSHOT",
            (SnapshotAction::Use, false) => "USE_SNAPSHOT",
        };
        let two_phase = if modern && !temporary {
            ", TWO_PHASE true"
        } else {
            ""
        };
        let action = if modern {
            format!("{action}{two_phase})")
        } else {
            action.to_string()
        };
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput {}",
            quote_ident(name),
            if temporary { " TEMPORARY" } else { "" },
            action
        );
        self.created_slot(&sql, name)
    }

    /// `CREATE_REPLICATION_SLOT name LOGICAL pgoutput (SNAPSHOT 'nothing', TWO_PHASE true, FAILOVER)`
    /// (PostgreSQL 17+): a slot that standbys with `sync_replication_slots = on` keep in step,
    /// so that it exists, at a safe position, on a standby promoted in a failover.
    /// Two-phase too, like [`Self::create_slot`] (checked on 17.10 and 18.6).
    pub fn create_failover_slot(&mut self, name: &str) -> Result<CreatedSlot, PgError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'nothing', TWO_PHASE true, FAILOVER)",
            quote_ident(name)
        );
        self.created_slot(&sql, name)
    }

    /// `ALTER_REPLICATION_SLOT name (FAILOVER on|off)` (PostgreSQL 17+); refused while another
    /// process streams from the slot.
    pub fn set_slot_failover(&mut self, name: &str, failover: bool) -> Result<(), PgError> {
        self.conn.execute(&format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER {})",
            quote_ident(name),
            if failover { "true" } else { "false" }
        ))
    }

    /// Runs a `CREATE_REPLICATION_SLOT` and reads its result row.
    fn created_slot(&mut self, sql: &str, name: &str) -> Result<CreatedSlot, PgError> {
        let r = self.conn.query(sql)?;
        let consistent_point = r
            .get(0, "consistent_point")
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| PgError::UnexpectedResult {
                command: sql.to_owned(),
                status: "missing or invalid consistent_point".into(),
            })?;
        Ok(CreatedSlot {
            slot_name: r.get(0, "slot_name").unwrap_or(name).to_string(),
            consistent_point,
            snapshot_name: r.get(0, "snapshot_name").map(str::to_string),
        })
    }

    /// `START_REPLICATION SLOT name LOGICAL start (options)`; the connection is in CopyBoth
    /// mode afterwards. The server starts at the later of `start` and the slot's
    /// `confirmed_flush_lsn`, and skips transactions whose commit record begins before it, so
    /// `start` must be a Commit's `end_lsn` (or `0/0`).
    pub fn start_logical(
        &mut self,
        slot: &str,
        start: Lsn,
        options: &PgOutputOptions,
    ) -> Result<(), PgError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} {}",
            quote_ident(slot),
            start,
            options.to_sql()
        );
        self.conn.start_copy_both(&sql)
    }

    /// Waits up to `timeout` for one CopyData message; `None` on timeout. The server ending
    /// the stream is reported as [`PgError::ConnectionLost`] (or the server's error).
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<CopyBuf>, PgError> {
        self.recv_or_wake(timeout, &[])
    }

    /// [`recv`](Self::recv), also returning `None` as soon as one of `wake` (at most three
    /// descriptors, e.g. a shutdown signal's) is readable.
    pub fn recv_or_wake(
        &mut self,
        timeout: Duration,
        wake: &[std::os::fd::RawFd],
    ) -> Result<Option<CopyBuf>, PgError> {
        match self.conn.get_copy_data_or_wake(timeout, wake)? {
            CopyData::Data(buf) => Ok(Some(buf)),
            CopyData::Timeout => Ok(None),
            CopyData::Done => Err(PgError::ConnectionLost(
                "the server ended the replication stream".into(),
            )),
        }
    }

    /// True when the server's socket has unread data now (one `poll` that never waits).
    pub fn readable_now(&self) -> Result<bool, PgError> {
        self.conn.socket_readable()
    }

    /// Sends a standby status update. `flush` is the only position that moves the slot's
    /// `confirmed_flush_lsn`; it must never decrease and never run ahead of durable data.
    pub fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), PgError> {
        let update = framing::StandbyStatusUpdate {
            write,
            flush,
            apply,
            client_time: framing::now_pg_micros(),
            reply_requested,
        };
        self.conn.put_copy_data(&update.encode())
    }

    /// Ends the stream from our side (CopyDone) and waits for the server to finish it.
    pub fn stop(&mut self, timeout: Duration) -> Result<(), PgError> {
        self.conn.end_copy_both(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_follow_server_version() {
        let o = PgOutputOptions::for_server(140010, vec!["cdc_pub".into()]);
        assert_eq!(
            o.to_sql(),
            "(\"proto_version\" '2', \"publication_names\" '\"cdc_pub\"', \"messages\" 'true', \"streaming\" 'on')"
        );
        let o = PgOutputOptions::for_server(150018, vec!["cdc_pub".into()]);
        assert_eq!(
            o.to_sql(),
            "(\"proto_version\" '3', \"publication_names\" '\"cdc_pub\"', \"messages\" 'true', \"streaming\" 'on', \"two_phase\" 'true')"
        );
        for v in [160000, 170005, 180006] {
            let o = PgOutputOptions::for_server(v, vec!["cdc_pub".into()]);
            assert_eq!(
                o.to_sql(),
                "(\"proto_version\" '4', \"publication_names\" '\"cdc_pub\"', \"messages\" 'true', \"streaming\" 'parallel', \"two_phase\" 'true')"
            );
        }
        let o = PgOutputOptions::for_server(130000, vec!["a".into(), "it's".into()]);
        assert_eq!(
            o.to_sql(),
            "(\"proto_version\" '1', \"publication_names\" '\"a\",\"it''s\"')"
        );
    }
}
