//! Decoder for the `pgoutput` logical replication messages (protocol versions 1 to 4).
//!
//! Each XLogData payload of the replication stream holds exactly one message; pass it to
//! [`Decoder::decode`]. The result borrows names and values from that payload (nothing is
//! copied except the column list of Relation messages and the table list of Truncate), and
//! no input, however malformed, makes the decoder panic: it returns a [`DecodeError`] that
//! names the message tag and the byte offset.
//!
//! # State
//!
//! The only state is whether a stream block is open: between Stream Start (`'S'`) and Stream
//! Stop (`'E'`) of a streamed in-progress transaction (proto ≥ 2, `streaming` on), the
//! Relation, Type, Insert, Update, Delete, Truncate and Message messages start with an extra
//! `Int32 xid`, the (sub)transaction that made the change. [`Decoder`] tracks that bit from
//! the S/E messages it decodes; call [`Decoder::reset`] after a reconnect. Messages that
//! PostgreSQL never sends inside a block (Begin, Commit, Stream Commit/Abort, the two-phase
//! messages, a second Stream Start) are rejected there, and so is a Stream Stop outside one:
//! they mean the decoder and the server disagree about the framing.
//!
//! # What the caller keeps
//!
//! DML messages carry only a relation OID and positional cells. Keeping the Relation cache
//! (OID → columns, replaced on every Relation message) and the Type cache (OID → name for
//! non-built-in types) is the caller's job, as is buffering streamed transactions per xid.
//!
//! # Timestamps
//!
//! Times are `i64` microseconds since the PostgreSQL epoch, 2000-01-01 00:00:00 UTC, as on
//! the wire; [`pg_to_unix_micros`] converts them.

// Panic freedom is a requirement here, so let the linter check it outside tests.
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

mod error;
mod messages;
mod reader;
mod tuple;

#[cfg(test)]
mod proptests;
#[cfg(test)]
pub(crate) mod test_vectors;
#[cfg(test)]
mod tests;

pub use error::DecodeError;
pub(crate) use error::ShowTag;
pub use messages::{
    Begin, BeginPrepare, Column, Commit, CommitPrepared, Delete, Insert, Message, OldTuple, Origin,
    Prepare, Relation, ReplicaIdentity, RollbackPrepared, StreamAbort, StreamCommit, StreamStart,
    Truncate, Type, Update,
};
pub use tuple::{Cell, Cells, TupleData};

use reader::Reader;

/// Microseconds from the Unix epoch (1970-01-01) to the PostgreSQL epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Converts a protocol timestamp (µs since 2000-01-01 UTC) to µs since the Unix epoch.
///
/// Saturates instead of overflowing, so PostgreSQL's `±infinity` (`i64::MAX`/`MIN`) stay
/// at the extremes.
pub fn pg_to_unix_micros(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(PG_EPOCH_OFFSET_MICROS)
}

/// Converts µs since the Unix epoch to a protocol timestamp (µs since 2000-01-01 UTC).
pub fn unix_to_pg_micros(unix_micros: i64) -> i64 {
    unix_micros.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// One decoded pgoutput message, borrowing from the payload it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage<'a> {
    /// `'B'` Begin.
    Begin(Begin),
    /// `'C'` Commit.
    Commit(Commit),
    /// `'O'` Origin.
    Origin(Origin<'a>),
    /// `'R'` Relation.
    Relation(Relation<'a>),
    /// `'Y'` Type.
    Type(Type<'a>),
    /// `'I'` Insert.
    Insert(Insert<'a>),
    /// `'U'` Update.
    Update(Update<'a>),
    /// `'D'` Delete.
    Delete(Delete<'a>),
    /// `'T'` Truncate.
    Truncate(Truncate),
    /// `'M'` logical decoding message.
    Message(Message<'a>),
    /// `'S'` Stream Start.
    StreamStart(StreamStart),
    /// `'E'` Stream Stop.
    StreamStop,
    /// `'c'` Stream Commit.
    StreamCommit(StreamCommit),
    /// `'A'` Stream Abort.
    StreamAbort(StreamAbort),
    /// `'b'` Begin Prepare.
    BeginPrepare(BeginPrepare<'a>),
    /// `'P'` Prepare.
    Prepare(Prepare<'a>),
    /// `'K'` Commit Prepared.
    CommitPrepared(CommitPrepared<'a>),
    /// `'r'` Rollback Prepared.
    RollbackPrepared(RollbackPrepared<'a>),
    /// `'p'` Stream Prepare.
    StreamPrepare(Prepare<'a>),
}

impl<'a> LogicalMessage<'a> {
    /// Decodes one message without touching any state.
    ///
    /// `in_stream` says whether a stream block is open (see the module docs); [`Decoder`]
    /// tracks it for you.
    pub fn parse(payload: &'a [u8], in_stream: bool) -> Result<Self, DecodeError> {
        let (&tag, _) = payload.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader::new(payload, tag);
        // Check the framing first, so a desynchronised stream is reported as such.
        match tag {
            b'B' | b'C' | b'S' | b'c' | b'A' | b'b' | b'P' | b'K' | b'r' | b'p' if in_stream => {
                return Err(DecodeError::InsideStream { tag })
            }
            b'E' if !in_stream => return Err(DecodeError::OutsideStream { tag }),
            _ => {}
        }
        // Inside a block the streamable messages start with the (sub)transaction's xid.
        let xid = match tag {
            b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M' if in_stream => Some(r.u32()?),
            _ => None,
        };
        let msg = match tag {
            b'B' => LogicalMessage::Begin(Begin::read(&mut r)?),
            b'C' => LogicalMessage::Commit(Commit::read(&mut r)?),
            b'O' => LogicalMessage::Origin(Origin::read(&mut r)?),
            b'R' => LogicalMessage::Relation(Relation::read(&mut r, xid)?),
            b'Y' => LogicalMessage::Type(Type::read(&mut r, xid)?),
            b'I' => LogicalMessage::Insert(Insert::read(&mut r, xid)?),
            b'U' => LogicalMessage::Update(Update::read(&mut r, xid)?),
            b'D' => LogicalMessage::Delete(Delete::read(&mut r, xid)?),
            b'T' => LogicalMessage::Truncate(Truncate::read(&mut r, xid)?),
            b'M' => LogicalMessage::Message(Message::read(&mut r, xid)?),
            b'S' => LogicalMessage::StreamStart(StreamStart::read(&mut r)?),
            b'E' => LogicalMessage::StreamStop,
            b'c' => LogicalMessage::StreamCommit(StreamCommit::read(&mut r)?),
            // Decoded outside streaming too: some servers send stray aborts with proto 1.
            b'A' => LogicalMessage::StreamAbort(StreamAbort::read(&mut r)?),
            b'b' => LogicalMessage::BeginPrepare(BeginPrepare::read(&mut r)?),
            b'P' => LogicalMessage::Prepare(Prepare::read(&mut r)?),
            b'K' => LogicalMessage::CommitPrepared(CommitPrepared::read(&mut r)?),
            b'r' => LogicalMessage::RollbackPrepared(RollbackPrepared::read(&mut r)?),
            b'p' => LogicalMessage::StreamPrepare(Prepare::read(&mut r)?),
            _ => return Err(DecodeError::UnknownTag { tag }),
        };
        r.finish()?;
        Ok(msg)
    }

    /// The message type byte.
    pub fn tag(&self) -> u8 {
        match self {
            LogicalMessage::Begin(_) => b'B',
            LogicalMessage::Commit(_) => b'C',
            LogicalMessage::Origin(_) => b'O',
            LogicalMessage::Relation(_) => b'R',
            LogicalMessage::Type(_) => b'Y',
            LogicalMessage::Insert(_) => b'I',
            LogicalMessage::Update(_) => b'U',
            LogicalMessage::Delete(_) => b'D',
            LogicalMessage::Truncate(_) => b'T',
            LogicalMessage::Message(_) => b'M',
            LogicalMessage::StreamStart(_) => b'S',
            LogicalMessage::StreamStop => b'E',
            LogicalMessage::StreamCommit(_) => b'c',
            LogicalMessage::StreamAbort(_) => b'A',
            LogicalMessage::BeginPrepare(_) => b'b',
            LogicalMessage::Prepare(_) => b'P',
            LogicalMessage::CommitPrepared(_) => b'K',
            LogicalMessage::RollbackPrepared(_) => b'r',
            LogicalMessage::StreamPrepare(_) => b'p',
        }
    }
}

/// Decodes a sequence of pgoutput messages, tracking whether a stream block is open.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    /// A decoder outside any stream block.
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Decodes one message (one XLogData payload). On error the state is left unchanged.
    pub fn decode<'a>(&mut self, payload: &'a [u8]) -> Result<LogicalMessage<'a>, DecodeError> {
        let msg = LogicalMessage::parse(payload, self.in_stream)?;
        match msg {
            LogicalMessage::StreamStart(_) => self.in_stream = true,
            LogicalMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }

    /// Forgets the stream state; call it when a new replication connection starts.
    pub fn reset(&mut self) {
        self.in_stream = false;
    }

    /// True between a Stream Start and its Stream Stop.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }
}
