//! The pure step of the wal thread: pgoutput messages in, [`ChangeEvent`]s out.
//!
//! [`Translator`] keeps what the stream has described so far (relations, types), numbers
//! the changes of each transaction, fills unchanged TOAST values from a full old row,
//! spools streamed (in-progress) transactions and replays them at Stream Commit. It reads
//! and writes nothing else: the events, commits and schema notices go to an [`Emit`], which
//! the wal thread backs with the ring (and tests with a vector).
//!
//! Prepared transactions (two-phase, proto ≥ 3) arrive at PREPARE TRANSACTION, before the
//! outcome is known. They go to the same spool and are replayed at COMMIT PREPARED, with the
//! commit's LSN and time, so they are published once, in commit order, exactly as the plain
//! commit PostgreSQL sends without two-phase; ROLLBACK PREPARED drops them. Once a position
//! past a PREPARE is confirmed, PostgreSQL sends only its COMMIT PREPARED after a reconnect,
//! so [`Translator::hold_point`] tells the wal thread how far it may confirm meanwhile.
//!
//! The last published change of each transaction carries `last_in_tx`. That is known only at
//! the commit record, so one translated change is held back ([`HeldChange`]) and emitted when
//! the next change or the commit arrives; the commit record follows the last change at once
//! (pgoutput sends a transaction after it committed), so this adds no latency.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::pg::pgoutput::{Cell, DecodeError, Decoder, LogicalMessage, OldTuple, TupleData};
use crate::pg::value::{decode_text_into, TypeRegistry, Value, ValueKind};
use crate::pg::Lsn;

use super::spool::{Spool, SpoolError};
use crate::outbox::{self, MissingColumn, OutboxColumns, OutboxTables};
use crate::pg::timeline::TimelineHistory;
use crate::wire::event::{ChangeEvent, ColumnValue, Operation, TableRef};
use crate::wire::outbox::OutboxEvent;

/// Why a message could not be translated.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    /// A pgoutput message could not be decoded.
    #[error("malformed pgoutput message: {0}")]
    Decode(#[from] DecodeError),
    /// A change referred to a relation that was never described.
    #[error("pgoutput change for relation {0} without a preceding Relation message")]
    UnknownRelation(u32),
    /// A tuple did not have as many columns as its Relation message.
    #[error("relation {relation}: tuple has {got} columns, the Relation message {expected}")]
    ColumnCount {
        /// Table.
        relation: String,
        /// Columns in the tuple.
        got: usize,
        /// Columns in the Relation message.
        expected: usize,
    },
    /// The spool of streamed transactions failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// An outbox table lacks a column the bridge reads.
    #[error(transparent)]
    Outbox(#[from] MissingColumn),
}

/// Where translated changes go, in order. `idle` tells whether the translator had nothing
/// open when it emitted (no transaction, no stream block, an empty spool): the wal thread's
/// status updates need it while it waits for room in the ring.
pub(crate) trait Emit {
    /// The error of the emitting side; translation errors convert into it.
    type Error: From<TranslateError>;
    /// One change.
    fn change(&mut self, ev: Box<ChangeEvent>, idle: bool) -> Result<(), Self::Error>;
    /// One outbox event, in its place among its transaction's changes.
    fn outbox(&mut self, ev: Box<OutboxEvent>, idle: bool) -> Result<(), Self::Error>;
    /// The end of a transaction, after its changes.
    fn commit(&mut self, end_lsn: Lsn, idle: bool) -> Result<(), Self::Error>;
    /// A Relation message for a streamed table (its schema may have changed).
    fn relation(&mut self, table: &TableRef);
    /// An event to fill again instead of allocating one, when there is one.
    fn recycled(&mut self) -> Option<Box<ChangeEvent>>;
}

#[derive(Debug)]
struct ColumnInfo {
    name: Arc<str>,
    kind: ValueKind,
    key: bool,
}

#[derive(Debug)]
struct RelationInfo {
    table: Arc<TableRef>,
    qualified: String,
    columns: Vec<ColumnInfo>,
    streamed: bool,
    /// Set for an outbox table: its inserts are outbox events, and it streams no changes.
    outbox: Option<OutboxColumns>,
}

/// The change held back until it is known whether it is the last of its transaction.
#[derive(Debug, Default)]
struct HeldChange(Option<Box<ChangeEvent>>);

impl HeldChange {
    /// Holds `ev` and gives back the change held before: a later one exists, so that one is
    /// not the last of its transaction.
    fn hold(&mut self, ev: Box<ChangeEvent>) -> Option<Box<ChangeEvent>> {
        self.0.replace(ev)
    }

    /// At the commit record: the held change, marked as the transaction's last.
    fn release_last(&mut self) -> Option<Box<ChangeEvent>> {
        self.0.take().map(|mut ev| {
            ev.last_in_tx = true;
            ev
        })
    }
}

/// A prepared transaction whose outcome has not arrived; its changes are in the spool.
#[derive(Debug, Clone, Copy)]
struct Prepared {
    /// Start of its PREPARE record: confirming a position past it would lose the changes.
    prepare_lsn: Lsn,
    /// Sent in stream blocks (Stream Prepare): its spooled messages carry the xid prefix.
    streamed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Txn {
    xid: u32,
    commit_lsn: Lsn,
    /// The timeline `commit_lsn` belongs to.
    timeline: u32,
    commit_time: i64,
    seq: u32,
}

/// The translation state of one replication connection.
pub(crate) struct Translator {
    decoder: Decoder,
    /// By relation id, looked up for every change (foldhash: the ids are PostgreSQL's).
    relations: foldhash::HashMap<u32, RelationInfo>,
    types: TypeRegistry,
    /// The built-in base type of each user type that is a domain over one (from Type
    /// messages), for encoders that type values by column.
    base_types: HashMap<u32, u32>,
    table_filter: Option<HashSet<String>>,
    txn: Option<Txn>,
    /// The latest change of the open transaction, not emitted yet. It belongs to this
    /// connection: a reconnect starts over from the durable position and sends it again.
    held: HeldChange,
    current_stream: Option<u32>,
    warned_values: std::cell::Cell<bool>,
    /// Spool of streamed transactions: set once the slot is ours, taken out while a
    /// transaction is replayed.
    spool: Option<Spool>,
    /// The server's timeline history: gives each commit its timeline.
    timelines: TimelineHistory,
    /// The outbox tables.
    outbox: OutboxTables,
    /// The prepared transaction being received (Begin Prepare .. Prepare): xid, PREPARE LSN.
    preparing: Option<(u32, Lsn)>,
    /// Prepared transactions waiting for COMMIT or ROLLBACK PREPARED, by xid.
    prepared: HashMap<u32, Prepared>,
}

impl Translator {
    /// A translator for the tables in `tables` (qualified names; all when `None`) on a
    /// server with the timeline history `timelines`.
    pub(crate) fn new(tables: Option<HashSet<String>>, timelines: TimelineHistory) -> Self {
        Translator {
            decoder: Decoder::new(),
            relations: foldhash::HashMap::default(),
            types: TypeRegistry::new(),
            base_types: HashMap::new(),
            table_filter: tables,
            txn: None,
            held: HeldChange::default(),
            current_stream: None,
            warned_values: std::cell::Cell::new(false),
            spool: None,
            timelines,
            outbox: OutboxTables::default(),
            preparing: None,
            prepared: HashMap::new(),
        }
    }

    /// Inserts into `tables` become outbox events from now on.
    pub(crate) fn set_outbox(&mut self, tables: OutboxTables) {
        self.outbox = tables;
    }

    /// The highest position that may be confirmed while prepared transactions wait for their
    /// outcome: the earliest PREPARE's start (PostgreSQL sends a prepared transaction again
    /// after a reconnect only when its PREPARE is not before the confirmed position).
    pub(crate) fn hold_point(&self) -> Option<Lsn> {
        self.prepared
            .values()
            .map(|p| p.prepare_lsn)
            .chain(self.preparing.map(|(_, lsn)| lsn))
            .min()
    }

    /// A transaction that commits at `commit_lsn`, numbered from its first change.
    fn txn_at(&self, xid: u32, commit_lsn: Lsn, commit_time: i64) -> Txn {
        Txn {
            xid,
            commit_lsn,
            timeline: self.timelines.timeline_of(commit_lsn),
            commit_time,
            seq: 0,
        }
    }

    /// Streamed transactions go to `spool` from now on.
    pub(crate) fn set_spool(&mut self, spool: Spool) {
        self.spool = Some(spool);
    }

    /// True when nothing is open: no transaction, no stream block, nothing spooled (and no
    /// spooled transaction being replayed).
    pub(crate) fn is_idle(&self) -> bool {
        self.txn.is_none()
            && self.current_stream.is_none()
            && self.preparing.is_none()
            && self.prepared.is_empty()
            // No spool means a streamed transaction is being replayed right now.
            && self.spool.as_ref().is_some_and(Spool::is_empty)
    }

    /// Drops a half-received transaction (at shutdown): PostgreSQL sends it again next time.
    pub(crate) fn drop_open(&mut self) {
        self.txn = None;
        self.held = HeldChange::default();
        self.current_stream = None;
        self.preparing = None;
    }

    /// Translates one pgoutput message (`raw`, from the WAL record at `wal_start`): schema
    /// messages update the caches, row messages become events for `out`, and a stream
    /// block's messages go to the spool until its Stream Commit.
    pub(crate) fn message<E: Emit>(
        &mut self,
        raw: &[u8],
        wal_start: Lsn,
        out: &mut E,
    ) -> Result<(), E::Error> {
        let msg = self.decoder.decode(raw).map_err(TranslateError::Decode)?;
        // Inside a stream block everything goes to the transaction's spool file.
        if let Some(top) = self.current_stream {
            let sub = match &msg {
                LogicalMessage::StreamStop => None,
                LogicalMessage::Relation(r) => r.xid,
                LogicalMessage::Type(t) => t.xid,
                LogicalMessage::Insert(i) => i.xid,
                LogicalMessage::Update(u) => u.xid,
                LogicalMessage::Delete(d) => d.xid,
                LogicalMessage::Truncate(t) => t.xid,
                LogicalMessage::Message(m) => m.xid,
                _ => Some(top),
            };
            match sub {
                Some(sub) => {
                    if let Some(spool) = self.spool.as_mut() {
                        spool
                            .append(top, sub, wal_start, raw)
                            .map_err(TranslateError::Spool)?;
                    }
                    return Ok(());
                }
                None => {
                    self.current_stream = None;
                    return Ok(());
                }
            }
        }
        // Between Begin Prepare and Prepare the changes go to the transaction's spool file.
        // Relation and Type messages describe the table for everything after them (pgoutput
        // does not send them again for later transactions): they are applied at once.
        if let Some((xid, prepare_lsn)) = self.preparing {
            if let LogicalMessage::Prepare(p) = &msg {
                self.preparing = None;
                self.prepared.insert(
                    p.xid,
                    Prepared {
                        prepare_lsn,
                        streamed: false,
                    },
                );
            } else if matches!(msg, LogicalMessage::Relation(_) | LogicalMessage::Type(_)) {
                let mut txn = self.txn_at(xid, wal_start, 0);
                self.apply(msg, wal_start, &mut txn, out)?;
            } else if let Some(spool) = self.spool.as_mut() {
                spool
                    .append(xid, xid, wal_start, raw)
                    .map_err(TranslateError::Spool)?;
            }
            return Ok(());
        }
        match msg {
            LogicalMessage::Begin(b) => {
                self.txn = Some(self.txn_at(b.xid, b.final_lsn, b.commit_time))
            }
            LogicalMessage::Commit(c) => {
                self.txn = None;
                self.commit(c.end_lsn, out)?;
            }
            LogicalMessage::StreamStart(s) => self.current_stream = Some(s.xid),
            LogicalMessage::StreamCommit(c) => {
                let mut txn = self.txn_at(c.xid, c.commit_lsn, c.commit_time);
                self.replay(c.xid, true, &mut txn, out)?;
                self.commit(c.end_lsn, out)?;
            }
            LogicalMessage::BeginPrepare(b) => self.preparing = Some((b.xid, b.prepare_lsn)),
            LogicalMessage::StreamPrepare(p) => {
                self.prepared.insert(
                    p.xid,
                    Prepared {
                        prepare_lsn: p.prepare_lsn,
                        streamed: true,
                    },
                );
            }
            LogicalMessage::CommitPrepared(k) => {
                // The ids come from the COMMIT PREPARED record, which is also the commit a
                // server without two-phase sends for it: the same events either way.
                let mut txn = self.txn_at(k.xid, k.commit_lsn, k.commit_time);
                match self.prepared.remove(&k.xid) {
                    Some(p) => self.replay(k.xid, p.streamed, &mut txn, out)?,
                    None => log::warn!(
                        "COMMIT PREPARED of transaction {} ('{}') arrived without its prepared changes; nothing is published for it",
                        k.xid,
                        k.gid
                    ),
                }
                self.commit(k.end_lsn, out)?;
            }
            LogicalMessage::RollbackPrepared(r) => {
                self.prepared.remove(&r.xid);
                if let Some(spool) = self.spool.as_mut() {
                    spool.abort(r.xid, r.xid).map_err(TranslateError::Spool)?;
                }
            }
            LogicalMessage::StreamAbort(a) => {
                if let Some(spool) = self.spool.as_mut() {
                    spool
                        .abort(a.xid, a.subxid)
                        .map_err(TranslateError::Spool)?;
                }
            }
            other => {
                let mut txn = self.txn.unwrap_or(self.txn_at(0, wal_start, 0));
                self.apply(other, wal_start, &mut txn, out)?;
                if self.txn.is_some() {
                    self.txn = Some(txn);
                }
            }
        }
        Ok(())
    }

    /// Translates the spooled messages of `xid` (with the stream block's xid prefix when
    /// `streamed`) as the changes of `txn`.
    fn replay<E: Emit>(
        &mut self,
        xid: u32,
        streamed: bool,
        txn: &mut Txn,
        out: &mut E,
    ) -> Result<(), E::Error> {
        if let Some(mut spool) = self.spool.take() {
            let replayed = spool.replay(xid, |m| {
                let msg =
                    LogicalMessage::parse(&m.data, streamed).map_err(TranslateError::Decode)?;
                self.apply(msg, m.lsn, txn, out)
            });
            self.spool = Some(spool);
            replayed.map_err(TranslateError::Spool)??;
        }
        Ok(())
    }

    /// The commit record: the held change (the transaction's last), then the commit.
    fn commit<E: Emit>(&mut self, end_lsn: Lsn, out: &mut E) -> Result<(), E::Error> {
        let idle = self.is_idle();
        if let Some(last) = self.held.release_last() {
            out.change(last, idle)?;
        }
        out.commit(end_lsn, idle)
    }

    /// Schema messages update the caches; row messages become events on the ring.
    fn apply<E: Emit>(
        &mut self,
        msg: LogicalMessage<'_>,
        lsn: Lsn,
        txn: &mut Txn,
        out: &mut E,
    ) -> Result<(), E::Error> {
        match msg {
            LogicalMessage::Relation(r) => {
                let qualified = format!("{}.{}", r.namespace, r.name);
                let columns: Vec<ColumnInfo> = r
                    .columns
                    .iter()
                    .map(|c| ColumnInfo {
                        name: Arc::from(c.name),
                        kind: self.types.kind(c.type_oid),
                        key: c.is_key(),
                    })
                    .collect();
                let outbox = self
                    .outbox
                    .columns(&qualified, &r.columns)
                    .map_err(TranslateError::Outbox)?;
                let streamed = outbox.is_none()
                    && self
                        .table_filter
                        .as_ref()
                        .is_none_or(|f| f.contains(&qualified));
                let table = Arc::new(TableRef {
                    columns: r
                        .columns
                        .iter()
                        .zip(&columns)
                        .map(|(c, info)| crate::wire::event::ColumnMeta {
                            name: Arc::clone(&info.name),
                            type_oid: self
                                .base_types
                                .get(&c.type_oid)
                                .copied()
                                .unwrap_or(c.type_oid),
                            type_modifier: c.type_modifier,
                            key: info.key,
                        })
                        .collect(),
                    schema: Arc::from(r.namespace),
                    table: Arc::from(r.name),
                    relation_id: r.relid,
                    key_columns: columns
                        .iter()
                        .filter(|c| c.key)
                        .map(|c| Arc::clone(&c.name))
                        .collect(),
                });
                if streamed {
                    out.relation(&table);
                }
                self.relations.insert(
                    r.relid,
                    RelationInfo {
                        table,
                        qualified,
                        columns,
                        streamed,
                        outbox,
                    },
                );
            }
            LogicalMessage::Type(t) => {
                self.types.register(t.oid, t.namespace, t.name);
                match crate::wire::encode::debezium::builtin_type_oid(t.namespace, t.name) {
                    Some(base) => self.base_types.insert(t.oid, base),
                    None => self.base_types.remove(&t.oid),
                };
            }
            LogicalMessage::Insert(i) => {
                let seq = next_seq(txn);
                let rel = self.relation(i.relid)?;
                if let Some(cols) = &rel.outbox {
                    let ev = cols.event(&rel.table, &i.new, position(txn, seq));
                    out.outbox(Box::new(ev), self.is_idle())?;
                } else if rel.streamed {
                    let mut ev = new_event(out.recycled(), rel, Operation::Insert, lsn, txn, seq);
                    ev.old_columns = None;
                    let ChangeEvent {
                        columns,
                        unchanged_toast,
                        ..
                    } = &mut *ev;
                    self.columns(rel, &i.new, false, None, unchanged_toast, columns)?;
                    self.push_change(ev, out)?;
                }
            }
            LogicalMessage::Update(u) => {
                let seq = next_seq(txn);
                let rel = self.relation(u.relid)?;
                if rel.streamed {
                    let mut ev = new_event(out.recycled(), rel, Operation::Update, lsn, txn, seq);
                    let (old, full_old) = match &u.old {
                        Some(OldTuple::Key(t)) => (Some((t, true)), None),
                        Some(OldTuple::Full(t)) => (Some((t, false)), Some(t)),
                        None => (None, None),
                    };
                    ev.old_columns = match old {
                        Some((t, keys_only)) => {
                            let mut old = ev.old_columns.take().unwrap_or_default();
                            self.columns(rel, t, keys_only, None, &mut Vec::new(), &mut old)?;
                            Some(old)
                        }
                        None => None,
                    };
                    let ChangeEvent {
                        columns,
                        unchanged_toast,
                        ..
                    } = &mut *ev;
                    self.columns(rel, &u.new, false, full_old, unchanged_toast, columns)?;
                    self.push_change(ev, out)?;
                }
            }
            LogicalMessage::Delete(d) => {
                let seq = next_seq(txn);
                let rel = self.relation(d.relid)?;
                if rel.streamed {
                    let mut ev = new_event(out.recycled(), rel, Operation::Delete, lsn, txn, seq);
                    let tuple = d.old.tuple();
                    self.columns(
                        rel,
                        &tuple,
                        d.old.is_key(),
                        None,
                        &mut Vec::new(),
                        &mut ev.columns,
                    )?;
                    ev.old_columns = Some(ev.columns.clone());
                    self.push_change(ev, out)?;
                }
            }
            LogicalMessage::Truncate(t) => {
                for relid in &t.relids {
                    let seq = next_seq(txn);
                    let rel = self.relation(*relid)?;
                    if rel.streamed {
                        let mut ev =
                            new_event(out.recycled(), rel, Operation::Truncate, lsn, txn, seq);
                        ev.columns.clear();
                        ev.old_columns = None;
                        self.push_change(ev, out)?;
                    }
                }
            }
            // A transactional message with an outbox prefix is an outbox event; others (and
            // non-transactional ones, which belong to no commit) are not routed.
            LogicalMessage::Message(m) if m.transactional() => {
                let seq = txn.seq;
                if let Some(ev) = outbox::message_event(m.prefix, m.content, position(txn, seq)) {
                    next_seq(txn);
                    out.outbox(Box::new(ev), self.is_idle())?;
                }
            }
            // Origins and two-phase markers carry no row changes.
            _ => {}
        }
        Ok(())
    }

    fn relation(&self, relid: u32) -> Result<&RelationInfo, TranslateError> {
        self.relations
            .get(&relid)
            .ok_or(TranslateError::UnknownRelation(relid))
    }

    /// Typed columns of a tuple, written over `out` (reusing its names and text values).
    /// `keys_only` keeps just the replica identity columns (a 'K' tuple carries NULLs
    /// elsewhere). Unchanged TOAST values are taken from the full old row when there is one,
    /// otherwise listed in `unchanged`.
    fn columns(
        &self,
        rel: &RelationInfo,
        tuple: &TupleData<'_>,
        keys_only: bool,
        full_old: Option<&TupleData<'_>>,
        unchanged: &mut Vec<Arc<str>>,
        out: &mut Vec<ColumnValue>,
    ) -> Result<(), TranslateError> {
        if tuple.len() != rel.columns.len() {
            return Err(TranslateError::ColumnCount {
                relation: rel.qualified.clone(),
                got: tuple.len(),
                expected: rel.columns.len(),
            });
        }
        let mut n = 0;
        for (i, (cell, col)) in tuple.iter().zip(&rel.columns).enumerate() {
            if keys_only && !col.key {
                continue;
            }
            let cell = match cell {
                Cell::Unchanged => match full_old.and_then(|o| o.get(i)) {
                    Some(c) if !c.is_unchanged() => c,
                    _ => {
                        unchanged.push(Arc::clone(&col.name));
                        continue;
                    }
                },
                c => c,
            };
            if n == out.len() {
                out.push(ColumnValue {
                    name: Arc::clone(&col.name),
                    value: Value::Null,
                });
            } else if !Arc::ptr_eq(&out[n].name, &col.name) {
                out[n].name = Arc::clone(&col.name);
            }
            let value = &mut out[n].value;
            n += 1;
            match cell {
                Cell::Null | Cell::Unchanged => *value = Value::Null,
                Cell::Text(b) => {
                    if let Err(e) = decode_text_into(col.kind, b, value) {
                        if !self.warned_values.replace(true) {
                            // Names and kinds only: a row's value may be personal data and
                            // must not end up in logs.
                            log::warn!(
                                "{}.{}: a value is not a valid {} ({} expected{}); publishing the text as it is",
                                rel.qualified,
                                col.name,
                                e.what(),
                                e.expected(),
                                e.element()
                                    .map(|i| format!(", array element {i}"))
                                    .unwrap_or_default()
                            );
                        }
                        *value = Value::Text(String::from_utf8_lossy(b).into_owned());
                    }
                }
                Cell::Binary(b) => *value = Value::Bytes(b.to_vec()),
            }
        }
        out.truncate(n);
        Ok(())
    }

    /// Holds `ev` back and emits the change held before it.
    fn push_change<E: Emit>(&mut self, ev: Box<ChangeEvent>, out: &mut E) -> Result<(), E::Error> {
        match self.held.hold(ev) {
            Some(earlier) => out.change(earlier, self.is_idle()),
            None => Ok(()),
        }
    }
}

/// An event for a change of `rel`: `recycled` (one the publisher gave back), or a new one.
/// The caller sets `columns` and `old_columns`; `unchanged_toast` is emptied.
fn new_event(
    recycled: Option<Box<ChangeEvent>>,
    rel: &RelationInfo,
    operation: Operation,
    lsn: Lsn,
    txn: &Txn,
    seq: u32,
) -> Box<ChangeEvent> {
    match recycled {
        Some(mut ev) => {
            if !Arc::ptr_eq(&ev.table, &rel.table) {
                ev.table = Arc::clone(&rel.table);
            }
            ev.operation = operation;
            ev.lsn = lsn;
            ev.commit_lsn = txn.commit_lsn;
            ev.timeline = txn.timeline;
            ev.xid = txn.xid;
            ev.commit_time = txn.commit_time;
            ev.seq = seq;
            ev.last_in_tx = false;
            ev.unchanged_toast.clear();
            ev
        }
        None => Box::new(ChangeEvent {
            table: Arc::clone(&rel.table),
            operation,
            lsn,
            commit_lsn: txn.commit_lsn,
            timeline: txn.timeline,
            xid: txn.xid,
            commit_time: txn.commit_time,
            seq,
            last_in_tx: false,
            columns: Vec::with_capacity(rel.columns.len()),
            old_columns: None,
            unchanged_toast: Vec::new(),
        }),
    }
}

fn position(txn: &Txn, seq: u32) -> outbox::Position {
    outbox::Position {
        commit_lsn: txn.commit_lsn,
        timeline: txn.timeline,
        seq,
        commit_time: txn.commit_time,
    }
}

fn next_seq(txn: &mut Txn) -> u32 {
    let s = txn.seq;
    txn.seq = txn.seq.wrapping_add(1);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::pgoutput::test_vectors;

    fn change(seq: u32) -> Box<ChangeEvent> {
        Box::new(ChangeEvent {
            table: Arc::new(TableRef {
                columns: Vec::new(),
                schema: Arc::from("public"),
                table: Arc::from("t"),
                relation_id: 1,
                key_columns: Vec::new(),
            }),
            operation: Operation::Insert,
            lsn: Lsn(100),
            commit_lsn: Lsn(200),
            timeline: 1,
            xid: 7,
            commit_time: 0,
            seq,
            last_in_tx: false,
            columns: Vec::new(),
            old_columns: None,
            unchanged_toast: Vec::new(),
        })
    }

    /// Runs transactions of the given sizes through a [`HeldChange`] as the translator does:
    /// (seq, last_in_tx) of what reaches the ring, with `None` for each commit item.
    fn ring(sizes: &[u32]) -> Vec<Option<(u32, bool)>> {
        let mut held = HeldChange::default();
        let mut out = Vec::new();
        for &n in sizes {
            for seq in 0..n {
                if let Some(ev) = held.hold(change(seq)) {
                    out.push(Some((ev.seq, ev.last_in_tx)));
                }
            }
            if let Some(ev) = held.release_last() {
                out.push(Some((ev.seq, ev.last_in_tx)));
            }
            out.push(None);
        }
        out
    }

    #[test]
    fn only_the_last_change_of_a_transaction_is_marked() {
        assert_eq!(
            ring(&[3, 1, 0, 2]),
            vec![
                Some((0, false)),
                Some((1, false)),
                Some((2, true)),
                None,
                Some((0, true)),
                None,
                // A transaction with no published change (filtered tables) marks nothing.
                None,
                Some((0, false)),
                Some((1, true)),
                None,
            ]
        );
    }

    #[test]
    fn every_change_reaches_the_ring_once_and_before_its_commit() {
        let sizes = [5, 1, 1, 0, 300, 2];
        let out = ring(&sizes);
        let mut at = 0;
        for &n in &sizes {
            let txn = &out[at..at + n as usize + 1];
            let seqs: Vec<u32> = txn[..n as usize].iter().map(|c| c.unwrap().0).collect();
            assert_eq!(seqs, (0..n).collect::<Vec<_>>());
            let marked = txn[..n as usize].iter().filter(|c| c.unwrap().1).count();
            assert_eq!(marked, usize::from(n > 0));
            assert_eq!(txn[n as usize], None);
            at += n as usize + 1;
        }
        assert_eq!(at, out.len());
    }

    /// What a translator emitted, in order.
    #[derive(Default)]
    struct Collected {
        /// `None` for a commit.
        out: Vec<Option<Box<ChangeEvent>>>,
        commits: Vec<Lsn>,
        relations: Vec<String>,
        outbox: Vec<OutboxEvent>,
    }

    impl Emit for Collected {
        type Error = TranslateError;

        fn change(&mut self, ev: Box<ChangeEvent>, _idle: bool) -> Result<(), TranslateError> {
            self.out.push(Some(ev));
            Ok(())
        }

        fn outbox(&mut self, ev: Box<OutboxEvent>, _idle: bool) -> Result<(), TranslateError> {
            self.outbox.push(*ev);
            Ok(())
        }

        fn commit(&mut self, end_lsn: Lsn, _idle: bool) -> Result<(), TranslateError> {
            self.out.push(None);
            self.commits.push(end_lsn);
            Ok(())
        }

        fn relation(&mut self, table: &TableRef) {
            self.relations
                .push(format!("{}.{}", table.schema, table.table));
        }

        fn recycled(&mut self) -> Option<Box<ChangeEvent>> {
            None
        }
    }

    /// Runs a captured vector file through a translator with a spool in a private
    /// directory of its own.
    fn translate(name: &str, capture: &str) -> Collected {
        translate_with(name, capture, OutboxTables::default())
    }

    fn translate_with(name: &str, capture: &str, outbox: OutboxTables) -> Collected {
        static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pgbridge-translate-{}-{}-{name}",
            std::process::id(),
            RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut t = Translator::new(None, TimelineHistory::single(1));
        t.set_spool(Spool::new(&dir).unwrap());
        t.set_outbox(outbox);
        let mut c = Collected::default();
        for v in test_vectors::load(capture) {
            t.message(&v.bytes, v.lsn, &mut c).unwrap();
        }
        assert!(t.is_idle(), "{name}: everything committed or aborted");
        drop(t);
        let _ = std::fs::remove_dir_all(&dir);
        c
    }

    fn values(ev: &ChangeEvent) -> Vec<(String, Value)> {
        ev.columns
            .iter()
            .map(|c| (c.name.to_string(), c.value.clone()))
            .collect()
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn every_capture_translates_and_ends_idle() {
        for (name, capture) in test_vectors::ALL {
            let c = translate(name, capture);
            // Each transaction's changes are numbered from 0 and only its last is marked.
            let mut seq = 0;
            let mut last_marked = true;
            for item in &c.out {
                match item {
                    Some(ev) => {
                        assert_eq!(ev.seq, seq, "{name}");
                        assert!(seq == 0 || !last_marked, "{name}: only the last marked");
                        last_marked = ev.last_in_tx;
                        seq += 1;
                    }
                    None => {
                        assert!(seq == 0 || last_marked, "{name}: last change marked");
                        seq = 0;
                    }
                }
            }
        }
    }

    #[test]
    fn basic_inserts_become_typed_changes_of_one_transaction() {
        let c = translate("basic", test_vectors::BASIC);
        assert_eq!(c.relations, ["public.t"]);
        assert_eq!(c.out.len(), 3);
        let (a, b) = (c.out[0].as_ref().unwrap(), c.out[1].as_ref().unwrap());
        assert!(c.out[2].is_none());
        assert_eq!((a.seq, a.last_in_tx), (0, false));
        assert_eq!((b.seq, b.last_in_tx), (1, true));
        assert_eq!(a.operation, Operation::Insert);
        assert_eq!(a.commit_lsn, b.commit_lsn);
        assert_eq!(a.timeline, 1);
        assert_eq!(
            values(a),
            [
                ("id".to_string(), Value::Int(1)),
                ("name".to_string(), text("a")),
                ("big".to_string(), Value::Null),
                ("note".to_string(), text("x")),
            ]
        );
        assert_eq!(values(b)[2], ("big".to_string(), text("c")));
        assert_eq!(values(b)[3], ("note".to_string(), Value::Null));
        assert!(a.old_columns.is_none());
    }

    #[test]
    fn an_outbox_table_gives_events_in_place_of_changes() {
        let config = crate::config::OutboxConfig {
            tables: vec!["t".into()],
            aggregate_type_column: "name".into(),
            aggregate_id_column: "no_such_column".into(),
            event_type_column: "note".into(),
            payload_column: "big".into(),
            ..Default::default()
        };
        let c = translate_with("basic", test_vectors::BASIC, OutboxTables::new(&config));
        assert!(
            c.relations.is_empty(),
            "no schema notice for an outbox table"
        );
        assert_eq!(c.out.len(), 1, "no change, only the commit");
        let events: Vec<_> = c
            .outbox
            .iter()
            .map(|e| {
                (
                    e.id.as_deref(),
                    e.aggregate_type.as_deref(),
                    e.aggregate_id.as_deref(),
                    e.event_type.as_deref(),
                    e.payload.as_slice(),
                    e.seq,
                )
            })
            .collect();
        assert_eq!(
            events,
            [
                (Some("1"), Some("a"), None, Some("x"), b"".as_slice(), 0),
                (Some("2"), Some("b"), None, None, b"c".as_slice(), 1),
            ]
        );
        assert!(c
            .outbox
            .iter()
            .all(|e| e.commit_lsn == c.outbox[0].commit_lsn));
    }

    #[test]
    fn unchanged_toast_values_are_listed_or_taken_from_the_full_old_row() {
        let c = translate("toast", test_vectors::TOAST);
        let changes: Vec<&ChangeEvent> = c.out.iter().flatten().map(|e| &**e).collect();
        let ops: Vec<Operation> = changes.iter().map(|e| e.operation).collect();
        assert_eq!(
            ops,
            [
                Operation::Insert,
                Operation::Update,
                Operation::Update,
                Operation::Delete
            ]
        );
        // Default replica identity: the big value did not change and is not sent.
        let first = changes[1];
        assert_eq!(first.unchanged_toast, [Arc::<str>::from("big")]);
        assert!(first.columns.iter().all(|c| &*c.name != "big"));
        assert_eq!(values(first)[1], ("small".to_string(), text("s2")));
        // Replica identity full: the old row has the value, so it is published.
        let second = changes[2];
        assert!(second.unchanged_toast.is_empty());
        assert_eq!(values(second)[2].1, text(&"x".repeat(3000)));
        // The delete carries the old row as its columns.
        let delete = changes[3];
        assert_eq!(delete.old_columns.as_ref(), Some(&delete.columns));
        assert_eq!(values(delete)[0], ("id".to_string(), Value::Int(1)));
    }

    #[test]
    fn a_truncate_of_several_tables_is_one_change_each() {
        let c = translate("truncate", test_vectors::TRUNCATE);
        let tables: Vec<(String, u32)> = c
            .out
            .iter()
            .flatten()
            .map(|e| {
                assert_eq!(e.operation, Operation::Truncate);
                assert!(e.columns.is_empty() && e.old_columns.is_none());
                (e.table.table.to_string(), e.seq)
            })
            .collect();
        assert_eq!(
            tables,
            [
                ("a".to_string(), 0),
                ("b".to_string(), 1),
                ("a".to_string(), 0)
            ]
        );
        assert_eq!(c.commits.len(), 2);
    }

    #[test]
    fn streamed_transactions_are_replayed_at_stream_commit_without_aborted_parts() {
        let c = translate("streaming", test_vectors::STREAMING);
        assert_eq!(
            c.commits.len(),
            1,
            "the rolled-back transaction emits nothing"
        );
        let ids: Vec<Value> = c
            .out
            .iter()
            .flatten()
            .map(|e| e.columns[0].value.clone())
            .collect();
        let expected: Vec<Value> = (1..=400).chain([801]).map(Value::Int).collect();
        assert_eq!(ids, expected, "the rolled-back savepoint's rows are gone");
        let last = c.out[c.out.len() - 2].as_ref().unwrap();
        assert_eq!((last.seq, last.last_in_tx), (400, true));
        assert!(c.out.last().unwrap().is_none());
    }

    #[test]
    fn prepared_transactions_are_published_once_at_commit_prepared() {
        let c = translate("two_phase", test_vectors::TWO_PHASE);
        let vs = test_vectors::load(test_vectors::TWO_PHASE);
        // The COMMIT PREPARED messages ('K'): their commit LSNs name the transactions.
        let commit_prepared: Vec<(Lsn, Lsn)> = vs
            .iter()
            .filter_map(|v| match LogicalMessage::parse(&v.bytes, false) {
                Ok(LogicalMessage::CommitPrepared(k)) => Some((k.commit_lsn, k.end_lsn)),
                _ => None,
            })
            .collect();
        assert_eq!(commit_prepared.len(), 2);
        let txns: Vec<Vec<&ChangeEvent>> = c
            .out
            .split(Option::is_none)
            .filter(|t| !t.is_empty())
            .map(|t| t.iter().flatten().map(|e| &**e).collect())
            .collect();
        let ids = |t: &[&ChangeEvent]| -> Vec<i64> {
            t.iter()
                .map(|e| match values(e)[0].1 {
                    Value::Int(i) => i,
                    ref v => panic!("id {v:?}"),
                })
                .collect()
        };
        // The row committed in between comes first: commit order, not PREPARE order.
        assert_eq!(
            txns.len(),
            3,
            "{:?}",
            txns.iter().map(|t| ids(t)).collect::<Vec<_>>()
        );
        assert_eq!(ids(&txns[0]), [3]);
        assert_eq!(ids(&txns[1]), [1, 2]);
        // The rolled-back prepared transaction (4) is absent; so is the rolled-back savepoint.
        let streamed: Vec<i64> = (100..500).chain([900]).collect();
        assert_eq!(ids(&txns[2]), streamed);
        for (t, (commit_lsn, _)) in txns[1..].iter().zip(&commit_prepared) {
            assert!(t.iter().all(|e| e.commit_lsn == *commit_lsn));
            assert_eq!(t.iter().filter(|e| e.last_in_tx).count(), 1);
            assert!(t.last().unwrap().last_in_tx);
        }
        // The commits acknowledged: the plain one and the two COMMIT PREPARED, in order.
        assert_eq!(c.commits.len(), 3);
        assert_eq!(c.commits[1], commit_prepared[0].1);
        assert_eq!(c.commits[2], commit_prepared[1].1);
    }

    #[test]
    fn nothing_past_a_waiting_prepare_may_be_confirmed() {
        let vs = test_vectors::load(test_vectors::TWO_PHASE);
        let dir =
            std::env::temp_dir().join(format!("pgbridge-translate-{}-hold", std::process::id()));
        let mut t = Translator::new(None, TimelineHistory::single(1));
        t.set_spool(Spool::new(&dir).unwrap());
        let mut c = Collected::default();
        let mut seen = String::new();
        let mut d = Decoder::new();
        for v in &vs {
            let msg = d.decode(&v.bytes).unwrap();
            t.message(&v.bytes, v.lsn, &mut c).unwrap();
            match msg {
                LogicalMessage::BeginPrepare(b) => {
                    assert_eq!(t.hold_point(), Some(b.prepare_lsn));
                    seen.push('b');
                }
                LogicalMessage::Prepare(p) | LogicalMessage::StreamPrepare(p) => {
                    assert_eq!(t.hold_point(), Some(p.prepare_lsn));
                    assert!(!t.is_idle());
                    seen.push('P');
                }
                LogicalMessage::Commit(_) => {
                    // The plain transaction committed while the first PREPARE waits: its
                    // end is past the PREPARE, which stays the limit.
                    let hold = t.hold_point().unwrap();
                    assert!(hold < *c.commits.last().unwrap());
                    seen.push('C');
                }
                LogicalMessage::CommitPrepared(_) | LogicalMessage::RollbackPrepared(_) => {
                    assert_eq!(t.hold_point(), None);
                    assert!(t.is_idle());
                    seen.push('K');
                }
                _ => {}
            }
        }
        assert_eq!(seen, "bPCKbPKPK");
        drop(t);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_streamed_prepared_transaction_waits_for_its_commit_prepared() {
        // 400 rows streamed and prepared, a row of the same table committed meanwhile (the
        // server describes the table again for it), then COMMIT PREPARED.
        let c = translate("two_phase_streamed", test_vectors::TWO_PHASE_STREAMED);
        let ids: Vec<i64> = c
            .out
            .iter()
            .flatten()
            .map(|e| match values(e)[0].1 {
                Value::Int(i) => i,
                ref v => panic!("id {v:?}"),
            })
            .collect();
        let want: Vec<i64> = std::iter::once(1000).chain(1..=400).collect();
        assert_eq!(ids, want);
        assert_eq!(c.commits.len(), 2);
        let prepared: Vec<&ChangeEvent> = c.out.iter().flatten().skip(1).map(|e| &**e).collect();
        assert!(prepared
            .iter()
            .all(|e| e.commit_lsn == prepared[0].commit_lsn));
        assert!(prepared[0].commit_lsn > c.out[0].as_ref().unwrap().commit_lsn);
    }
}
