//! The CopyData messages of the streaming replication protocol (`START_REPLICATION`).
//!
//! Server to client: `'w'` XLogData, whose payload is exactly one pgoutput message (decode
//! it with [`crate::pg::pgoutput::Decoder`]), and `'k'` primary keepalive. Client to server:
//! `'r'` standby status update, encoded into a fixed 34-byte array without allocating.
//! All integers are big-endian; times are µs since 2000-01-01 UTC.

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

use std::time::{SystemTime, UNIX_EPOCH};

use crate::pg::pgoutput::{unix_to_pg_micros, ShowTag};
use crate::pg::Lsn;

/// Tag of XLogData.
pub const XLOG_DATA_TAG: u8 = b'w';
/// Tag of the primary keepalive.
pub const KEEPALIVE_TAG: u8 = b'k';
/// Tag of the standby status update.
pub const STATUS_UPDATE_TAG: u8 = b'r';
/// Length of the XLogData header (tag, dataStart, walEnd, sendTime).
pub const XLOG_DATA_HEADER_LEN: usize = 25;
/// Length of a primary keepalive.
pub const KEEPALIVE_LEN: usize = 18;

/// A CopyData message the server sends during logical replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMessage<'a> {
    /// `'w'`: one pgoutput message with its WAL position.
    XLogData(XLogData<'a>),
    /// `'k'`: the server's WAL position and a possible request for a status update.
    Keepalive(PrimaryKeepalive),
}

/// `'w'` XLogData.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XLogData<'a> {
    /// `dataStart`. For pgoutput: the change's LSN, the commit's end LSN for Commit, and 0
    /// for Relation/Type messages (the server sends them with "not a last write").
    pub wal_start: Lsn,
    /// `walEnd`: same value as `wal_start` in logical mode, *not* the server's end of WAL
    /// (use the keepalive for that).
    pub wal_end: Lsn,
    /// Server clock when sent, µs since 2000-01-01 UTC.
    pub send_time: i64,
    /// The pgoutput message, borrowed from the CopyData buffer.
    pub data: &'a [u8],
}

/// `'k'` primary keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryKeepalive {
    /// The end of the WAL the walsender has processed.
    pub wal_end: Lsn,
    /// Server clock when sent, µs since 2000-01-01 UTC.
    pub send_time: i64,
    /// The server wants a status update now, or it may drop the connection on timeout.
    pub reply_requested: bool,
}

/// A CopyData message from the server that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The CopyData payload had no bytes.
    #[error("replication protocol: empty CopyData message")]
    Empty,
    /// The first byte is neither `'w'` nor `'k'`.
    #[error("replication protocol: unknown CopyData message tag 0x{tag:02x} at offset 0")]
    UnknownTag {
        /// The unknown first byte.
        tag: u8,
    },
    /// The message is shorter than its fixed header.
    #[error("replication protocol {} message: unexpected end of data at offset {offset} (need {need} bytes)", ShowTag(*.tag))]
    UnexpectedEnd {
        /// Message tag.
        tag: u8,
        /// Offset of the incomplete field.
        offset: usize,
        /// Bytes the field needs.
        need: usize,
    },
}

/// Big-endian field reads at fixed offsets; short input is reported, never indexed.
struct Fields<'a> {
    buf: &'a [u8],
    tag: u8,
}

impl<'a> Fields<'a> {
    fn array<const N: usize>(&self, offset: usize) -> Result<[u8; N], FramingError> {
        let eof = FramingError::UnexpectedEnd {
            tag: self.tag,
            offset,
            need: N,
        };
        let end = offset.checked_add(N).ok_or(eof.clone())?;
        let s = self.buf.get(offset..end).ok_or(eof.clone())?;
        <[u8; N]>::try_from(s).map_err(|_| eof)
    }

    fn u64(&self, offset: usize) -> Result<u64, FramingError> {
        self.array(offset).map(u64::from_be_bytes)
    }

    fn i64(&self, offset: usize) -> Result<i64, FramingError> {
        self.array(offset).map(i64::from_be_bytes)
    }

    fn u8(&self, offset: usize) -> Result<u8, FramingError> {
        self.array::<1>(offset).map(|[b]| b)
    }

    fn rest(&self, offset: usize) -> &'a [u8] {
        self.buf.get(offset..).unwrap_or_default()
    }
}

/// Parses one CopyData payload received after `START_REPLICATION`.
///
/// A keepalive longer than 18 bytes is accepted and the extra bytes ignored, like
/// `pg_recvlogical` does, so that a field appended by a later server does not stop us.
pub fn parse_copy_data(buf: &[u8]) -> Result<ReplicationMessage<'_>, FramingError> {
    let (&tag, _) = buf.split_first().ok_or(FramingError::Empty)?;
    let f = Fields { buf, tag };
    match tag {
        XLOG_DATA_TAG => Ok(ReplicationMessage::XLogData(XLogData {
            wal_start: Lsn(f.u64(1)?),
            wal_end: Lsn(f.u64(9)?),
            send_time: f.i64(17)?,
            data: f.rest(XLOG_DATA_HEADER_LEN),
        })),
        KEEPALIVE_TAG => Ok(ReplicationMessage::Keepalive(PrimaryKeepalive {
            wal_end: Lsn(f.u64(1)?),
            send_time: f.i64(9)?,
            reply_requested: f.u8(17)? != 0,
        })),
        tag => Err(FramingError::UnknownTag { tag }),
    }
}

/// `'r'` standby status update, the client's report of its progress.
///
/// `flush` is what moves the logical slot (`confirmed_flush_lsn`): report there only what is
/// durable downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    /// Last WAL byte + 1 received.
    pub write: Lsn,
    /// Last WAL byte + 1 made durable; the server may discard WAL before it.
    pub flush: Lsn,
    /// Last WAL byte + 1 applied (shown as `replay_lsn` in `pg_stat_replication`).
    pub apply: Lsn,
    /// Client clock, µs since 2000-01-01 UTC (see [`now_pg_micros`]).
    pub client_time: i64,
    /// Ask the server for an immediate keepalive.
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// Encoded length.
    pub const LEN: usize = 34;

    /// The 34-byte CopyData payload.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        self.encode_into(&mut out);
        out
    }

    /// Writes the CopyData payload into `out`.
    pub fn encode_into(&self, out: &mut [u8; Self::LEN]) {
        out[0] = STATUS_UPDATE_TAG;
        out[1..9].copy_from_slice(&self.write.0.to_be_bytes());
        out[9..17].copy_from_slice(&self.flush.0.to_be_bytes());
        out[17..25].copy_from_slice(&self.apply.0.to_be_bytes());
        out[25..33].copy_from_slice(&self.client_time.to_be_bytes());
        out[33] = u8::from(self.reply_requested);
    }
}

/// The current time as µs since 2000-01-01 UTC, for [`StandbyStatusUpdate::client_time`].
pub fn now_pg_micros() -> i64 {
    let unix_micros = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        // A clock set before 1970: still report it faithfully.
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, i64::wrapping_neg),
    };
    unix_to_pg_micros(unix_micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::pgoutput::test_vectors::{self, load, unhex};
    use crate::pg::pgoutput::{pg_to_unix_micros, Decoder};
    use proptest::prelude::*;

    /// Builds a `'w'` frame around a pgoutput message, as the walsender does.
    fn xlog(lsn: u64, send_time: i64, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![b'w'];
        v.extend_from_slice(&lsn.to_be_bytes());
        v.extend_from_slice(&lsn.to_be_bytes());
        v.extend_from_slice(&send_time.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn keepalive_from_appendix_a8() {
        // `k walEnd=0/15E0158 reply=0 (18 bytes)`.
        let k = unhex(concat!("6b", "00000000015e0158", "000303cd19d80fad", "00"));
        assert_eq!(k.len(), KEEPALIVE_LEN);
        assert_eq!(
            parse_copy_data(&k),
            Ok(ReplicationMessage::Keepalive(PrimaryKeepalive {
                wal_end: "0/15E0158".parse().unwrap(),
                send_time: 0x000303cd19d80fad,
                reply_requested: false,
            }))
        );
        let mut ask = k.clone();
        ask[17] = 1;
        let Ok(ReplicationMessage::Keepalive(ka)) = parse_copy_data(&ask) else {
            panic!("not a keepalive")
        };
        assert!(ka.reply_requested);
        // Extra bytes from a hypothetical later server are ignored.
        ask.push(7);
        assert_eq!(parse_copy_data(&ask), Ok(ReplicationMessage::Keepalive(ka)));
    }

    #[test]
    fn xlogdata_transaction_from_appendix_a8() {
        // Begin at the first change's LSN, Relation at 0/0, Insert at the change's LSN,
        // Commit at its end LSN: the header values seen on a 15.20 walsender.
        let vs = load(test_vectors::BASIC);
        let frames = [
            (0x15E0158, &vs[0].bytes),
            (0, &vs[1].bytes),
            (0x15E0158, &vs[2].bytes),
            (0x15E0158, &vs[3].bytes),
            (0x15E0270, &vs[4].bytes),
        ];
        let mut d = Decoder::new();
        let mut tags = String::new();
        for (lsn, payload) in frames {
            let frame = xlog(lsn, 0x000303cd19d80fad, payload);
            let Ok(ReplicationMessage::XLogData(x)) = parse_copy_data(&frame) else {
                panic!("not XLogData")
            };
            assert_eq!((x.wal_start, x.wal_end), (Lsn(lsn), Lsn(lsn)));
            assert_eq!(x.send_time, 0x000303cd19d80fad);
            assert_eq!(x.data, payload.as_slice());
            // Borrowed from the frame, not copied.
            assert!(frame.as_ptr_range().contains(&x.data.as_ptr()));
            tags.push(char::from(d.decode(x.data).unwrap().tag()));
        }
        assert_eq!(tags, "BRIIC");
        // A header without payload parses; the empty payload is the decoder's error.
        let header_only = xlog(1, 2, &[]);
        let Ok(ReplicationMessage::XLogData(x)) = parse_copy_data(&header_only) else {
            panic!("not XLogData")
        };
        assert!(x.data.is_empty());
        assert!(matches!(
            Decoder::new().decode(x.data),
            Err(crate::pg::pgoutput::DecodeError::Empty)
        ));
    }

    #[test]
    fn standby_status_update_from_appendix_a8() {
        // `72 | 00000000015e0328 ×3 | <i64 now-2000epoch µs> | 00`.
        let update = StandbyStatusUpdate {
            write: Lsn(0x15e0328),
            flush: Lsn(0x15e0328),
            apply: Lsn(0x15e0328),
            client_time: 0x000303cd19d80fad,
            reply_requested: false,
        };
        let want = unhex(concat!(
            "72",
            "00000000015e0328",
            "00000000015e0328",
            "00000000015e0328",
            "000303cd19d80fad",
            "00"
        ));
        assert_eq!(update.encode().as_slice(), want.as_slice());
        let mut buf = [0xAAu8; StandbyStatusUpdate::LEN];
        StandbyStatusUpdate {
            reply_requested: true,
            flush: Lsn(0x0102_0304_0506_0708),
            ..update
        }
        .encode_into(&mut buf);
        assert_eq!(buf[0], b'r');
        assert_eq!(buf[9..17], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(buf[33], 1);
    }

    #[test]
    fn errors_name_tag_and_offset() {
        assert_eq!(parse_copy_data(&[]), Err(FramingError::Empty));
        assert_eq!(
            parse_copy_data(b"x").unwrap_err().to_string(),
            "replication protocol: unknown CopyData message tag 0x78 at offset 0"
        );
        let short_w = xlog(1, 2, &[]);
        assert_eq!(
            parse_copy_data(&short_w[..24]).unwrap_err().to_string(),
            "replication protocol 'w' message: unexpected end of data at offset 17 (need 8 bytes)"
        );
        let k = unhex(concat!("6b", "00000000015e0158", "000303cd19d80fad", "00"));
        assert_eq!(
            parse_copy_data(&k[..17]),
            Err(FramingError::UnexpectedEnd {
                tag: b'k',
                offset: 17,
                need: 1
            })
        );
        assert_eq!(
            parse_copy_data(&k[..3]),
            Err(FramingError::UnexpectedEnd {
                tag: b'k',
                offset: 1,
                need: 8
            })
        );
    }

    #[test]
    fn now_is_in_the_postgres_epoch() {
        let now = now_pg_micros();
        let unix = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64;
        assert!((pg_to_unix_micros(now) - unix).abs() < 60_000_000);
        assert!(now > 0, "after 2000-01-01");
    }

    proptest! {
        #[test]
        fn random_copy_data_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_copy_data(&bytes);
            let mut w = bytes.clone();
            w.insert(0, b'w');
            let _ = parse_copy_data(&w);
            w[0] = b'k';
            let _ = parse_copy_data(&w);
        }

        #[test]
        fn xlogdata_header_round_trips(
            lsn in any::<u64>(),
            t in any::<i64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let frame = xlog(lsn, t, &payload);
            prop_assert_eq!(
                parse_copy_data(&frame),
                Ok(ReplicationMessage::XLogData(XLogData {
                    wal_start: Lsn(lsn),
                    wal_end: Lsn(lsn),
                    send_time: t,
                    data: &payload,
                }))
            );
        }
    }
}
