//! Message ids: the deterministic JetStream `Nats-Msg-Id` of each change event,
//! `{namespace}:{timeline}:{commit_lsn}-{seq}`, which makes republishing idempotent and
//! tells consumers where a message stands without decoding it.

use super::text::{decimal, push_ascii};
use crate::pg::Lsn;

/// The first part of every message id: `{namespace}:`, built once per run.
pub fn id_prefix(namespace: &str) -> String {
    format!("{namespace}:")
}

/// The JetStream message id of the change `seq` of the transaction committed at `commit_lsn`
/// on `timeline`: `{namespace}:{timeline}:{commit_lsn}-{seq}`, e.g.
/// `3f9a1c2e:1:0/25CB5E8-0`. `prefix` is [`id_prefix`] of the namespace. Unique across
/// timelines (a promotion reuses LSNs) and across clusters, databases and publications (the
/// namespace).
pub fn message_id(prefix: &str, timeline: u32, commit_lsn: Lsn, seq: u32) -> String {
    let mut id = String::with_capacity(prefix.len() + 40);
    push_stem(&mut id, prefix, timeline, commit_lsn);
    push_seq(&mut id, seq);
    id
}

/// Writes `{prefix}{timeline}:{commit_lsn}-`, the part of [`message_id`] that every change of
/// a transaction shares. Written by hand: `format!` costs several times more.
fn push_stem(out: &mut String, prefix: &str, timeline: u32, commit_lsn: Lsn) {
    out.push_str(prefix);
    push_ascii(out, decimal(u64::from(timeline), &mut [0u8; 20]));
    out.push(':');
    push_ascii(out, commit_lsn.ascii(&mut [0; Lsn::TEXT_MAX_LEN]));
    out.push('-');
}

/// Writes the change's ordinal, the last part of [`message_id`].
fn push_seq(out: &mut String, seq: u32) {
    push_ascii(out, decimal(u64::from(seq), &mut [0u8; 20]));
}

/// The [`message_id`]s of a run, for a publisher that sends changes in order: the text a
/// transaction's changes share is written once per transaction rather than once per change.
#[derive(Debug, Clone)]
pub struct MessageIds {
    prefix: String,
    /// The transaction `stem` was written for: its timeline and commit position.
    of: Option<(u32, Lsn)>,
    stem: String,
}

impl MessageIds {
    /// The ids of namespace `namespace`.
    pub fn new(namespace: &str) -> Self {
        MessageIds {
            prefix: id_prefix(namespace),
            of: None,
            stem: String::new(),
        }
    }

    /// [`id_prefix`] of the namespace.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// [`message_id`] of change `seq` of the transaction committed at `commit_lsn` on
    /// `timeline`.
    pub fn id(&mut self, timeline: u32, commit_lsn: Lsn, seq: u32) -> String {
        if self.of != Some((timeline, commit_lsn)) {
            self.stem.clear();
            push_stem(&mut self.stem, &self.prefix, timeline, commit_lsn);
            self.of = Some((timeline, commit_lsn));
        }
        // Room for the longest ordinal: the id is not grown while it is written.
        let mut id = String::with_capacity(self.stem.len() + 10);
        id.push_str(&self.stem);
        push_seq(&mut id, seq);
        id
    }
}

/// The parts of a message id written by [`message_id`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageIdParts<'a> {
    /// The namespace.
    pub namespace: &'a str,
    /// The timeline of the commit.
    pub timeline: u32,
    /// The transaction's commit position.
    pub commit_lsn: Lsn,
    /// The change's ordinal in its transaction.
    pub seq: u32,
}

/// Reads a message id `{namespace}:{timeline}:{commit_lsn}-{seq}`; `None` for anything else
/// (for example another writer's id).
pub fn parse_message_id(id: &str) -> Option<MessageIdParts<'_>> {
    let (rest, seq) = id.rsplit_once('-')?;
    let (rest, lsn) = rest.rsplit_once(':')?;
    let (namespace, timeline) = rest.rsplit_once(':')?;
    if namespace.is_empty() {
        return None;
    }
    Some(MessageIdParts {
        namespace,
        timeline: timeline.parse().ok()?,
        commit_lsn: lsn.parse().ok()?,
        seq: seq.parse().ok()?,
    })
}

/// The commit LSN in a change's message id: [`message_id`]'s form, or the bare
/// `{commit_lsn}-{seq}` of a stream written by an older bridge; `None` for any other id.
pub fn id_commit_lsn(id: &str) -> Option<Lsn> {
    if let Some(parts) = parse_message_id(id) {
        return Some(parts.commit_lsn);
    }
    let (lsn, seq) = id.rsplit_once('-')?;
    seq.parse::<u32>().ok()?;
    lsn.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::wire::event::{ChangeEvent, Operation, TableRef};

    #[test]
    fn message_ids_of_a_run_are_message_id() {
        let mut ids = MessageIds::new("3f9a1c2e");
        assert_eq!(ids.prefix(), "3f9a1c2e:");
        for (timeline, lsn, seq) in [
            (1, 0x25C_B5E8, 0),
            (1, 0x25C_B5E8, 417),
            (1, 0x25C_B5E8, u32::MAX),
            (2, 0x25C_B5E8, 1),
            (2, 0x10_025C_B5E8, 1),
            (1, 0x25C_B5E8, 3),
            (u32::MAX, u64::MAX, 9),
        ] {
            assert_eq!(
                ids.id(timeline, Lsn(lsn), seq),
                message_id("3f9a1c2e:", timeline, Lsn(lsn), seq)
            );
        }
        assert_eq!(ids.id(1, Lsn(0x25C_B5E8), 5), "3f9a1c2e:1:0/25CB5E8-5");
    }

    #[test]
    fn message_id_is_namespace_timeline_commit_lsn_and_seq() {
        let ev = |lsn: u64, timeline: u32, seq: u32| ChangeEvent {
            table: Arc::new(TableRef {
                columns: Vec::new(),
                schema: Arc::from("public"),
                table: Arc::from("t"),
                relation_id: 1,
                key_columns: Vec::new(),
            }),
            operation: Operation::Insert,
            lsn: Lsn(lsn),
            commit_lsn: Lsn(lsn),
            timeline,
            xid: 1,
            commit_time: 0,
            seq,
            last_in_tx: false,
            columns: Vec::new(),
            old_columns: None,
            unchanged_toast: Vec::new(),
        };
        let prefix = id_prefix("3f9a1c2e");
        assert_eq!(
            ev(0x25CB5E8, 1, 0).message_id(&prefix),
            "3f9a1c2e:1:0/25CB5E8-0"
        );
        for (lsn, timeline, seq) in [
            (0, 1, 0),
            (0x25CB5E8, 2, 7),
            (0x1_0000_0010, 4_294_967_295, 4_294_967_295),
            (u64::MAX, 10, 10),
        ] {
            assert_eq!(
                ev(lsn, timeline, seq).message_id(&prefix),
                format!("3f9a1c2e:{timeline}:{}-{seq}", Lsn(lsn)),
                "{lsn:#x} {seq}"
            );
        }
        // The same change on another timeline or in another namespace has another id.
        assert_ne!(
            ev(0x100, 1, 0).message_id(&prefix),
            ev(0x100, 2, 0).message_id(&prefix)
        );
        assert_ne!(
            ev(0x100, 1, 0).message_id(&prefix),
            ev(0x100, 1, 0).message_id(&id_prefix("other"))
        );
    }

    #[test]
    fn message_ids_read_back() {
        let id = message_id(&id_prefix("3f9a1c2e"), 2, Lsn(0x10_025C_B5E8), 17);
        assert_eq!(
            parse_message_id(&id),
            Some(MessageIdParts {
                namespace: "3f9a1c2e",
                timeline: 2,
                commit_lsn: Lsn(0x10_025C_B5E8),
                seq: 17,
            })
        );
        for other in [
            "",
            "0/25CB5E8-0",
            ":1:0/1-0",
            "ns:x:0/1-0",
            "ns:1:zz-0",
            "ns:1:0/1-",
            "a-b",
        ] {
            assert_eq!(parse_message_id(other), None, "{other}");
        }
    }

    #[test]
    fn commit_lsn_of_a_message_id() {
        let lsn: Lsn = "0/25CB5E8".parse().unwrap();
        assert_eq!(id_commit_lsn("3f9a1c2e:1:0/25CB5E8-0"), Some(lsn));
        assert_eq!(id_commit_lsn("ns-with-dashes:12:0/25CB5E8-417"), Some(lsn));
        assert_eq!(id_commit_lsn("0/25CB5E8-3"), Some(lsn));
        assert_eq!(id_commit_lsn("replay-7"), None);
        assert_eq!(id_commit_lsn("3f9a1c2e:1:0/25CB5E8"), None);
    }
}
