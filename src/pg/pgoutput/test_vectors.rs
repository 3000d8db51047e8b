//! The pgoutput messages captured from PostgreSQL 15 in `tests/vectors/*.hex`.
//!
//! Each line is `LSN XID HEX` (one message, as `pg_logical_slot_peek_binary_changes`
//! returned it); `#` lines are comments. The matching `.sql` files hold the workloads.

use crate::pg::Lsn;

/// One captured message.
pub(crate) struct Vector {
    /// The `lsn` column: the WAL record the message came from.
    pub lsn: Lsn,
    /// The `xid` column (0 for non-transactional messages).
    pub xid: u32,
    /// The message bytes.
    pub bytes: Vec<u8>,
}

pub(crate) const BASIC: &str = include_str!("../../../tests/vectors/basic.hex");
pub(crate) const REPLICA_IDENTITY: &str =
    include_str!("../../../tests/vectors/replica_identity.hex");
pub(crate) const PK_CHANGE: &str = include_str!("../../../tests/vectors/pk_change.hex");
pub(crate) const TOAST: &str = include_str!("../../../tests/vectors/toast.hex");
pub(crate) const TRUNCATE: &str = include_str!("../../../tests/vectors/truncate.hex");
pub(crate) const MESSAGE: &str = include_str!("../../../tests/vectors/message.hex");
pub(crate) const STREAMING: &str = include_str!("../../../tests/vectors/streaming.hex");
pub(crate) const NULLS: &str = include_str!("../../../tests/vectors/nulls.hex");
pub(crate) const TYPES: &str = include_str!("../../../tests/vectors/types.hex");
pub(crate) const TWO_PHASE: &str = include_str!("../../../tests/vectors/two_phase.hex");
pub(crate) const TWO_PHASE_STREAMED: &str =
    include_str!("../../../tests/vectors/two_phase_streamed.hex");
pub(crate) const STREAMING_PARALLEL: &str =
    include_str!("../../../tests/vectors/streaming_parallel.hex");

/// Every capture, by name.
pub(crate) const ALL: [(&str, &str); 12] = [
    ("basic", BASIC),
    ("replica_identity", REPLICA_IDENTITY),
    ("pk_change", PK_CHANGE),
    ("toast", TOAST),
    ("truncate", TRUNCATE),
    ("message", MESSAGE),
    ("streaming", STREAMING),
    ("nulls", NULLS),
    ("types", TYPES),
    ("two_phase", TWO_PHASE),
    ("two_phase_streamed", TWO_PHASE_STREAMED),
    ("streaming_parallel", STREAMING_PARALLEL),
];

/// Decodes a hex string (no separators).
pub(crate) fn unhex(s: &str) -> Vec<u8> {
    fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => panic!("bad hex digit {:?}", c as char),
        }
    }
    assert!(s.len().is_multiple_of(2), "odd-length hex");
    s.as_bytes()
        .chunks(2)
        .map(|p| (nibble(p[0]) << 4) | nibble(p[1]))
        .collect()
}

/// Parses a `.hex` capture.
pub(crate) fn load(text: &str) -> Vec<Vector> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut it = l.split_whitespace();
            let (Some(lsn), Some(xid), Some(hex), None) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                panic!("malformed vector line {l:?}");
            };
            Vector {
                lsn: lsn.parse().expect("lsn"),
                xid: xid.parse().expect("xid"),
                bytes: unhex(hex),
            }
        })
        .collect()
}
