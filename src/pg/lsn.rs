//! WAL positions (`pg_lsn`): parsing and printing the `X/X` text form.

use std::fmt;
use std::str::FromStr;

/// A position in the write-ahead log, as PostgreSQL's `pg_lsn`.
///
/// Printed as `%X/%X` (upper / lower 32 bits in hex), which is what PostgreSQL up to 18
/// prints; parsing also accepts the zero-padded `%X/%08X` form newer servers print.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `InvalidXLogRecPtr`: "no position".
    pub const INVALID: Lsn = Lsn(0);

    /// Length of the longest text, `FFFFFFFF/FFFFFFFF`.
    pub const TEXT_MAX_LEN: usize = 17;

    /// The `X/X` text written into `buf`, without allocating.
    pub fn text(self, buf: &mut [u8; Lsn::TEXT_MAX_LEN]) -> &str {
        std::str::from_utf8(self.ascii(buf)).expect("hex digits are ASCII")
    }

    /// The `X/X` text as ASCII bytes written into `buf`. The one writer of LSN text:
    /// `Display`, message ids and the encoders all use it, since it runs several times per
    /// published message and `format!` costs several times more.
    pub fn ascii(self, buf: &mut [u8; Lsn::TEXT_MAX_LEN]) -> &[u8] {
        let mut n = push_hex32(buf, 0, (self.0 >> 32) as u32);
        buf[n] = b'/';
        n = push_hex32(buf, n + 1, self.0 as u32);
        &buf[..n]
    }
}

/// Writes `v` in uppercase hex without leading zeros at `buf[at..]`; returns the end.
fn push_hex32(buf: &mut [u8], mut at: usize, v: u32) -> usize {
    const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";
    let digits = (32 - v.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        buf[at] = HEX_UPPER[((v >> (4 * i)) & 0xF) as usize];
        at += 1;
    }
    at
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(l: Lsn) -> Self {
        l.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text(&mut [0; Lsn::TEXT_MAX_LEN]))
    }
}

/// The text was not a `X/X` WAL position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid WAL position {0:?}: expected the form X/X, e.g. 0/16B3748")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let valid =
            |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid(hi) || !valid(lo) {
            return Err(err());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text_form() {
        for s in ["0/0", "0/16B3748", "1/0", "FFFFFFFF/FFFFFFFF", "A/1"] {
            assert_eq!(s.parse::<Lsn>().unwrap().to_string(), s);
        }
        assert_eq!("0/016B3748".parse::<Lsn>().unwrap(), Lsn(0x16B3748));
        assert_eq!("1/2".parse::<Lsn>().unwrap(), Lsn((1 << 32) | 2));
    }

    #[test]
    fn text_is_upper_hex_halves_without_leading_zeros() {
        for v in [
            0,
            1,
            0xF,
            0x10,
            0x025C_B3C8,
            0xFFFF_FFFF,
            0x1_0000_0000,
            0x0ABC_0000_0001,
            u64::MAX,
        ] {
            let mut buf = [0; Lsn::TEXT_MAX_LEN];
            let want = format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF);
            assert_eq!(Lsn(v).text(&mut buf), want);
            assert_eq!(Lsn(v).to_string(), want);
        }
    }

    #[test]
    fn rejects_malformed_text() {
        for s in ["", "0", "/1", "1/", "0/G", "123456789/0", "0/1/2", "-1/0"] {
            assert!(s.parse::<Lsn>().is_err(), "{s:?} parsed");
        }
    }

    #[test]
    fn orders_numerically() {
        assert!("0/FFFFFFFF".parse::<Lsn>().unwrap() < "1/0".parse::<Lsn>().unwrap());
    }
}
