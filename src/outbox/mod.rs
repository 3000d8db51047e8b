//! Routing of outbox events, the same for every broker: whether an event can be delivered as
//! it is or becomes a dead letter (and why), its message id, and its headers. A broker only
//! turns the result into its own destination (a NATS subject, a Kafka topic).
//!
//! The id is the row's `id` (the application's idempotency key), or for an emitted message
//! one derived from its position (`{namespace}:{timeline}:{commit_lsn}-{seq}`, the form of
//! change ids), so a replay after a crash carries the same id and is stored once.

mod table;

pub use table::{message_event, MissingColumn, OutboxColumns, OutboxTables, Position};

use crate::wire::id;
use crate::wire::names::{
    AGGREGATE_ID_HEADER, COMMIT_LSN_HEADER, EVENT_TYPE_HEADER, OUTBOX_SUBJECT_PREFIX,
};
use crate::wire::outbox::{DeadReason, OutboxEvent, OutboxOrigin};

/// What [`route`] decided for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The message id.
    pub id: String,
    /// Headers besides the message id, in this order.
    pub headers: Vec<(&'static str, String)>,
    /// Set when the event cannot be delivered as it is: the reason and the words for it.
    pub dead: Option<(DeadReason, String)>,
}

/// Routes `ev`; `id_prefix` is [`id::id_prefix`] of the bridge's id namespace.
pub fn route(ev: &OutboxEvent, id_prefix: &str) -> Routed {
    let position_id = || id::message_id(id_prefix, ev.timeline, ev.commit_lsn, ev.seq);
    let (id, dead) = match &ev.origin {
        OutboxOrigin::Table(_) => {
            let dead = empty("aggregate type", ev.aggregate_type.as_deref())
                .or_else(|| empty("event type", ev.event_type.as_deref()))
                .or_else(|| empty("id", ev.id.as_deref()))
                .map(|detail| (DeadReason::EmptyRoutingValue, detail));
            match ev.id.as_deref() {
                Some(id) if !id.is_empty() => (header_value(id), dead),
                _ => (position_id(), dead),
            }
        }
        OutboxOrigin::Message { prefix } => (
            position_id(),
            check_prefix(prefix).map(|detail| (DeadReason::InvalidSubject, detail)),
        ),
    };
    let mut headers = Vec::with_capacity(3);
    if let Some(a) = &ev.aggregate_id {
        headers.push((AGGREGATE_ID_HEADER, header_value(a)));
    }
    if let Some(e) = &ev.event_type {
        headers.push((EVENT_TYPE_HEADER, header_value(e)));
    }
    headers.push((COMMIT_LSN_HEADER, ev.commit_lsn.to_string()));
    Routed { id, headers, dead }
}

/// The routing values an emitted message's prefix carries: `outbox.{aggregate_type}.{event
/// type}`, the event type being everything after the aggregate type. `None` when the prefix
/// is not an outbox one (such messages are not routed).
pub fn message_routing(prefix: &str) -> Option<(Option<String>, Option<String>)> {
    let rest = prefix
        .strip_prefix(OUTBOX_SUBJECT_PREFIX)?
        .strip_prefix('.')?;
    Some(match rest.split_once('.') {
        Some((a, e)) => (Some(a.to_owned()), Some(e.to_owned())),
        None => (Some(rest.to_owned()), None),
    })
}

/// Why an emitted message's prefix is not a subject to publish to, if it is not: an empty
/// token, white space or a control character, or a wildcard token.
fn check_prefix(prefix: &str) -> Option<String> {
    for token in prefix.split('.') {
        if token.is_empty() {
            return Some(format!("the prefix {prefix:?} has an empty subject token"));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Some(format!(
                "the prefix {prefix:?} contains white space or a control character"
            ));
        }
        if token == "*" || token == ">" {
            return Some(format!("the prefix {prefix:?} contains a wildcard token"));
        }
    }
    None
}

fn empty(what: &str, value: Option<&str>) -> Option<String> {
    match value {
        None => Some(format!("the {what} is NULL")),
        Some("") => Some(format!("the {what} is empty")),
        Some(_) => None,
    }
}

/// A header value cannot hold a line break: those become spaces.
fn header_value(v: &str) -> String {
    if v.contains(['\r', '\n']) {
        v.replace(['\r', '\n'], " ")
    } else {
        v.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pg::Lsn;
    use crate::wire::event::TableRef;

    fn row(id: Option<&str>, agg: Option<&str>, ev: Option<&str>) -> OutboxEvent {
        OutboxEvent {
            origin: OutboxOrigin::Table(Arc::new(TableRef {
                schema: Arc::from("public"),
                table: Arc::from("outbox"),
                relation_id: 1,
                columns: Vec::new(),
                key_columns: Vec::new(),
            })),
            id: id.map(Into::into),
            aggregate_type: agg.map(Into::into),
            aggregate_id: Some("o-1".into()),
            event_type: ev.map(Into::into),
            payload: b"{}".to_vec(),
            commit_lsn: Lsn(0x25CB5E8),
            timeline: 1,
            seq: 3,
            commit_time: 0,
        }
    }

    #[test]
    fn a_row_is_routed_by_its_values_and_keeps_its_id() {
        let r = route(&row(Some("e-1"), Some("order"), Some("OrderPlaced")), "ns:");
        assert_eq!(r.id, "e-1");
        assert_eq!(r.dead, None);
        assert_eq!(
            r.headers,
            [
                (AGGREGATE_ID_HEADER, "o-1".to_owned()),
                (EVENT_TYPE_HEADER, "OrderPlaced".to_owned()),
                (COMMIT_LSN_HEADER, "0/25CB5E8".to_owned()),
            ]
        );
        // Dots, spaces and wildcards are encoded into the subject, not dead letters.
        assert_eq!(
            route(&row(Some("e"), Some("a b.*"), Some(">")), "ns:").dead,
            None
        );
    }

    #[test]
    fn empty_or_null_routing_values_are_dead_letters() {
        for (ev, detail) in [
            (
                row(Some("e"), Some(""), Some("X")),
                "the aggregate type is empty",
            ),
            (
                row(Some("e"), None, Some("X")),
                "the aggregate type is NULL",
            ),
            (
                row(Some("e"), Some("a"), Some("")),
                "the event type is empty",
            ),
            (row(None, Some("a"), Some("X")), "the id is NULL"),
        ] {
            let r = route(&ev, "ns:");
            assert_eq!(
                r.dead,
                Some((DeadReason::EmptyRoutingValue, detail.to_owned()))
            );
        }
        // Without an id of its own, the position gives one that a replay repeats.
        assert_eq!(
            route(&row(None, Some("a"), Some("X")), "ns:").id,
            "ns:1:0/25CB5E8-3"
        );
    }

    #[test]
    fn emitted_messages_are_routed_by_their_prefix() {
        assert_eq!(message_routing("cdc.x"), None);
        assert_eq!(message_routing("outboxx.a.b"), None);
        assert_eq!(
            message_routing("outbox.order.Order.Placed"),
            Some((Some("order".into()), Some("Order.Placed".into())))
        );
        for (prefix, dead) in [
            ("outbox.order.Placed", false),
            ("outbox.order", false),
            ("outbox..Placed", true),
            ("outbox.", true),
            ("outbox.a b.c", true),
            ("outbox.a.*", true),
            ("outbox.a.>", true),
        ] {
            let mut ev = row(None, None, None);
            ev.origin = OutboxOrigin::Message {
                prefix: prefix.into(),
            };
            let r = route(&ev, "ns:");
            assert_eq!(r.dead.is_some(), dead, "{prefix}");
            if dead {
                assert_eq!(r.dead.unwrap().0, DeadReason::InvalidSubject);
            }
            assert_eq!(r.id, "ns:1:0/25CB5E8-3");
        }
    }

    #[test]
    fn line_breaks_never_reach_a_header() {
        let mut ev = row(Some("a\r\nb"), Some("a"), Some("X"));
        ev.aggregate_id = Some("x\ny".into());
        let r = route(&ev, "ns:");
        assert_eq!(r.id, "a  b");
        assert_eq!(r.headers[0].1, "x y");
    }
}
