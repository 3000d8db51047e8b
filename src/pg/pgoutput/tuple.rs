//! TupleData: the column values of one row, validated once and then read without errors.

use std::fmt;

use super::reader::Reader;
use super::DecodeError;

/// One column value of a [`TupleData`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Cell<'a> {
    /// `'n'`: SQL NULL.
    Null,
    /// `'u'`: an out-of-line TOASTed value the UPDATE did not change; the server did not
    /// send it. With REPLICA IDENTITY FULL the old tuple carries it; otherwise the value is
    /// unknown to the stream.
    Unchanged,
    /// `'t'`: the type's text output, in the client encoding, without a NUL.
    Text(&'a [u8]),
    /// `'b'`: the type's binary send output (only with the `binary` option, PG14+).
    Binary(&'a [u8]),
}

impl<'a> Cell<'a> {
    /// True for [`Cell::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Cell::Null)
    }

    /// True for [`Cell::Unchanged`].
    pub fn is_unchanged(&self) -> bool {
        matches!(self, Cell::Unchanged)
    }

    /// The value bytes of a text or binary cell.
    pub fn bytes(&self) -> Option<&'a [u8]> {
        match *self {
            Cell::Text(b) | Cell::Binary(b) => Some(b),
            Cell::Null | Cell::Unchanged => None,
        }
    }
}

impl fmt::Debug for Cell<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cell::Null => f.write_str("Null"),
            Cell::Unchanged => f.write_str("Unchanged"),
            Cell::Text(b) => write!(f, "Text(\"{}\")", b.escape_ascii()),
            Cell::Binary(b) => write!(f, "Binary(\"{}\")", b.escape_ascii()),
        }
    }
}

/// The columns of one row as sent on the wire, borrowed from the message.
///
/// The layout was checked when the message was decoded, so iterating cannot fail. Positions
/// follow the columns of the table's last Relation message (not `attnum`); compare
/// [`TupleData::len`] with that Relation's column count before using the values.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TupleData<'a> {
    ncols: u16,
    /// The cells, starting after the `Int16` column count.
    raw: &'a [u8],
}

impl<'a> TupleData<'a> {
    /// Reads `Int16 ncols` and the cells, checking kinds and lengths.
    pub(super) fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let ncols = r.u16()?;
        let start = r.pos();
        for _ in 0..ncols {
            let offset = r.pos();
            match r.u8()? {
                b'n' | b'u' => {}
                b't' | b'b' => {
                    let len = r.len_i32()?;
                    r.take(len)?;
                }
                kind => {
                    return Err(DecodeError::InvalidTupleKind {
                        tag: r.tag(),
                        offset,
                        kind,
                    })
                }
            }
        }
        Ok(TupleData {
            ncols,
            raw: r.since(start),
        })
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        usize::from(self.ncols)
    }

    /// True when the tuple has no columns.
    pub fn is_empty(&self) -> bool {
        self.ncols == 0
    }

    /// The cells in column order.
    pub fn iter(&self) -> Cells<'a> {
        Cells {
            rest: self.raw,
            remaining: self.ncols,
        }
    }

    /// The cell at position `i` (a linear scan; iterate when you need them all).
    pub fn get(&self, i: usize) -> Option<Cell<'a>> {
        self.iter().nth(i)
    }

    /// The encoded cells exactly as received (without the leading column count).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }
}

impl fmt::Debug for TupleData<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> IntoIterator for TupleData<'a> {
    type Item = Cell<'a>;
    type IntoIter = Cells<'a>;

    fn into_iter(self) -> Cells<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for &TupleData<'a> {
    type Item = Cell<'a>;
    type IntoIter = Cells<'a>;

    fn into_iter(self) -> Cells<'a> {
        self.iter()
    }
}

/// Iterator over the cells of a [`TupleData`].
#[derive(Clone, Debug)]
pub struct Cells<'a> {
    rest: &'a [u8],
    remaining: u16,
}

impl<'a> Cells<'a> {
    /// Splits off the next cell. `None` only if the bytes were not validated, which the
    /// constructor rules out; it keeps this path free of panics anyway.
    fn split(&self) -> Option<(Cell<'a>, &'a [u8])> {
        let (&kind, tail) = self.rest.split_first()?;
        match kind {
            b'n' => Some((Cell::Null, tail)),
            b'u' => Some((Cell::Unchanged, tail)),
            b't' | b'b' => {
                let (len, tail) = tail.split_first_chunk::<4>()?;
                let len = usize::try_from(i32::from_be_bytes(*len)).ok()?;
                let (value, tail) = tail.split_at_checked(len)?;
                let cell = if kind == b't' {
                    Cell::Text(value)
                } else {
                    Cell::Binary(value)
                };
                Some((cell, tail))
            }
            _ => None,
        }
    }
}

impl<'a> Iterator for Cells<'a> {
    type Item = Cell<'a>;

    fn next(&mut self) -> Option<Cell<'a>> {
        self.remaining = self.remaining.checked_sub(1)?;
        match self.split() {
            Some((cell, tail)) => {
                self.rest = tail;
                Some(cell)
            }
            None => {
                self.remaining = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::from(self.remaining);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Cells<'_> {}

impl std::iter::FusedIterator for Cells<'_> {}
