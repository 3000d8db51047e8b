//! The pgoutput message bodies and their readers.
//!
//! Field order and sizes follow PostgreSQL's `src/backend/replication/logical/proto.c`.
//! Each reader starts after the tag byte and, for messages that can appear inside a stream
//! block, after the optional `xid` prefix (read by the caller).

use super::reader::Reader;
use super::tuple::TupleData;
use super::DecodeError;
use crate::pg::Lsn;

/// `'B'`: start of a (non-streamed) transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record; equals the matching [`Commit::commit_lsn`].
    pub final_lsn: Lsn,
    /// Commit time, µs since 2000-01-01 UTC (see [`super::pg_to_unix_micros`]).
    pub commit_time: i64,
    /// Top-level transaction id.
    pub xid: u32,
}

impl Begin {
    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Begin {
            final_lsn: r.lsn()?,
            commit_time: r.i64()?,
            xid: r.u32()?,
        })
    }
}

/// `'C'`: end of a transaction started by [`Begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Start of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to acknowledge once the transaction is durable.
    pub end_lsn: Lsn,
    /// Commit time, µs since 2000-01-01 UTC.
    pub commit_time: i64,
}

impl Commit {
    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.zero_flags()?;
        Ok(Commit {
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.i64()?,
        })
    }
}

/// `'O'`: the transaction came from another node through a replication origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    /// Commit LSN on the origin node (0 when sent after a Stream Start).
    pub origin_lsn: Lsn,
    /// Name of the replication origin.
    pub name: &'a str,
}

impl<'a> Origin<'a> {
    pub(super) fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(Origin {
            origin_lsn: r.lsn()?,
            name: r.cstr()?,
        })
    }
}

/// A table's `REPLICA IDENTITY` setting (`pg_class.relreplident`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `'d'`: the primary key (old key sent only when it changes).
    Default,
    /// `'n'`: nothing.
    Nothing,
    /// `'f'`: the whole old row.
    Full,
    /// `'i'`: the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// Maps the wire byte; `None` for anything PostgreSQL does not define.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }

    /// The wire byte.
    pub fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }
}

/// One published column of a [`Relation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column<'a> {
    /// Column flags; bit 0 ([`Column::FLAG_KEY`]) marks replica identity columns.
    pub flags: u8,
    /// Column name.
    pub name: &'a str,
    /// `atttypid`: for user types look the OID up in the Type messages.
    pub type_oid: u32,
    /// `atttypmod` (-1 when the type has none).
    pub type_modifier: i32,
}

impl Column<'_> {
    /// Flag bit: the column is part of the replica identity (every column under FULL).
    pub const FLAG_KEY: u8 = 1;

    /// True when the column is part of the replica identity.
    pub fn is_key(&self) -> bool {
        self.flags & Self::FLAG_KEY != 0
    }
}

/// `'R'`: the shape of a table. TupleData positions follow [`Relation::columns`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation<'a> {
    /// The (sub)transaction id when sent inside a stream block.
    pub xid: Option<u32>,
    /// Table OID, which DML messages refer to.
    pub relid: u32,
    /// Schema name; the empty string means `pg_catalog`.
    pub namespace: &'a str,
    /// Table name.
    pub name: &'a str,
    /// The table's replica identity.
    pub replica_identity: ReplicaIdentity,
    /// Published columns in tuple order.
    pub columns: Vec<Column<'a>>,
}

impl<'a> Relation<'a> {
    pub(super) fn read(r: &mut Reader<'a>, xid: Option<u32>) -> Result<Self, DecodeError> {
        let relid = r.u32()?;
        let namespace = r.cstr()?;
        let name = r.cstr()?;
        let offset = r.pos();
        let value = r.u8()?;
        let replica_identity =
            ReplicaIdentity::from_byte(value).ok_or(DecodeError::InvalidReplicaIdentity {
                tag: r.tag(),
                offset,
                value,
            })?;
        let ncols = r.u16()?;
        // A column takes at least 10 bytes; bound the allocation by what is really there.
        let mut columns = Vec::with_capacity(usize::from(ncols).min(r.remaining() / 10));
        for _ in 0..ncols {
            columns.push(Column {
                flags: r.u8()?,
                name: r.cstr()?,
                type_oid: r.u32()?,
                type_modifier: r.i32()?,
            });
        }
        Ok(Relation {
            xid,
            relid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }
}

/// `'Y'`: the name of a non-built-in type used by a following Relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Type<'a> {
    /// The (sub)transaction id when sent inside a stream block.
    pub xid: Option<u32>,
    /// The column's type OID (for a domain, the domain's OID).
    pub oid: u32,
    /// Schema of the *base* type; the empty string means `pg_catalog`.
    pub namespace: &'a str,
    /// Name of the *base* type (a domain over `int` arrives as `int4`).
    pub name: &'a str,
}

impl<'a> Type<'a> {
    pub(super) fn read(r: &mut Reader<'a>, xid: Option<u32>) -> Result<Self, DecodeError> {
        Ok(Type {
            xid,
            oid: r.u32()?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        })
    }
}

/// Reads the marker byte in front of a tuple and checks it is one of `allowed`.
fn marker(r: &mut Reader<'_>, allowed: &[u8], expected: &'static str) -> Result<u8, DecodeError> {
    let offset = r.pos();
    let found = r.u8()?;
    if allowed.contains(&found) {
        Ok(found)
    } else {
        Err(DecodeError::InvalidTupleMarker {
            tag: r.tag(),
            offset,
            expected,
            found,
        })
    }
}

/// `'I'`: a new row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insert<'a> {
    /// The (sub)transaction id when sent inside a stream block.
    pub xid: Option<u32>,
    /// Table OID.
    pub relid: u32,
    /// The new row.
    pub new: TupleData<'a>,
}

impl<'a> Insert<'a> {
    pub(super) fn read(r: &mut Reader<'a>, xid: Option<u32>) -> Result<Self, DecodeError> {
        let relid = r.u32()?;
        marker(r, b"N", "'N'")?;
        Ok(Insert {
            xid,
            relid,
            new: TupleData::read(r)?,
        })
    }
}

/// The old row an UPDATE or DELETE carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldTuple<'a> {
    /// `'K'`: replica identity key columns. Full width: non-key columns are NULL.
    Key(TupleData<'a>),
    /// `'O'`: the whole old row (REPLICA IDENTITY FULL), TOASTed values included.
    Full(TupleData<'a>),
}

impl<'a> OldTuple<'a> {
    /// The tuple, whichever kind it is.
    pub fn tuple(&self) -> TupleData<'a> {
        match *self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }

    /// True for [`OldTuple::Key`].
    pub fn is_key(&self) -> bool {
        matches!(self, OldTuple::Key(_))
    }

    fn read(r: &mut Reader<'a>, marker: u8) -> Result<Self, DecodeError> {
        let t = TupleData::read(r)?;
        Ok(if marker == b'K' {
            OldTuple::Key(t)
        } else {
            OldTuple::Full(t)
        })
    }
}

/// `'U'`: a changed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Update<'a> {
    /// The (sub)transaction id when sent inside a stream block.
    pub xid: Option<u32>,
    /// Table OID.
    pub relid: u32,
    /// The old row: always under FULL; under DEFAULT/INDEX only when the key changed (or a
    /// key column is stored out of line).
    pub old: Option<OldTuple<'a>>,
    /// The new row; [`super::Cell::Unchanged`] marks TOASTed values that were not sent.
    pub new: TupleData<'a>,
}

impl<'a> Update<'a> {
    pub(super) fn read(r: &mut Reader<'a>, xid: Option<u32>) -> Result<Self, DecodeError> {
        let relid = r.u32()?;
        let m = marker(r, b"KON", "'K', 'O' or 'N'")?;
        let old = if m == b'N' {
            None
        } else {
            let old = OldTuple::read(r, m)?;
            marker(r, b"N", "'N'")?;
            Some(old)
        };
        Ok(Update {
            xid,
            relid,
            old,
            new: TupleData::read(r)?,
        })
    }
}

/// `'D'`: a removed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delete<'a> {
    /// The (sub)transaction id when sent inside a stream block.
    pub xid: Option<u32>,
    /// Table OID.
    pub relid: u32,
    /// The old key (DEFAULT/INDEX) or the whole old row (FULL).
    pub old: OldTuple<'a>,
}

impl<'a> Delete<'a> {
    pub(super) fn read(r: &mut Reader<'a>, xid: Option<u32>) -> Result<Self, DecodeError> {
        let relid = r.u32()?;
        let m = marker(r, b"KO", "'K' or 'O'")?;
        Ok(Delete {
            xid,
            relid,
            old: OldTuple::read(r, m)?,
        })
    }
}

/// `'T'`: TRUNCATE of one or more tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// The (sub)transaction id when sent inside a stream block.
    pub xid: Option<u32>,
    /// Option bits: [`Truncate::CASCADE`], [`Truncate::RESTART_IDENTITY`].
    pub flags: u8,
    /// The truncated tables that publish truncates.
    pub relids: Vec<u32>,
}

impl Truncate {
    /// Flag bit: `TRUNCATE ... CASCADE`.
    pub const CASCADE: u8 = 1;
    /// Flag bit: `TRUNCATE ... RESTART IDENTITY`.
    pub const RESTART_IDENTITY: u8 = 2;

    /// True when the statement had `CASCADE`.
    pub fn cascade(&self) -> bool {
        self.flags & Self::CASCADE != 0
    }

    /// True when the statement had `RESTART IDENTITY`.
    pub fn restart_identity(&self) -> bool {
        self.flags & Self::RESTART_IDENTITY != 0
    }

    pub(super) fn read(r: &mut Reader<'_>, xid: Option<u32>) -> Result<Self, DecodeError> {
        let nrelids = r.len_i32()?;
        let flags = r.u8()?;
        // Bound the allocation by the bytes present, so a bogus count cannot exhaust memory.
        let mut relids = Vec::with_capacity(nrelids.min(r.remaining() / 4));
        for _ in 0..nrelids {
            relids.push(r.u32()?);
        }
        Ok(Truncate { xid, flags, relids })
    }
}

/// `'M'`: a logical decoding message (`pg_logical_emit_message`, needs `messages 'true'`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// The (sub)transaction id when sent inside a stream block.
    pub xid: Option<u32>,
    /// Flag bits; [`Message::TRANSACTIONAL`] is the only one defined.
    pub flags: u8,
    /// LSN of the message's WAL record.
    pub lsn: Lsn,
    /// The prefix given to `pg_logical_emit_message`.
    pub prefix: &'a str,
    /// The content, as bytes.
    pub content: &'a [u8],
}

impl<'a> Message<'a> {
    /// Flag bit: the message is part of a transaction (sent inside Begin..Commit and lost if
    /// it aborts); otherwise it was sent on its own as soon as it was decoded.
    pub const TRANSACTIONAL: u8 = 1;

    /// True for transactional messages.
    pub fn transactional(&self) -> bool {
        self.flags & Self::TRANSACTIONAL != 0
    }

    pub(super) fn read(r: &mut Reader<'a>, xid: Option<u32>) -> Result<Self, DecodeError> {
        let flags = r.u8()?;
        let lsn = r.lsn()?;
        let prefix = r.cstr()?;
        let len = r.len_i32()?;
        Ok(Message {
            xid,
            flags,
            lsn,
            prefix,
            content: r.take(len)?,
        })
    }
}

/// `'S'`: opens a stream block of an in-progress transaction (proto ≥ 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStart {
    /// Top-level transaction id; key per-transaction buffers by it.
    pub xid: u32,
    /// True on the first block of this transaction.
    pub first_segment: bool,
}

impl StreamStart {
    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(StreamStart {
            xid: r.u32()?,
            // Like PostgreSQL's reader: only 1 means "first".
            first_segment: r.u8()? == 1,
        })
    }
}

/// `'c'`: a streamed transaction committed (sent outside any block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCommit {
    /// Top-level transaction id.
    pub xid: u32,
    /// Start of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to acknowledge.
    pub end_lsn: Lsn,
    /// Commit time, µs since 2000-01-01 UTC.
    pub commit_time: i64,
}

impl StreamCommit {
    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let xid = r.u32()?;
        r.zero_flags()?;
        Ok(StreamCommit {
            xid,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.i64()?,
        })
    }
}

/// `'A'`: a streamed transaction, or one of its subtransactions, aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAbort {
    /// Top-level transaction id.
    pub xid: u32,
    /// The aborted (sub)transaction. Equal to `xid`: drop the whole transaction. Otherwise
    /// drop the changes from the point where `subxid` first appeared.
    pub subxid: u32,
    /// Abort LSN and time (µs since 2000-01-01): only sent with proto 4 and
    /// `streaming 'parallel'`.
    pub abort_info: Option<(Lsn, i64)>,
}

impl StreamAbort {
    /// True when the whole transaction is aborted, not only a subtransaction.
    pub fn is_whole_transaction(&self) -> bool {
        self.xid == self.subxid
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let xid = r.u32()?;
        let subxid = r.u32()?;
        // The tail is either absent or complete; anything else is left for `finish` to reject.
        let abort_info = if r.remaining() == 0 {
            None
        } else {
            Some((r.lsn()?, r.i64()?))
        };
        Ok(StreamAbort {
            xid,
            subxid,
            abort_info,
        })
    }
}

/// `'b'`: start of a prepared transaction (proto ≥ 3, two-phase). No flags byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeginPrepare<'a> {
    /// Start of the PREPARE record.
    pub prepare_lsn: Lsn,
    /// End of the PREPARE record.
    pub end_lsn: Lsn,
    /// Prepare time, µs since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier given to `PREPARE TRANSACTION`.
    pub gid: &'a str,
}

impl<'a> BeginPrepare<'a> {
    pub(super) fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(BeginPrepare {
            prepare_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            prepare_time: r.i64()?,
            xid: r.u32()?,
            gid: r.cstr()?,
        })
    }
}

/// `'P'` (Prepare) and `'p'` (Stream Prepare): the transaction was prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepare<'a> {
    /// Start of the PREPARE record.
    pub prepare_lsn: Lsn,
    /// End of the PREPARE record.
    pub end_lsn: Lsn,
    /// Prepare time, µs since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: &'a str,
}

impl<'a> Prepare<'a> {
    pub(super) fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        r.zero_flags()?;
        Ok(Prepare {
            prepare_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            prepare_time: r.i64()?,
            xid: r.u32()?,
            gid: r.cstr()?,
        })
    }
}

/// `'K'`: COMMIT PREPARED (standalone, not inside Begin..Commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPrepared<'a> {
    /// Start of the COMMIT PREPARED record.
    pub commit_lsn: Lsn,
    /// End of the COMMIT PREPARED record.
    pub end_lsn: Lsn,
    /// Commit time, µs since 2000-01-01 UTC.
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: &'a str,
}

impl<'a> CommitPrepared<'a> {
    pub(super) fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        r.zero_flags()?;
        Ok(CommitPrepared {
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.i64()?,
            xid: r.u32()?,
            gid: r.cstr()?,
        })
    }
}

/// `'r'`: ROLLBACK PREPARED (standalone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollbackPrepared<'a> {
    /// End of the PREPARE record.
    pub prepare_end_lsn: Lsn,
    /// End of the ROLLBACK PREPARED record.
    pub rollback_end_lsn: Lsn,
    /// Prepare time, µs since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// Rollback time, µs since 2000-01-01 UTC.
    pub rollback_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: &'a str,
}

impl<'a> RollbackPrepared<'a> {
    pub(super) fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        r.zero_flags()?;
        Ok(RollbackPrepared {
            prepare_end_lsn: r.lsn()?,
            rollback_end_lsn: r.lsn()?,
            prepare_time: r.i64()?,
            rollback_time: r.i64()?,
            xid: r.u32()?,
            gid: r.cstr()?,
        })
    }
}
