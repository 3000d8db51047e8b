//! Outbox events: an outbox table's insert or a `pg_logical_emit_message` with an `outbox.`
//! prefix, as the pipeline hands it to the sink, and the names of where it and its dead
//! letter go.
//!
//! # Subjects
//!
//! | what                              | subject                                     |
//! |-----------------------------------|---------------------------------------------|
//! | event                             | `outbox.{aggregate_type}.{event_type}`      |
//! | dead letter of an outbox table    | `dlq.outbox.{table}`                        |
//! | dead letter of an emitted message | `dlq.outbox.=messages`                      |
//! | dead letter of a change event     | `dlq.cdc.{table}`                           |
//!
//! An outbox table's routing values are encoded into one token each, like table names
//! ([`super::subject`]): `a.b` becomes `a%2Eb`. An emitted message's prefix is the subject
//! as written.

use std::sync::Arc;

use super::event::TableRef;
use super::names::{DLQ_SUBJECT_PREFIX, OUTBOX_SUBJECT_PREFIX};
use super::subject::{push_name_token, push_table_token};
use crate::pg::Lsn;

/// The last token of the dead letters of emitted messages. Table tokens are made of
/// `A-Z a-z 0-9 _ - %` only (every other byte is written `%XX`), so a token holding `=` can
/// never be a table's, and `dlq.outbox.=messages` never collides with `dlq.outbox.{table}`.
pub const MESSAGES_DLQ_TOKEN: &str = "=messages";

/// Where an outbox event comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum OutboxOrigin {
    /// An insert into this outbox table.
    Table(Arc<TableRef>),
    /// A transactional `pg_logical_emit_message` with this prefix (`outbox.…`).
    Message {
        /// The prefix as written.
        prefix: String,
    },
}

/// One outbox event, committed, owned and self-contained.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEvent {
    /// The table or the emitted message.
    pub origin: OutboxOrigin,
    /// The row's id as text (`None`: NULL, or an emitted message, whose id comes from its
    /// position).
    pub id: Option<String>,
    /// Aggregate type (`None`: NULL).
    pub aggregate_type: Option<String>,
    /// Aggregate id (`None`: NULL or no such column).
    pub aggregate_id: Option<String>,
    /// Event type (`None`: NULL).
    pub event_type: Option<String>,
    /// The payload's text exactly as PostgreSQL sent it (empty for NULL).
    pub payload: Vec<u8>,
    /// Start of the transaction's commit record.
    pub commit_lsn: Lsn,
    /// The timeline `commit_lsn` was written on.
    pub timeline: u32,
    /// Ordinal inside the transaction, counted with the changes.
    pub seq: u32,
    /// Commit time, µs since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// Why an event became a dead letter; the `Pgbridge-Error` header and the metric's label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadReason {
    /// An empty or NULL aggregate type, event type or id.
    EmptyRoutingValue,
    /// An emitted message's prefix is not a valid subject.
    InvalidSubject,
    /// Body and headers are larger than the server's `max_payload`.
    TooLarge,
    /// The server refused the message in a way no retry changes.
    Refused,
}

impl DeadReason {
    /// Every reason, in the order of [`DeadReason::index`].
    pub const ALL: [DeadReason; 4] = [
        DeadReason::EmptyRoutingValue,
        DeadReason::InvalidSubject,
        DeadReason::TooLarge,
        DeadReason::Refused,
    ];

    /// `empty_routing_value`, `invalid_subject`, `too_large`, `refused`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::EmptyRoutingValue => "empty_routing_value",
            DeadReason::InvalidSubject => "invalid_subject",
            DeadReason::TooLarge => "too_large",
            DeadReason::Refused => "refused",
        }
    }

    /// Position in [`DeadReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl OutboxEvent {
    /// The subject the event is meant for, written as it is without encoding: what
    /// `Pgbridge-Source` shows (`outbox..OrderPlaced`, `outbox.a b.c`).
    pub fn intended_subject(&self) -> String {
        match &self.origin {
            OutboxOrigin::Message { prefix } => prefix.clone(),
            OutboxOrigin::Table(_) => format!(
                "{OUTBOX_SUBJECT_PREFIX}.{}.{}",
                self.aggregate_type.as_deref().unwrap_or(""),
                self.event_type.as_deref().unwrap_or("")
            ),
        }
    }

    /// The subject of the event: an outbox table's routing values each encoded into one
    /// token, an emitted message's prefix as written. Only meaningful once the routing values
    /// are checked.
    pub fn subject(&self) -> String {
        match &self.origin {
            OutboxOrigin::Message { prefix } => prefix.clone(),
            OutboxOrigin::Table(_) => {
                let (a, e) = (
                    self.aggregate_type.as_deref().unwrap_or(""),
                    self.event_type.as_deref().unwrap_or(""),
                );
                let mut s =
                    String::with_capacity(OUTBOX_SUBJECT_PREFIX.len() + a.len() + e.len() + 2);
                s.push_str(OUTBOX_SUBJECT_PREFIX);
                s.push('.');
                push_name_token(&mut s, a);
                s.push('.');
                push_name_token(&mut s, e);
                s
            }
        }
    }

    /// The subject of the event's dead letter: `dlq.outbox.{table}`, or
    /// `dlq.outbox.=messages` for an emitted message.
    pub fn dlq_subject(&self) -> String {
        let mut s = format!("{DLQ_SUBJECT_PREFIX}.{OUTBOX_SUBJECT_PREFIX}.");
        match &self.origin {
            OutboxOrigin::Table(t) => push_table_token(&mut s, &t.schema, &t.table),
            OutboxOrigin::Message { .. } => s.push_str(MESSAGES_DLQ_TOKEN),
        }
        s
    }
}

/// The subject of a change event's dead letter: `dlq.cdc.{table}` for the change subject
/// `cdc.{table}.{op}` (`cdc_prefix` is the change subjects' prefix).
pub fn change_dlq_subject(cdc_prefix: &str, change_subject: &str) -> String {
    let table = change_subject
        .strip_prefix(cdc_prefix)
        .and_then(|s| s.strip_prefix('.'))
        .and_then(|s| s.rsplit_once('.'))
        .map_or(change_subject, |(table, _op)| table);
    format!("{DLQ_SUBJECT_PREFIX}.{cdc_prefix}.{table}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(origin: OutboxOrigin, agg: Option<&str>, ev: Option<&str>) -> OutboxEvent {
        OutboxEvent {
            origin,
            id: Some("1".into()),
            aggregate_type: agg.map(Into::into),
            aggregate_id: None,
            event_type: ev.map(Into::into),
            payload: Vec::new(),
            commit_lsn: Lsn(1),
            timeline: 1,
            seq: 0,
            commit_time: 0,
        }
    }

    fn table(schema: &str, name: &str) -> OutboxOrigin {
        OutboxOrigin::Table(Arc::new(TableRef {
            schema: Arc::from(schema),
            table: Arc::from(name),
            relation_id: 1,
            columns: Vec::new(),
            key_columns: Vec::new(),
        }))
    }

    #[test]
    fn routing_values_are_encoded_like_table_names() {
        let e = event(table("public", "outbox"), Some("a.b c*>"), Some("Placed"));
        assert_eq!(e.subject(), "outbox.a%2Eb%20c%2A%3E.Placed");
        assert_eq!(e.intended_subject(), "outbox.a.b c*>.Placed");
        assert_eq!(e.dlq_subject(), "dlq.outbox.outbox");
        let e = event(table("sales", "out box"), None, Some("OrderPlaced"));
        assert_eq!(e.intended_subject(), "outbox..OrderPlaced");
        assert_eq!(e.dlq_subject(), "dlq.outbox.sales.out%20box");
    }

    #[test]
    fn emitted_messages_keep_their_prefix_and_a_dlq_subject_no_table_has() {
        let e = event(
            OutboxOrigin::Message {
                prefix: "outbox.a b.c".into(),
            },
            None,
            None,
        );
        assert_eq!(e.subject(), "outbox.a b.c");
        assert_eq!(e.intended_subject(), "outbox.a b.c");
        assert_eq!(e.dlq_subject(), "dlq.outbox.=messages");
        // No table name encodes to the messages token.
        for name in ["=messages", "%3Dmessages", "messages"] {
            let mut t = String::new();
            push_name_token(&mut t, name);
            assert_ne!(t, MESSAGES_DLQ_TOKEN, "{name}");
        }
    }

    #[test]
    fn change_dead_letters_keep_the_table_token() {
        assert_eq!(
            change_dlq_subject("cdc", "cdc.users.insert"),
            "dlq.cdc.users"
        );
        assert_eq!(
            change_dlq_subject("cdc", "cdc.sales.in%2Evoices.update"),
            "dlq.cdc.sales.in%2Evoices"
        );
    }
}
