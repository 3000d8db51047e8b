//! The decoder's error type.

use std::fmt;

/// Why a pgoutput message could not be decoded.
///
/// Every variant names the message tag (its first byte) and the byte offset inside the
/// message where the problem was found, so a log line is enough to locate it in a capture.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload had no bytes at all.
    #[error("pgoutput: empty message")]
    Empty,

    /// The first byte is not a pgoutput message type.
    #[error("pgoutput: unknown message tag 0x{tag:02x} at offset 0")]
    UnknownTag {
        /// The unknown first byte.
        tag: u8,
    },

    /// The message ended before a field was complete.
    #[error("pgoutput {} message: unexpected end of data at offset {offset} (need {need} bytes)", ShowTag(*.tag))]
    UnexpectedEnd {
        /// Message tag.
        tag: u8,
        /// Offset of the incomplete field.
        offset: usize,
        /// Bytes the field needs.
        need: usize,
    },

    /// A flags byte that PostgreSQL's own reader requires to be zero was not.
    #[error("pgoutput {} message: non-zero flags 0x{flags:02x} at offset {offset}", ShowTag(*.tag))]
    NonZeroFlags {
        /// Message tag.
        tag: u8,
        /// Offset of the flags byte.
        offset: usize,
        /// The value found.
        flags: u8,
    },

    /// A TupleData column kind other than `n`, `u`, `t` or `b`.
    #[error("pgoutput {} message: invalid tuple kind 0x{kind:02x} at offset {offset}", ShowTag(*.tag))]
    InvalidTupleKind {
        /// Message tag.
        tag: u8,
        /// Offset of the kind byte.
        offset: usize,
        /// The value found.
        kind: u8,
    },

    /// The byte in front of a tuple (`N`, `K` or `O`) was not one the message allows there.
    #[error("pgoutput {} message: expected {expected} at offset {offset}, found 0x{found:02x}", ShowTag(*.tag))]
    InvalidTupleMarker {
        /// Message tag.
        tag: u8,
        /// Offset of the marker byte.
        offset: usize,
        /// What was allowed, e.g. `'N'`.
        expected: &'static str,
        /// The value found.
        found: u8,
    },

    /// A Relation message's replica identity byte was not `d`, `n`, `f` or `i`.
    #[error("pgoutput {} message: invalid replica identity 0x{value:02x} at offset {offset}", ShowTag(*.tag))]
    InvalidReplicaIdentity {
        /// Message tag.
        tag: u8,
        /// Offset of the byte.
        offset: usize,
        /// The value found.
        value: u8,
    },

    /// A string had no terminating NUL before the end of the message.
    #[error("pgoutput {} message: unterminated string at offset {offset}", ShowTag(*.tag))]
    UnterminatedString {
        /// Message tag.
        tag: u8,
        /// Offset where the string starts.
        offset: usize,
    },

    /// A string was not valid UTF-8 (the connection's client encoding should be UTF8).
    #[error("pgoutput {} message: invalid UTF-8 in string at offset {offset}", ShowTag(*.tag))]
    InvalidUtf8 {
        /// Message tag.
        tag: u8,
        /// Offset of the first invalid byte.
        offset: usize,
    },

    /// A length or count field was negative.
    #[error("pgoutput {} message: negative length {len} at offset {offset}", ShowTag(*.tag))]
    NegativeLength {
        /// Message tag.
        tag: u8,
        /// Offset of the length field.
        offset: usize,
        /// The value found.
        len: i32,
    },

    /// Bytes were left after the last field of the message.
    #[error("pgoutput {} message: {count} trailing bytes at offset {offset}", ShowTag(*.tag))]
    TrailingBytes {
        /// Message tag.
        tag: u8,
        /// Offset of the first unread byte.
        offset: usize,
        /// Number of unread bytes.
        count: usize,
    },

    /// A message that PostgreSQL never sends between Stream Start and Stream Stop arrived
    /// there (including a second Stream Start). The decoder's stream state and the server's
    /// disagree, so nothing after this can be parsed reliably.
    #[error("pgoutput {} message at offset 0 is not allowed inside a stream block", ShowTag(*.tag))]
    InsideStream {
        /// Message tag.
        tag: u8,
    },

    /// A Stream Stop arrived while no stream block was open.
    #[error("pgoutput {} message at offset 0: Stream Stop outside a stream block", ShowTag(*.tag))]
    OutsideStream {
        /// Message tag.
        tag: u8,
    },
}

impl DecodeError {
    /// The tag of the message that failed, if the message had one.
    pub fn tag(&self) -> Option<u8> {
        match *self {
            DecodeError::Empty => None,
            DecodeError::UnknownTag { tag }
            | DecodeError::UnexpectedEnd { tag, .. }
            | DecodeError::NonZeroFlags { tag, .. }
            | DecodeError::InvalidTupleKind { tag, .. }
            | DecodeError::InvalidTupleMarker { tag, .. }
            | DecodeError::InvalidReplicaIdentity { tag, .. }
            | DecodeError::UnterminatedString { tag, .. }
            | DecodeError::InvalidUtf8 { tag, .. }
            | DecodeError::NegativeLength { tag, .. }
            | DecodeError::TrailingBytes { tag, .. }
            | DecodeError::InsideStream { tag }
            | DecodeError::OutsideStream { tag } => Some(tag),
        }
    }

    /// Byte offset inside the message where the problem was found.
    pub fn offset(&self) -> usize {
        match *self {
            DecodeError::Empty
            | DecodeError::UnknownTag { .. }
            | DecodeError::InsideStream { .. }
            | DecodeError::OutsideStream { .. } => 0,
            DecodeError::UnexpectedEnd { offset, .. }
            | DecodeError::NonZeroFlags { offset, .. }
            | DecodeError::InvalidTupleKind { offset, .. }
            | DecodeError::InvalidTupleMarker { offset, .. }
            | DecodeError::InvalidReplicaIdentity { offset, .. }
            | DecodeError::UnterminatedString { offset, .. }
            | DecodeError::InvalidUtf8 { offset, .. }
            | DecodeError::NegativeLength { offset, .. }
            | DecodeError::TrailingBytes { offset, .. } => offset,
        }
    }
}

/// Prints a tag as `'U'` when it is a printable ASCII character, else as `0x..`.
pub(crate) struct ShowTag(pub u8);

impl fmt::Display for ShowTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", char::from(self.0))
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}
