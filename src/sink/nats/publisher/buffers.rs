//! The publisher's allocation savers: payloads and reply subjects cut from shared buffers, and
//! the subjects of each table built once.

use std::collections::VecDeque;
use std::sync::Arc;

use async_nats::Subject;
use bytes::{BufMut, Bytes, BytesMut};

use crate::wire::event::{Operation, TableRef};
use crate::wire::subject::change_subject;

/// Most tables whose subjects are kept (a schema change gives a table a new entry).
const SUBJECT_CACHE_TABLES: usize = 4096;
/// Size of the buffers reply subjects are cut from.
const REPLY_CHUNK: usize = 4 * 1024;

/// Copies small byte strings into shared buffers of a fixed size and hands them out as
/// [`Bytes`]: one allocation for many messages instead of one each. Large pieces get an
/// allocation of their own, so one big row never keeps a big buffer alive.
///
/// A full buffer is retired, not dropped: once every piece cut from it is gone (its messages
/// acknowledged), it is written again from the start. A new buffer costs the system allocator
/// far more than a small piece (callgrind: about 10 000 instructions each, glibc sorting its
/// free lists for a request of this size); retired buffers whose pieces are still held are
/// left to be freed by their last piece.
pub(super) struct Chunks {
    chunk: BytesMut,
    /// Buffers the chunk moved on from, oldest first.
    retired: VecDeque<BytesMut>,
    size: usize,
}

/// Most retired buffers kept for reuse: with 16 KiB payload buffers, 512 KiB, more than the
/// small pieces of a full PubAck window.
const RETIRED_CHUNKS: usize = 32;

impl Chunks {
    pub(super) fn new(size: usize) -> Self {
        Chunks {
            chunk: BytesMut::with_capacity(size),
            retired: VecDeque::new(),
            size,
        }
    }

    pub(super) fn copy(&mut self, data: &[u8]) -> Bytes {
        if data.len() > self.size / 4 {
            return Bytes::copy_from_slice(data);
        }
        // After each split the chunk holds only its unused rest; when that is too short the
        // next buffer takes over (the old one lives on in the pieces already cut from it).
        if self.chunk.capacity() < data.len() {
            self.next_chunk();
        }
        self.chunk.put_slice(data);
        self.chunk.split().freeze()
    }

    /// Retires the chunk and goes on with the oldest retired buffer if all its pieces are
    /// gone (`try_reclaim` succeeds only for the buffer's last handle), else with a new one.
    fn next_chunk(&mut self) {
        let size = self.size;
        let reclaimed = self
            .retired
            .front_mut()
            .is_some_and(|oldest| oldest.try_reclaim(size));
        let reused = if reclaimed {
            self.retired.pop_front()
        } else {
            None
        };
        let next = reused.unwrap_or_else(|| BytesMut::with_capacity(size));
        let full = std::mem::replace(&mut self.chunk, next);
        if self.retired.len() == RETIRED_CHUNKS {
            self.retired.pop_front();
        }
        self.retired.push_back(full);
    }
}

/// The reply subjects `{inbox}.{token}` of one publisher, and the reverse: the token of a
/// reply. The subjects are cut from shared buffers instead of being allocated one by one.
pub(super) struct Replies {
    /// `{inbox}.`
    prefix: String,
    /// Where a subject is written before it is copied into `chunks`.
    scratch: Vec<u8>,
    chunks: Chunks,
}

impl Replies {
    pub(super) fn new(inbox: &str) -> Self {
        Replies {
            prefix: format!("{inbox}."),
            scratch: Vec::with_capacity(inbox.len() + 21),
            chunks: Chunks::new(REPLY_CHUNK),
        }
    }

    /// The wildcard subject all replies arrive on, a fast-ingest batch's
    /// (`{inbox}.{batch}.….$FI`) too.
    pub(super) fn filter(&self) -> String {
        format!("{}>", self.prefix)
    }

    pub(super) fn subject(&mut self, token: u64) -> Subject {
        self.scratch.clear();
        self.scratch.extend_from_slice(self.prefix.as_bytes());
        self.scratch
            .extend_from_slice(crate::wire::text::decimal(token, &mut [0u8; 20]));
        let bytes = self.chunks.copy(&self.scratch);
        // SAFETY: the bytes are the prefix, a `String`, followed by ASCII digits, so they are
        // UTF-8 (checking them again costs about a hundred instructions per message).
        unsafe { Subject::from_bytes_unchecked(bytes) }
    }

    /// The token of a reply subject, `None` for anything else.
    pub(super) fn token(&self, subject: &str) -> Option<u64> {
        let digits = subject.strip_prefix(self.prefix.as_str())?.as_bytes();
        if digits.is_empty() {
            return None;
        }
        digits.iter().try_fold(0u64, |n, &d| {
            if d.is_ascii_digit() {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            } else {
                None
            }
        })
    }
}

/// The subjects of each table, built once rather than for every message. Keyed by the
/// address of the table's [`TableRef`], which the wal thread creates anew for each Relation
/// message (so a renamed table gets a new entry); the entry holds the `Arc`, so the address
/// cannot be reused by another table while it is cached.
#[derive(Default)]
pub(super) struct SubjectCache {
    /// Looked up for every message (foldhash: the keys are addresses, not anyone's input).
    tables: foldhash::HashMap<usize, (Arc<TableRef>, [Option<Subject>; 4])>,
}

impl SubjectCache {
    pub(super) fn get(&mut self, prefix: &str, table: &Arc<TableRef>, op: Operation) -> Subject {
        if self.tables.len() >= SUBJECT_CACHE_TABLES {
            self.tables.clear();
        }
        let key = Arc::as_ptr(table) as usize;
        let (_, subjects) = self
            .tables
            .entry(key)
            .or_insert_with(|| (Arc::clone(table), Default::default()));
        let slot = match op {
            Operation::Insert => 0,
            Operation::Update => 1,
            Operation::Delete => 2,
            Operation::Truncate => 3,
        };
        subjects[slot]
            .get_or_insert_with(|| {
                Subject::from(change_subject(prefix, &table.schema, &table.table, op))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_subjects_carry_their_token() {
        let mut replies = Replies::new("_INBOX.abc");
        assert_eq!(replies.filter(), "_INBOX.abc.>");
        for token in [0, 7, 10, 123_456_789, u64::MAX] {
            let subject = replies.subject(token);
            assert_eq!(subject.as_str(), format!("_INBOX.abc.{token}"));
            assert_eq!(replies.token(&subject), Some(token));
        }
        // Enough subjects to span several buffers; earlier ones stay intact.
        let subjects: Vec<Subject> = (0..2000).map(|t| replies.subject(t)).collect();
        for (t, subject) in subjects.iter().enumerate() {
            assert_eq!(replies.token(subject), Some(t as u64));
        }
        for other in [
            "_INBOX.abc.",
            "_INBOX.abc.1x",
            "_INBOX.abc.1.2",
            "_INBOX.abc.-1",
            "_INBOX.abd.1",
            "_INBOX.abc",
            "_INBOX.abc.18446744073709551616",
        ] {
            assert_eq!(replies.token(other), None, "{other}");
        }
    }

    #[test]
    fn chunks_share_small_pieces_and_not_large_ones() {
        let mut chunks = Chunks::new(64);
        let pieces: Vec<Bytes> = (0u8..40).map(|i| chunks.copy(&[i; 10])).collect();
        for (i, piece) in pieces.iter().enumerate() {
            assert_eq!(&piece[..], &[i as u8; 10]);
        }
        // A piece too large to share is copied on its own; the chunk goes on after it.
        let large = chunks.copy(&[7; 17]);
        assert_eq!(&large[..], &[7; 17]);
        assert_eq!(&chunks.copy(b"abc")[..], b"abc");
        assert_eq!(&chunks.copy(b"")[..], b"");
    }

    #[test]
    fn a_buffer_is_written_again_only_once_all_its_pieces_are_gone() {
        let mut chunks = Chunks::new(64);
        // Fill the first buffer and start the second one: the first is retired.
        let first: Vec<Bytes> = (0u8..4).map(|i| chunks.copy(&[i; 16])).collect();
        let held = chunks.copy(&[9; 16]);
        let first_ptr = first[0].as_ptr();
        assert_ne!(held.as_ptr(), first_ptr);

        // The first buffer's pieces are still held: a third buffer is new, and the pieces keep
        // their bytes.
        let second: Vec<Bytes> = (0u8..3).map(|i| chunks.copy(&[10 + i; 16])).collect();
        let third = chunks.copy(&[20; 16]);
        assert_ne!(third.as_ptr(), first_ptr);
        for (i, piece) in first.iter().enumerate() {
            assert_eq!(&piece[..], &[i as u8; 16]);
        }

        // Once they are dropped, the next buffer is the first one again, from its start.
        drop(first);
        let _rest: Vec<Bytes> = (0u8..3).map(|i| chunks.copy(&[30 + i; 16])).collect();
        let reused = chunks.copy(&[40; 16]);
        assert_eq!(reused.as_ptr(), first_ptr);
        assert_eq!(&reused[..], &[40; 16]);
        // The pieces of the buffers still held are untouched.
        assert_eq!(&held[..], &[9; 16]);
        for (i, piece) in second.iter().enumerate() {
            assert_eq!(&piece[..], &[10 + i as u8; 16]);
        }
        assert_eq!(&third[..], &[20; 16]);
    }

    #[test]
    fn retired_buffers_are_bounded() {
        let mut chunks = Chunks::new(64);
        let held: Vec<Bytes> = (0..(RETIRED_CHUNKS as u8 + 10) * 4)
            .map(|i| chunks.copy(&[i; 16]))
            .collect();
        assert_eq!(chunks.retired.len(), RETIRED_CHUNKS);
        for (i, piece) in held.iter().enumerate() {
            assert_eq!(&piece[..], &[i as u8; 16]);
        }
    }
}
