//! A message of the publisher's window: what it is sent with, and how it becomes a dead letter.
//!
//! A change event is sent to the CDC stream with an id built from its position, an outbox
//! event to the OUTBOX stream with the id and headers its routing gave it, a dead letter to
//! the DLQ stream. A message that cannot be stored as it is (too large, refused for good) is
//! turned into its dead letter in place: same ticket, same id, so the window's order and the
//! durable position stay as they were.

use async_nats::header::{NATS_EXPECTED_LAST_MESSAGE_ID, NATS_MESSAGE_ID};

use async_nats::{Client, HeaderMap, HeaderName, Subject};
use bytes::Bytes;

use crate::pg::Lsn;
use crate::wire::id::{self, MessageIds};
use crate::wire::names::{
    ERROR_DETAIL_HEADER, ERROR_HEADER, LAST_IN_TX_HEADER, LAST_IN_TX_VALUE, SOURCE_HEADER,
    TRUNCATED_HEADER,
};
use crate::wire::outbox::{change_dlq_subject, DeadReason};

use super::AckState;

/// [`LAST_IN_TX_HEADER`] as the client's header name, made once: from a `&str`, the client
/// checks and looks up the name again for every message.
const LAST_IN_TX: HeaderName = HeaderName::from_static(LAST_IN_TX_HEADER);

/// The stream a message goes to. CDC and OUTBOX messages each follow the previous one of
/// their own stream (`Nats-Expected-Last-Msg-Id`); dead letters are not chained: the DLQ is
/// for inspection and replay, its order is not a contract, and without the header a dead
/// letter's size is known exactly when its body is cut to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// The CDC stream.
    Cdc = 0,
    /// The OUTBOX stream.
    Outbox = 1,
    /// The DLQ stream.
    Dlq = 2,
}

/// Lanes whose messages are chained.
pub(super) const CHAINED: usize = 2;

impl Lane {
    /// The index of a chained lane's last id, `None` for the DLQ.
    pub(super) fn chain(self) -> Option<usize> {
        match self {
            Lane::Cdc => Some(0),
            Lane::Outbox => Some(1),
            Lane::Dlq => None,
        }
    }
}

/// What an outbox event or a dead letter carries beyond a change event.
pub(super) struct Extra {
    /// The message id.
    pub(super) id: String,
    /// Headers besides the message id.
    pub(super) headers: Vec<(&'static str, String)>,
    /// Where its dead letter would go (`None`: a change event's, from its subject).
    pub(super) dlq_subject: Option<String>,
}

/// A message of the window, kept until JetStream acknowledges it.
pub(super) struct InFlight {
    /// Publish ordinal, the last token of the reply subject.
    pub(super) token: u64,
    pub(super) subject: Subject,
    pub(super) reply: Subject,
    /// The fast-ingest batch it was sent in (0: sent plainly, with a PubAck of its own) ...
    pub(super) batch: u64,
    /// ... and its place in that batch, from 1.
    pub(super) batch_seq: u64,
    /// With `timeline` and `seq`, a change's message id (built again only when needed:
    /// resends, errors).
    pub(super) commit_lsn: Lsn,
    pub(super) timeline: u32,
    pub(super) seq: u32,
    /// Sent with the [`LAST_IN_TX_HEADER`] header.
    pub(super) last_in_tx: bool,
    pub(super) lane: Lane,
    /// Set for outbox events and dead letters; boxed so change events pay one pointer.
    pub(super) extra: Option<Box<Extra>>,
    pub(super) payload: Bytes,
    pub(super) state: AckState,
}

impl InFlight {
    pub(super) fn message_id(&self, prefix: &str) -> String {
        match &self.extra {
            Some(extra) => extra.id.clone(),
            None => id::message_id(prefix, self.timeline, self.commit_lsn, self.seq),
        }
    }

    /// [`InFlight::message_id`] through `ids`, which writes a transaction's shared part once:
    /// for the publish path, where changes come in order.
    pub(super) fn message_id_from(&self, ids: &mut MessageIds) -> String {
        match &self.extra {
            Some(extra) => extra.id.clone(),
            None => ids.id(self.timeline, self.commit_lsn, self.seq),
        }
    }

    /// Turns this message into its dead letter, in place: to `dlq.…`, with its headers plus
    /// the reason and where it was meant to go, and as much of its body as fits in
    /// `max_payload` with the headers.
    pub(super) fn make_dead_letter(
        &mut self,
        id_prefix: &str,
        cdc_prefix: &str,
        reason: DeadReason,
        detail: &str,
        max_payload: usize,
    ) {
        let id = self.message_id(id_prefix);
        let (mut headers, dlq) = match self.extra.take() {
            Some(extra) => {
                let dlq = extra.dlq_subject.unwrap_or_default();
                (extra.headers, dlq)
            }
            None => {
                let mut headers = Vec::with_capacity(4);
                if self.last_in_tx {
                    headers.push((LAST_IN_TX_HEADER, LAST_IN_TX_VALUE.to_owned()));
                }
                (
                    headers,
                    change_dlq_subject(cdc_prefix, self.subject.as_str()),
                )
            }
        };
        headers.push((ERROR_HEADER, reason.as_str().to_owned()));
        headers.push((ERROR_DETAIL_HEADER, detail.replace(['\r', '\n'], " ")));
        headers.push((SOURCE_HEADER, self.subject.to_string()));
        let size = self.payload.len();
        if header_bytes(&id, &headers) + size > max_payload {
            headers.push((TRUNCATED_HEADER, size.to_string()));
            let keep = max_payload.saturating_sub(header_bytes(&id, &headers));
            self.payload = self.payload.slice(..keep.min(size));
        }
        self.subject = Subject::from(dlq);
        self.last_in_tx = false;
        self.lane = Lane::Dlq;
        self.extra = Some(Box::new(Extra {
            id,
            headers,
            dlq_subject: None,
        }));
    }
}

/// The size of a header block holding the message id and `headers`, as the client writes it:
/// `NATS/1.0\r\n`, a `name: value\r\n` line each, and `\r\n`.
fn header_bytes(id: &str, headers: &[(&'static str, String)]) -> usize {
    let line = |k: &str, v: &str| k.len() + 2 + v.len() + 2;
    10 + 2 + line("Nats-Msg-Id", id) + headers.iter().map(|(k, v)| line(k, v)).sum::<usize>()
}

/// Publishes one message of the window with its message id `id`, its reply subject and, when
/// `expect` is given, the id of the message that must be the last one in the stream before it.
/// The header map is built for each send: the client takes it by value, and cloning one costs
/// as much as building it.
pub(super) async fn send(
    client: &Client,
    entry: &InFlight,
    id: String,
    expect: Option<String>,
) -> Result<(), async_nats::PublishError> {
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_ID, id);
    if let Some(expect) = expect {
        headers.insert(NATS_EXPECTED_LAST_MESSAGE_ID, expect);
    }
    if entry.last_in_tx {
        headers.insert(LAST_IN_TX, LAST_IN_TX_VALUE);
    }
    if let Some(extra) = &entry.extra {
        for (k, v) in &extra.headers {
            headers.insert(*k, v.as_str());
        }
    }
    client
        .publish_with_reply_and_headers(
            entry.subject.clone(),
            entry.reply.clone(),
            headers,
            entry.payload.clone(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(payload: &'static [u8]) -> InFlight {
        InFlight {
            token: 0,
            subject: Subject::from("cdc.users.insert"),
            reply: Subject::from("_INBOX.x.0"),
            batch: 0,
            batch_seq: 0,
            commit_lsn: Lsn(0x100),
            timeline: 1,
            seq: 2,
            last_in_tx: true,
            lane: Lane::Cdc,
            extra: None,
            payload: Bytes::from_static(payload),
            state: AckState::Pending,
        }
    }

    #[test]
    fn a_dead_letter_keeps_id_and_headers_and_fits_the_limit() {
        let mut e = entry(&[b'x'; 1000]);
        e.make_dead_letter("ns:", "cdc", DeadReason::TooLarge, "too\nbig", 600);
        assert_eq!(e.subject.as_str(), "dlq.cdc.users");
        assert_eq!(e.lane, Lane::Dlq);
        assert!(!e.last_in_tx);
        let extra = e.extra.as_ref().unwrap();
        assert_eq!(extra.id, "ns:1:0/100-2");
        let headers: Vec<(&str, &str)> = extra
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        assert_eq!(
            headers,
            [
                (LAST_IN_TX_HEADER, "true"),
                (ERROR_HEADER, "too_large"),
                (ERROR_DETAIL_HEADER, "too big"),
                (SOURCE_HEADER, "cdc.users.insert"),
                (TRUNCATED_HEADER, "1000"),
            ]
        );
        // Exactly the limit, counted as the client writes the header block.
        let mut block = format!("NATS/1.0\r\n{}: {}\r\n", NATS_MESSAGE_ID, extra.id);
        for (k, v) in &extra.headers {
            block.push_str(&format!("{k}: {v}\r\n"));
        }
        block.push_str("\r\n");
        assert_eq!(header_bytes(&extra.id, &extra.headers), block.len());
        assert_eq!(block.len() + e.payload.len(), 600);
        // A body that fits stays whole.
        let mut small = entry(b"abc");
        small.make_dead_letter("ns:", "cdc", DeadReason::Refused, "no", 600);
        assert_eq!(&small.payload[..], b"abc");
        // Headers alone over the limit: no body at all.
        let mut none = entry(b"abc");
        none.make_dead_letter("ns:", "cdc", DeadReason::Refused, "no", 10);
        assert!(none.payload.is_empty());
    }
}
