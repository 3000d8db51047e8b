//! Outbox events and dead letters on Kafka: an event routed by [`crate::outbox::route`] becomes
//! a record on `outbox.{aggregate_type}`, or, when it cannot be delivered as it is, a dead
//! letter on the `dlq` topic (see [`crate::wire::kafka`]). A record refused as too large
//! becomes its dead letter in place, keeping its ticket, so the window's order and the
//! durable position stay as they were.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::config::OnOversize;
use crate::sink::kafka::KafkaSinkError;
use crate::wire::kafka::{header_name, outbox_topic, DLQ_TOPIC, MAX_TOPIC_LEN};
use crate::wire::names::{ERROR_DETAIL_HEADER, ERROR_HEADER, SOURCE_HEADER, TRUNCATED_HEADER};
use crate::wire::outbox::{DeadReason, OutboxEvent, OutboxOrigin};

use super::{KafkaDelivery, Lane, Record};

impl KafkaDelivery {
    /// The record of an outbox event, or its dead letter, and what to call its origin in
    /// errors.
    pub(super) async fn outbox_record(
        &mut self,
        ev: &OutboxEvent,
    ) -> Result<(String, Record), KafkaSinkError> {
        let routed = crate::outbox::route(ev, self.ids.prefix());
        let name = outbox_topic(ev.aggregate_type.as_deref().unwrap_or(""));
        let dead = routed.dead.or_else(|| {
            (name.len() > MAX_TOPIC_LEN).then(|| {
                (
                    DeadReason::InvalidSubject,
                    format!(
                        "the topic {name} is longer than the {MAX_TOPIC_LEN} characters Kafka allows"
                    ),
                )
            })
        });
        let topic = match dead {
            Some(_) => Arc::from(name),
            None => self.topic_named(Arc::from(name)).await?.0,
        };
        let mut record = Record {
            topic,
            partition: None,
            key: ev
                .aggregate_id
                .as_ref()
                .map(|a| Bytes::copy_from_slice(a.as_bytes())),
            value: Some(Bytes::copy_from_slice(&ev.payload)),
            id: Arc::from(routed.id),
            op: None,
            headers: routed
                .headers
                .into_iter()
                .map(|(k, v)| (header_name(k), v))
                .collect(),
            lane: Lane::Outbox,
            done: false,
        };
        if let Some((reason, detail)) = dead {
            let (dlq, _) = self.topic_named(Arc::from(DLQ_TOPIC)).await?;
            self.dead_letter(&mut record, reason, &detail, dlq);
        }
        let origin = match &ev.origin {
            OutboxOrigin::Table(t) => format!("outbox table {}.{}", t.schema, t.table),
            OutboxOrigin::Message { prefix } => format!("emitted message {prefix}"),
        };
        Ok((origin, record))
    }

    /// Turns `r` into its dead letter on `dlq` and counts it.
    fn dead_letter(&self, r: &mut Record, reason: DeadReason, detail: &str, dlq: Arc<str>) {
        make_dead_letter(r, reason, detail, dlq);
        self.settings.stats.dead_letters[reason.index()].fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "sent record {} ({}) to Kafka topic {DLQ_TOPIC}: {detail}",
            r.id,
            reason.as_str()
        );
    }

    /// Record `index` of the entry at `at` is larger than Kafka accepts: a dead letter when
    /// its lane allows (always for outbox events, for changes with `--on-oversize dlq`),
    /// made by [`Self::reroute`]; otherwise delivery stops.
    pub(super) fn refused_as_too_large(&mut self, at: usize, index: usize, reason: &str) {
        let entry = &self.window[at];
        let may = match entry.records[index].lane {
            Lane::Outbox => true,
            Lane::Change => self.settings.on_oversize == OnOversize::Dlq,
            Lane::Dead => false,
        };
        if may {
            self.oversize
                .push((entry.ticket, index as u32, reason.to_owned()));
        } else if self.fatal.is_none() {
            self.fatal = Some(self.too_large(at, index, reason));
        }
    }

    /// Makes the dead letters of the records refused as too large, and produces them.
    pub(super) async fn reroute(&mut self) -> Result<(), KafkaSinkError> {
        if self.oversize.is_empty() {
            return Ok(());
        }
        let (dlq, _) = self.topic_named(Arc::from(DLQ_TOPIC)).await?;
        for (ticket, index, reason) in std::mem::take(&mut self.oversize) {
            let Some(front) = self.window.front() else {
                break;
            };
            let Some(at) = ticket
                .checked_sub(front.ticket)
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&at| at < self.window.len())
            else {
                continue;
            };
            let mut r =
                std::mem::replace(&mut self.window[at].records[index as usize], placeholder());
            // Refused again while resending: already a dead letter.
            if r.lane != Lane::Dead {
                let detail = format!(
                    "{} bytes are more than Kafka accepts ({reason})",
                    r.value.as_ref().map_or(0, Bytes::len) + r.key.as_ref().map_or(0, Bytes::len)
                );
                self.dead_letter(&mut r, DeadReason::TooLarge, &detail, Arc::clone(&dlq));
            }
            let done = r.done;
            self.window[at].records[index as usize] = r;
            if !done && !self.recovering {
                self.produce(at, index as usize);
            }
        }
        Ok(())
    }
}

/// A stand-in while a record is taken out of the window.
fn placeholder() -> Record {
    Record {
        topic: Arc::from(""),
        partition: None,
        key: None,
        value: None,
        id: Arc::from(""),
        op: None,
        headers: Vec::new(),
        lane: Lane::Dead,
        done: true,
    }
}

/// Turns `r` into its dead letter, in place: to `dlq`, with its key, value and headers plus
/// the reason and the topic it was meant for; a too large one without its value.
fn make_dead_letter(r: &mut Record, reason: DeadReason, detail: &str, dlq: Arc<str>) {
    r.headers
        .push((header_name(ERROR_HEADER), reason.as_str().to_owned()));
    r.headers.push((
        header_name(ERROR_DETAIL_HEADER),
        detail.replace(['\r', '\n'], " "),
    ));
    r.headers
        .push((header_name(SOURCE_HEADER), r.topic.to_string()));
    if reason == DeadReason::TooLarge {
        let size = r.value.as_ref().map_or(0, Bytes::len);
        r.headers
            .push((header_name(TRUNCATED_HEADER), size.to_string()));
        r.value = Some(Bytes::new());
    }
    r.topic = dlq;
    r.partition = None;
    r.lane = Lane::Dead;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_too_large_record_becomes_a_dead_letter_without_its_value() {
        let mut r = placeholder();
        r.topic = Arc::from("cdc.users");
        r.key = Some(Bytes::from_static(b"{\"id\":1}"));
        r.value = Some(Bytes::from(vec![b'x'; 100]));
        r.op = Some("insert");
        r.lane = Lane::Change;
        r.done = false;
        make_dead_letter(
            &mut r,
            DeadReason::TooLarge,
            "too\nbig",
            Arc::from(DLQ_TOPIC),
        );
        assert_eq!(&*r.topic, "dlq");
        assert_eq!(r.lane, Lane::Dead);
        assert_eq!(r.value.as_deref(), Some(&b""[..]));
        assert_eq!(r.key.as_deref(), Some(&b"{\"id\":1}"[..]));
        assert_eq!(r.op, Some("insert"));
        let headers: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            headers,
            [
                ("pgbridge-error", "too_large"),
                ("pgbridge-error-detail", "too big"),
                ("pgbridge-source", "cdc.users"),
                ("pgbridge-truncated", "100"),
            ]
        );
    }
}
