//! Fast-ingest batches (nats-server 2.14 and later, on a stream with `allow_batched`): a run of
//! plain publishes whose reply subject names a batch and each message's place in it. The
//! server answers with a flow acknowledgement every few hundred messages ("every message up
//! to N is stored") instead of a PubAck each, and with one PubAck when the batch commits.
//!
//! The batch is opened in gap mode `fail`: a message the server does not get, or refuses,
//! ends the batch there, and nothing after it is stored. Every message still carries its
//! `Nats-Msg-Id` and `Nats-Expected-Last-Msg-Id`, which the server checks per message inside a
//! batch as outside one, so the ordering and de-duplication guarantees are the plain path's.
//! The gap check alone would not do: a message that passes the batch's checks and then fails
//! to be stored (a store error in nats-server's fast-batch path) does not end the batch, and
//! only the next message's expected id keeps that one from being stored after a hole.
//!
//! Reply subjects: `{inbox}.{batch id}.{flow}.fail.{seq}.{op}.$FI`, `op` 0 for the first
//! message, 1 for the others, 3 for the empty end-of-batch message that commits without being
//! stored. The batch id is the publisher's own unique token followed by a counter.

use async_nats::{Message, StatusCode, Subject};
use serde::Deserialize;

use super::buffers::Chunks;
use crate::sink::nats::puback::PubAckError;

/// The first message of a batch.
pub(super) const OP_START: u8 = 0;
/// Any further message.
pub(super) const OP_APPEND: u8 = 1;
/// The end-of-batch marker: commits the batch, is not stored itself.
pub(super) const OP_END: u8 = 3;

/// The most messages per flow acknowledgement the server allows.
const MAX_FLOW: usize = 500;
/// A batch starts only once this many messages are in flight (or half the window, when it is
/// smaller): a quiet stream keeps one PubAck per change, whose latency no batch would beat.
const START_IN_FLIGHT: usize = 64;
/// Size of the buffers batch reply subjects are cut from.
const REPLY_CHUNK: usize = 8 * 1024;

/// Whether a server version (`2.14.0`, `2.15.1-beta`) has fast-ingest batches.
pub fn server_has_fast_batches(version: &str) -> bool {
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (2, 14)
}

/// The batch being filled.
#[derive(Debug)]
pub(super) struct OpenBatch {
    /// The publisher's counter of batches, the end of the batch id.
    pub(super) number: u64,
    /// The batch sequence the next message gets (from 1).
    pub(super) next_seq: u64,
    /// A subject of the stream, for the end-of-batch marker.
    pub(super) subject: Subject,
    /// `{inbox}.{batch id}.{flow}.fail.`, the start of each of its reply subjects.
    head: String,
    /// The last flow acknowledgement's sequence: every message up to it is stored.
    acked: u64,
}

/// The publisher's batches: reply subjects, the open batch, and reading the replies.
pub(super) struct Batches {
    /// `{inbox}.{token}`: the start of every reply subject and batch id.
    prefix: String,
    /// The most messages per flow acknowledgement asked for.
    flow: usize,
    /// In flight before a batch starts.
    start_at: usize,
    last_number: u64,
    pub(super) open: Option<OpenBatch>,
    scratch: Vec<u8>,
    chunks: Chunks,
}

impl Batches {
    /// Batches replied to under `inbox` (the publisher's, whose replies arrive on `{inbox}.>`),
    /// with ids starting with `token` (unique to this publisher: the server tells batches apart
    /// by id alone), for a window of `max_in_flight` messages.
    pub(super) fn new(inbox: &str, token: &str, max_in_flight: usize) -> Self {
        // Acks well before the window fills, so it keeps sliding.
        let flow = (max_in_flight / 4).clamp(1, MAX_FLOW);
        Batches {
            prefix: format!("{inbox}.{token}"),
            flow,
            start_at: START_IN_FLIGHT.min(max_in_flight / 2).max(1),
            last_number: 0,
            open: None,
            scratch: Vec::with_capacity(inbox.len() + 64),
            chunks: Chunks::new(REPLY_CHUNK),
        }
    }

    /// The batch place of the next message, opening a batch when `in_flight` messages are in
    /// flight and none is open: `(number, seq, reply subject)`; `None` sends it plain.
    pub(super) fn next(
        &mut self,
        in_flight: usize,
        subject: &Subject,
    ) -> Option<(u64, u64, Subject)> {
        if self.open.is_none() {
            if in_flight < self.start_at {
                return None;
            }
            self.last_number += 1;
            let number = self.last_number;
            self.open = Some(OpenBatch {
                number,
                next_seq: 1,
                subject: subject.clone(),
                head: format!("{}{number}.{}.fail.", self.prefix, self.flow),
                acked: 0,
            });
        }
        let open = self.open.as_mut()?;
        let (number, seq) = (open.number, open.next_seq);
        open.next_seq += 1;
        let op = if seq == 1 { OP_START } else { OP_APPEND };
        let reply = reply(&mut self.scratch, &mut self.chunks, &open.head, seq, op);
        Some((number, seq, reply))
    }

    /// Takes back the place [`Batches::next`] gave a message that was not sent after all; a
    /// batch left empty is forgotten (the server never heard of it).
    pub(super) fn unsend(&mut self, number: u64) {
        if let Some(open) = self.open.as_mut().filter(|o| o.number == number) {
            open.next_seq -= 1;
            if open.next_seq == 1 {
                self.open = None;
            }
        }
    }

    /// Closes the open batch: the end-of-batch marker to send (`subject`, `reply`), or `None`
    /// when no batch is open.
    pub(super) fn close(&mut self) -> Option<(Subject, Subject)> {
        let open = self.open.take()?;
        let reply = reply(
            &mut self.scratch,
            &mut self.chunks,
            &open.head,
            open.next_seq,
            OP_END,
        );
        Some((open.subject, reply))
    }

    /// Forgets the open batch without ending it (after a failure: the server ends it itself,
    /// and what it did not store is sent again plainly).
    pub(super) fn abandon(&mut self) {
        self.open = None;
    }

    pub(super) fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Notes a flow acknowledgement of batch `number` up to `seq`.
    pub(super) fn acked(&mut self, number: u64, seq: u64) {
        if let Some(open) = self.open.as_mut().filter(|o| o.number == number) {
            open.acked = open.acked.max(seq);
        }
    }

    /// True when the open batch has fewer messages beyond its last flow acknowledgement than
    /// the server may wait for before the next one: with no room for more, only ending the
    /// batch gets them acknowledged.
    pub(super) fn starved(&self) -> bool {
        self.open
            .as_ref()
            .is_some_and(|o| o.next_seq - 1 - o.acked < self.flow as u64)
    }

    /// The batch number and message sequence a reply subject names, `None` when it is not a
    /// reply to one of this publisher's batches.
    pub(super) fn place(&self, subject: &str) -> Option<(u64, u64)> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_suffix(".$FI")?;
        let mut parts = rest.split('.');
        let number = parts.next()?.parse().ok()?;
        let _flow = parts.next()?;
        let _gap = parts.next()?;
        let seq = parts.next()?.parse().ok()?;
        let _op = parts.next()?;
        parts.next().is_none().then_some((number, seq))
    }
}

/// The reply subject `{head}{seq}.{op}.$FI`, cut from `chunks` (built by hand: formatting
/// costs a few hundred instructions per message).
fn reply(scratch: &mut Vec<u8>, chunks: &mut Chunks, head: &str, seq: u64, op: u8) -> Subject {
    scratch.clear();
    scratch.extend_from_slice(head.as_bytes());
    scratch.extend_from_slice(crate::wire::text::decimal(seq, &mut [0u8; 20]));
    scratch.extend_from_slice(&[b'.', b'0' + op]);
    scratch.extend_from_slice(b".$FI");
    let bytes = chunks.copy(scratch);
    // SAFETY: the bytes are `head`, a `str`, followed by ASCII digits, dots and `$FI`, so they
    // are UTF-8. Checking them again cost about 130 instructions per message.
    unsafe { Subject::from_bytes_unchecked(bytes) }
}

/// What a reply to a batch message says.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BatchReply {
    /// Every message of the batch up to `seq` is stored (a flow acknowledgement).
    Stored { seq: u64 },
    /// The batch committed with its first `count` messages stored; nothing after them is.
    Committed { count: u64 },
    /// The server found a message missing; the commit follows. Informational.
    Gap,
    /// Message `seq` was refused; the batch ends before it.
    Refused { seq: u64, error: PubAckError },
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: Option<String>,
    seq: Option<u64>,
    count: Option<u64>,
    batch: Option<String>,
    error: Option<RawError>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    code: u64,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

impl From<RawError> for PubAckError {
    fn from(e: RawError) -> Self {
        PubAckError::Refused {
            code: e.code,
            err_code: e.err_code,
            description: e.description,
        }
    }
}

/// Reads the reply to batch message `seq` (the sequence its subject names). Once per few
/// hundred messages, so plain JSON decoding is affordable.
pub(super) fn read_reply(message: &Message, seq: u64) -> BatchReply {
    if let Some(status) = message.status {
        let error = if status == StatusCode::NO_RESPONDERS {
            PubAckError::NoResponders
        } else {
            PubAckError::Status {
                code: status.as_u16(),
                description: message.description.clone(),
            }
        };
        return BatchReply::Refused { seq, error };
    }
    read_payload(&message.payload, seq)
}

fn read_payload(payload: &[u8], seq: u64) -> BatchReply {
    let malformed = |reason| BatchReply::Refused {
        seq,
        error: PubAckError::Malformed {
            reason,
            excerpt: String::from_utf8_lossy(&payload[..payload.len().min(120)]).into_owned(),
        },
    };
    let Ok(raw) = serde_json::from_slice::<Raw>(payload) else {
        return malformed("not a batch reply");
    };
    match (raw.kind.as_deref(), raw.error) {
        (Some("ack"), _) => match raw.seq {
            Some(seq) => BatchReply::Stored { seq },
            None => malformed("flow acknowledgement without seq"),
        },
        (Some("gap"), _) => BatchReply::Gap,
        (Some("err"), Some(error)) => BatchReply::Refused {
            seq: raw.seq.unwrap_or(seq),
            error: error.into(),
        },
        (None, Some(error)) => BatchReply::Refused {
            seq,
            error: error.into(),
        },
        (None, None) => match (raw.batch, raw.count) {
            (Some(_), Some(count)) => BatchReply::Committed { count },
            _ => malformed("a PubAck without batch and count"),
        },
        _ => malformed("unknown batch reply"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_with_fast_batches() {
        assert!(server_has_fast_batches("2.14.0"));
        assert!(server_has_fast_batches("2.15.1-beta"));
        assert!(server_has_fast_batches("3.0.0"));
        assert!(!server_has_fast_batches("2.12.3"));
        assert!(!server_has_fast_batches("2.9"));
        assert!(!server_has_fast_batches(""));
    }

    #[test]
    fn a_batch_opens_with_enough_in_flight_and_names_each_place() {
        let mut b = Batches::new("_INBOX.abc", "tok", 1024);
        let subject = Subject::from("cdc.public.t.insert");
        assert!(b.next(63, &subject).is_none(), "too little in flight");
        let (n, seq, reply) = b.next(64, &subject).unwrap();
        assert_eq!((n, seq), (1, 1));
        assert_eq!(reply.as_str(), "_INBOX.abc.tok1.256.fail.1.0.$FI");
        assert_eq!(b.place(reply.as_str()), Some((1, 1)));
        // Once open, every message goes into it whatever is in flight.
        let (_, seq, reply) = b.next(0, &subject).unwrap();
        assert_eq!(reply.as_str(), "_INBOX.abc.tok1.256.fail.2.1.$FI");
        assert_eq!(seq, 2);
        let (subj, end) = b.close().unwrap();
        assert_eq!(subj.as_str(), "cdc.public.t.insert");
        assert_eq!(end.as_str(), "_INBOX.abc.tok1.256.fail.3.3.$FI");
        assert_eq!(b.place(end.as_str()), Some((1, 3)));
        assert!(b.close().is_none());
        // The next batch has the next number.
        let (n, _, _) = b.next(100, &subject).unwrap();
        assert_eq!(n, 2);
        // Fewer than a flow's worth beyond the last flow acknowledgement: starved.
        assert!(b.starved());
        b.acked(2, 1);
        assert!(b.starved());
        // A place taken back: the empty batch is forgotten.
        b.unsend(2);
        assert!(!b.is_open());
    }

    #[test]
    fn foreign_and_plain_replies_have_no_place() {
        let b = Batches::new("_INBOX.abc", "tok", 1024);
        assert_eq!(b.place("_INBOX.abc.17"), None);
        assert_eq!(b.place("_INBOX.abc.other1.256.fail.1.0.$FI"), None);
        assert_eq!(b.place("_INBOX.abc.tok1.256.fail.x.0.$FI"), None);
        assert_eq!(b.place("_INBOX.abc.tok1.256.fail.1.0"), None);
    }

    #[test]
    fn small_windows_ack_often_and_start_early() {
        let mut b = Batches::new("i", "t", 8);
        let subject = Subject::from("cdc.x");
        assert!(b.next(3, &subject).is_none());
        let (_, _, reply) = b.next(4, &subject).unwrap();
        assert_eq!(reply.as_str(), "i.t1.2.fail.1.0.$FI");
    }

    #[test]
    fn replies_are_read() {
        assert_eq!(
            read_payload(br#"{"type":"ack","seq":0,"msgs":256}"#, 1),
            BatchReply::Stored { seq: 0 }
        );
        assert_eq!(
            read_payload(br#"{"type":"ack","seq":512,"msgs":256}"#, 530),
            BatchReply::Stored { seq: 512 }
        );
        assert_eq!(
            read_payload(br#"{"type":"gap","last_seq":5,"seq":7}"#, 7),
            BatchReply::Gap
        );
        assert_eq!(
            read_payload(
                br#"{"stream":"CDC","seq":1042,"batch":"tok1","count":700}"#,
                701
            ),
            BatchReply::Committed { count: 700 }
        );
        assert_eq!(
            read_payload(
                br#"{"stream":"CDC","seq":9,"duplicate": true,"batch":"tok1","count":3}"#,
                3
            ),
            BatchReply::Committed { count: 3 }
        );
        let refused = read_payload(
            br#"{"type":"err","seq":42,"error":{"code":400,"err_code":10070,"description":"wrong last msg ID: x"}}"#,
            42,
        );
        match refused {
            BatchReply::Refused { seq: 42, error } => assert!(error.is_wrong_last_msg_id()),
            other => panic!("{other:?}"),
        }
        // A plain error names no sequence: the subject's is used.
        match read_payload(
            br#"{"stream":"CDC","error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}"#,
            9,
        ) {
            BatchReply::Refused { seq: 9, error } => assert!(error.is_permanent()),
            other => panic!("{other:?}"),
        }
        // The answer to a message of a batch the server dropped (as nats-server 2.15 words it).
        match read_payload(
            br#"{"stream":"CDC","error":{"code":400,"err_code":10208,"description":"batch publish ID unknown"}}"#,
            301,
        ) {
            BatchReply::Refused { seq: 301, error } => {
                assert!(error.is_unknown_batch() && !error.refuses_batches())
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            &b"nope"[..],
            br#"{"type":"ack"}"#,
            br#"{"stream":"CDC","seq":1}"#,
        ] {
            assert!(
                matches!(
                    read_payload(bad, 4),
                    BatchReply::Refused {
                        seq: 4,
                        error: PubAckError::Malformed { .. }
                    }
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
