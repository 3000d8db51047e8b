//! A bounds-checked big-endian cursor over one pgoutput message.
//!
//! Every read either returns borrowed data or a [`DecodeError`] naming the message tag and
//! the offset; nothing here can panic or overflow.

use super::DecodeError;
use crate::pg::Lsn;

pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    tag: u8,
}

impl<'a> Reader<'a> {
    /// A reader positioned after the tag byte (offset 1).
    pub(super) fn new(buf: &'a [u8], tag: u8) -> Self {
        Reader { buf, pos: 1, tag }
    }

    pub(super) fn tag(&self) -> u8 {
        self.tag
    }

    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The bytes between `start` and the current position.
    pub(super) fn since(&self, start: usize) -> &'a [u8] {
        self.buf.get(start..self.pos).unwrap_or_default()
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let eof = DecodeError::UnexpectedEnd {
            tag: self.tag,
            offset: self.pos,
            need: n,
        };
        let end = self.pos.checked_add(n).ok_or(eof.clone())?;
        let s = self.buf.get(self.pos..end).ok_or(eof)?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let offset = self.pos;
        let s = self.take(N)?;
        <[u8; N]>::try_from(s).map_err(|_| DecodeError::UnexpectedEnd {
            tag: self.tag,
            offset,
            need: N,
        })
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(|[b]| b)
    }

    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    pub(super) fn i32(&mut self) -> Result<i32, DecodeError> {
        self.array().map(i32::from_be_bytes)
    }

    pub(super) fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }

    pub(super) fn i64(&mut self) -> Result<i64, DecodeError> {
        self.array().map(i64::from_be_bytes)
    }

    pub(super) fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        self.u64().map(Lsn)
    }

    /// An `Int8` flags field that PostgreSQL's reader insists is zero.
    pub(super) fn zero_flags(&mut self) -> Result<(), DecodeError> {
        let offset = self.pos;
        match self.u8()? {
            0 => Ok(()),
            flags => Err(DecodeError::NonZeroFlags {
                tag: self.tag,
                offset,
                flags,
            }),
        }
    }

    /// An `Int32` length or count, which must not be negative.
    pub(super) fn len_i32(&mut self) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let len = self.i32()?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength {
            tag: self.tag,
            offset,
            len,
        })
    }

    /// A NUL-terminated string, which must be UTF-8 (the client encoding we ask for).
    pub(super) fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let start = self.pos;
        let rest = self.buf.get(start..).unwrap_or_default();
        let unterminated = DecodeError::UnterminatedString {
            tag: self.tag,
            offset: start,
        };
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(unterminated.clone())?;
        let bytes = rest.get(..nul).ok_or(unterminated.clone())?;
        let s = std::str::from_utf8(bytes).map_err(|e| DecodeError::InvalidUtf8 {
            tag: self.tag,
            offset: start.saturating_add(e.valid_up_to()),
        })?;
        // nul < rest.len(), so both sums stay inside the buffer length.
        self.pos = start
            .checked_add(nul)
            .and_then(|p| p.checked_add(1))
            .ok_or(unterminated)?;
        Ok(s)
    }

    /// Succeeds only if every byte of the message was consumed.
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                tag: self.tag,
                offset: self.pos,
                count,
            }),
        }
    }
}
