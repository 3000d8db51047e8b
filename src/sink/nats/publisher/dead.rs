//! The publisher's outbox events and dead letters: routing an outbox event into the window,
//! and turning a message that cannot be stored as it is into its dead letter, in place.

use std::sync::atomic::Ordering;

use async_nats::Subject;
use bytes::Bytes;

use crate::config::OnOversize;
use crate::sink::driver::Ticket;
use crate::wire::names::SOURCE_HEADER;
use crate::wire::outbox::{DeadReason, OutboxEvent};

use super::entry::{Extra, InFlight, Lane};
use super::{AckState, Failure, PublishError, Publisher};

impl Publisher {
    /// Routes an outbox event: to its subject, or, when it cannot go there as it is, as a
    /// dead letter.
    pub(super) async fn publish_outbox(
        &mut self,
        ev: &OutboxEvent,
    ) -> Result<Ticket, PublishError> {
        let routed = crate::outbox::route(ev, self.ids.prefix());
        let subject = match routed.dead {
            // Written as it would have been, for the dead letter's source header.
            Some(_) => ev.intended_subject(),
            None => ev.subject(),
        };
        let token = self.next_token;
        self.next_token += 1;
        let mut entry = InFlight {
            token,
            subject: Subject::from(subject),
            reply: self.replies.subject(token),
            batch: 0,
            batch_seq: 0,
            commit_lsn: ev.commit_lsn,
            timeline: ev.timeline,
            seq: ev.seq,
            last_in_tx: false,
            lane: Lane::Outbox,
            extra: Some(Box::new(Extra {
                id: routed.id,
                headers: routed.headers,
                dlq_subject: Some(ev.dlq_subject()),
            })),
            payload: Bytes::copy_from_slice(&ev.payload),
            state: AckState::Pending,
        };
        if let Some((reason, detail)) = routed.dead {
            self.dead_letter(&mut entry, reason, &detail);
        }
        self.publish_entry(entry).await
    }

    /// Turns `entry` into its dead letter (see [`InFlight::make_dead_letter`]) and counts it.
    pub(super) fn dead_letter(&mut self, entry: &mut InFlight, reason: DeadReason, detail: &str) {
        let max = crate::sink::nats::max_payload(&self.client);
        entry.make_dead_letter(
            self.ids.prefix(),
            &self.settings.subject_prefix,
            reason,
            detail,
            max,
        );
        self.stats.dead_letters[reason.index()].fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "sent {} ({}) to the dead-letter stream on {}: {detail}",
            entry
                .extra
                .as_ref()
                .and_then(|x| x.headers.iter().find(|(k, _)| *k == SOURCE_HEADER))
                .map_or("", |(_, v)| v.as_str()),
            reason.as_str(),
            entry.subject
        );
    }

    /// True when `entry` goes to the dead-letter stream rather than stop the bridge when it
    /// cannot be stored as it is.
    pub(super) fn may_dead_letter(&self, entry: &InFlight) -> bool {
        self.lane_may_dead_letter(entry.lane)
    }

    pub(super) fn lane_may_dead_letter(&self, lane: Lane) -> bool {
        match lane {
            Lane::Outbox => true,
            Lane::Cdc => self.settings.on_oversize == OnOversize::Dlq,
            Lane::Dlq => false,
        }
    }

    /// The message at `at` of the window was refused for good: it becomes its dead letter,
    /// to be sent again at once in its place.
    pub(super) fn dead_letter_at(&mut self, at: usize, detail: &str) {
        let Some(mut entry) = self.window.remove(at) else {
            return;
        };
        let before = entry.payload.len() as u64;
        self.dead_letter(&mut entry, DeadReason::Refused, detail);
        self.window_bytes = self.window_bytes - before + entry.payload.len() as u64;
        entry.state = AckState::failed(Failure::DeadLettered);
        self.rerouted = true;
        self.window.insert(at, entry);
    }
}
