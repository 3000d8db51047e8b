//! Outbox tables: which published tables are outboxes, where their columns are, and an
//! inserted row turned into an [`OutboxEvent`].

use std::collections::HashSet;
use std::sync::Arc;

use crate::config::OutboxConfig;
use crate::pg::pgoutput::{Cell, Column, TupleData};
use crate::pg::Lsn;
use crate::wire::event::TableRef;
use crate::wire::outbox::{OutboxEvent, OutboxOrigin};

/// An outbox table lacks a column the bridge reads.
#[derive(Debug, thiserror::Error)]
#[error("outbox table {table} has no published column '{column}' (the {what}); add it, publish it, or map another column with --outbox-{flag}-column")]
pub struct MissingColumn {
    /// `schema.table`.
    pub table: String,
    /// The column looked for.
    pub column: String,
    /// What it holds.
    pub what: &'static str,
    /// The flag that names it.
    pub flag: &'static str,
}

/// The outbox tables of a configuration and their column names.
#[derive(Debug, Clone, Default)]
pub struct OutboxTables {
    tables: HashSet<String>,
    id: String,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: String,
}

/// Where an outbox table's columns are in its tuples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxColumns {
    id: usize,
    aggregate_type: usize,
    aggregate_id: Option<usize>,
    event_type: usize,
    payload: usize,
}

/// Where an event stands in the WAL: its transaction and its ordinal there.
#[derive(Debug, Clone, Copy)]
pub struct Position {
    /// Start of the transaction's commit record.
    pub commit_lsn: Lsn,
    /// The timeline `commit_lsn` was written on.
    pub timeline: u32,
    /// Ordinal inside the transaction.
    pub seq: u32,
    /// Commit time, µs since 2000-01-01 UTC.
    pub commit_time: i64,
}

impl OutboxTables {
    /// The outbox tables of `config`.
    pub fn new(config: &OutboxConfig) -> Self {
        OutboxTables {
            tables: config.qualified_tables().into_iter().collect(),
            id: config.id_column.clone(),
            aggregate_type: config.aggregate_type_column.clone(),
            aggregate_id: config.aggregate_id_column.clone(),
            event_type: config.event_type_column.clone(),
            payload: config.payload_column.clone(),
        }
    }

    /// True when `qualified` (`schema.table`) is an outbox table.
    pub fn contains(&self, qualified: &str) -> bool {
        self.tables.contains(qualified)
    }

    /// For an outbox table, where its columns are among `columns` (a Relation message's);
    /// `None` for any other table.
    pub fn columns(
        &self,
        qualified: &str,
        columns: &[Column<'_>],
    ) -> Result<Option<OutboxColumns>, MissingColumn> {
        if !self.contains(qualified) {
            return Ok(None);
        }
        let find = |name: &str| columns.iter().position(|c| c.name == name);
        let need = |name: &str, what: &'static str, flag: &'static str| {
            find(name).ok_or_else(|| MissingColumn {
                table: qualified.to_owned(),
                column: name.to_owned(),
                what,
                flag,
            })
        };
        Ok(Some(OutboxColumns {
            id: need(&self.id, "event id", "id")?,
            aggregate_type: need(&self.aggregate_type, "aggregate type", "aggregate-type")?,
            aggregate_id: find(&self.aggregate_id),
            event_type: need(&self.event_type, "event type", "event-type")?,
            payload: need(&self.payload, "payload", "payload")?,
        }))
    }
}

impl OutboxColumns {
    /// The event an inserted `row` of `table` stands for.
    pub fn event(&self, table: &Arc<TableRef>, row: &TupleData<'_>, at: Position) -> OutboxEvent {
        let text = |i: usize| match row.get(i) {
            Some(Cell::Text(b) | Cell::Binary(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        };
        let payload = match row.get(self.payload) {
            Some(Cell::Text(b) | Cell::Binary(b)) => b.to_vec(),
            _ => Vec::new(),
        };
        OutboxEvent {
            origin: OutboxOrigin::Table(Arc::clone(table)),
            id: text(self.id),
            aggregate_type: text(self.aggregate_type),
            aggregate_id: self.aggregate_id.and_then(text),
            event_type: text(self.event_type),
            payload,
            commit_lsn: at.commit_lsn,
            timeline: at.timeline,
            seq: at.seq,
            commit_time: at.commit_time,
        }
    }
}

/// The event a transactional `pg_logical_emit_message` with an outbox `prefix` stands for;
/// `None` for any other prefix.
pub fn message_event(prefix: &str, content: &[u8], at: Position) -> Option<OutboxEvent> {
    let (aggregate_type, event_type) = super::message_routing(prefix)?;
    Some(OutboxEvent {
        origin: OutboxOrigin::Message {
            prefix: prefix.to_owned(),
        },
        id: None,
        aggregate_type,
        aggregate_id: None,
        event_type,
        payload: content.to_vec(),
        commit_lsn: at.commit_lsn,
        timeline: at.timeline,
        seq: at.seq,
        commit_time: at.commit_time,
    })
}
