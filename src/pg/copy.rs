//! Parsing rows of `COPY ... TO STDOUT` in text format, as snapshots read them.
//!
//! A row is the column values separated by tabs and ended by a newline; `\N` is NULL and
//! backslash escapes (`\\`, `\t`, `\n`, `\r`, `\b`, `\f`, `\v`, and on input also octal
//! `\ooo` and hex `\xhh`) stand for the bytes that would break the framing. After unescaping,
//! a field is exactly the text PostgreSQL's output function printed, the same text pgoutput
//! sends, so [`crate::pg::value::decode_text`] gives the same typed value for both.

/// A malformed COPY row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed COPY row: {reason} at byte {offset}")]
pub struct CopyRowError {
    /// What is wrong.
    pub reason: &'static str,
    /// Byte offset in the row.
    pub offset: usize,
}

/// Splits COPY text rows into fields, reusing its buffers from row to row.
#[derive(Debug, Default)]
pub struct CopyRowParser {
    buf: Vec<u8>,
    /// (start, end) in `buf` per field; `None` for NULL.
    fields: Vec<Option<(usize, usize)>>,
    /// Every field of the row is ASCII (so valid UTF-8 without a check per field).
    ascii: bool,
}

impl CopyRowParser {
    /// A parser with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses one row (with or without its trailing newline). Afterwards [`Self::len`] and
    /// [`Self::get`] give the fields.
    pub fn parse(&mut self, row: &[u8]) -> Result<(), CopyRowError> {
        self.buf.clear();
        self.fields.clear();
        self.ascii = false;
        let row = row.strip_suffix(b"\n").unwrap_or(row);
        // Most rows have no escape and no NULL: one copy, then the tabs alone split it.
        if memchr::memchr(b'\\', row).is_none() {
            self.buf.extend_from_slice(row);
            let mut start = 0;
            for tab in memchr::memchr_iter(b'\t', row) {
                self.fields.push(Some((start, tab)));
                start = tab + 1;
            }
            self.fields.push(Some((start, row.len())));
            self.ascii = row.is_ascii();
            return Ok(());
        }
        let mut start = 0;
        let mut i = 0;
        let mut null = false;
        loop {
            // Most fields have no escapes: copy everything up to the next tab or backslash
            // in one go (byte by byte, this loop took a third of a snapshot's CPU; memchr2
            // looks at a vector register's worth of bytes at a time).
            let run = memchr::memchr2(b'\t', b'\\', &row[i..]).unwrap_or(row.len() - i);
            if run > 0 {
                if null {
                    return Err(CopyRowError {
                        reason: "\\N mixed with other data",
                        offset: i,
                    });
                }
                self.buf.extend_from_slice(&row[i..i + run]);
                i += run;
            }
            let b = row.get(i).copied();
            match b {
                None | Some(b'\t') => {
                    if null {
                        if self.buf.len() != start {
                            return Err(CopyRowError {
                                reason: "\\N mixed with other data",
                                offset: i,
                            });
                        }
                        self.fields.push(None);
                    } else {
                        self.fields.push(Some((start, self.buf.len())));
                    }
                    if b.is_none() {
                        self.ascii = self.buf.is_ascii();
                        break;
                    }
                    null = false;
                    start = self.buf.len();
                    i += 1;
                }
                // A backslash: the run stops only there, at a tab or at the end.
                Some(_) => {
                    let Some(&e) = row.get(i + 1) else {
                        return Err(CopyRowError {
                            reason: "backslash at the end of the row",
                            offset: i,
                        });
                    };
                    i += 2;
                    let byte = match e {
                        b'N' => {
                            if self.buf.len() != start {
                                return Err(CopyRowError {
                                    reason: "\\N mixed with other data",
                                    offset: i - 2,
                                });
                            }
                            null = true;
                            continue;
                        }
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'v' => 0x0b,
                        b'0'..=b'7' => {
                            let mut v = u32::from(e - b'0');
                            for _ in 0..2 {
                                match row.get(i) {
                                    Some(&d @ b'0'..=b'7') => {
                                        v = v * 8 + u32::from(d - b'0');
                                        i += 1;
                                    }
                                    _ => break,
                                }
                            }
                            (v & 0xff) as u8
                        }
                        b'x' => {
                            let mut v = 0u8;
                            let mut n = 0;
                            while n < 2 {
                                match row.get(i).and_then(|d| (*d as char).to_digit(16)) {
                                    Some(d) => {
                                        v = v * 16 + d as u8;
                                        i += 1;
                                        n += 1;
                                    }
                                    None => break,
                                }
                            }
                            if n == 0 {
                                b'x'
                            } else {
                                v
                            }
                        }
                        other => other,
                    };
                    if null {
                        return Err(CopyRowError {
                            reason: "\\N mixed with other data",
                            offset: i,
                        });
                    }
                    self.buf.push(byte);
                }
            }
        }
        Ok(())
    }

    /// Number of fields of the last parsed row.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// True when the last row had no fields (never after a successful parse).
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Field `i` of the last parsed row: `None` for NULL (or out of range).
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let (s, e) = (*self.fields.get(i)?)?;
        self.buf.get(s..e)
    }

    /// True when every field of the last parsed row is ASCII: each is then valid UTF-8, and
    /// text needs no check of its own (one pass over the row instead of one per field).
    pub fn is_ascii(&self) -> bool {
        self.ascii
    }

    /// True when field `i` is NULL.
    pub fn is_null(&self, i: usize) -> bool {
        matches!(self.fields.get(i), Some(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(row: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut p = CopyRowParser::new();
        p.parse(row).unwrap();
        (0..p.len()).map(|i| p.get(i).map(<[u8]>::to_vec)).collect()
    }

    #[test]
    fn splits_and_unescapes() {
        assert_eq!(
            fields(b"1\tab\\tc\\\\d\\ne\t\\N\t\n"),
            vec![
                Some(b"1".to_vec()),
                Some(b"ab\tc\\d\ne".to_vec()),
                None,
                Some(Vec::new())
            ]
        );
        // bytea hex output arrives with its backslash escaped.
        assert_eq!(fields(b"\\\\x00ff\n"), vec![Some(b"\\x00ff".to_vec())]);
        assert_eq!(fields(b"\\101\\x42\\r"), vec![Some(b"AB\r".to_vec())]);
        assert_eq!(fields(b""), vec![Some(Vec::new())]);
        assert_eq!(
            fields("é\t✓".as_bytes()),
            vec![Some("é".as_bytes().to_vec()), Some("✓".as_bytes().to_vec())]
        );
    }

    #[test]
    fn malformed_rows_are_errors() {
        let mut p = CopyRowParser::new();
        assert!(p.parse(b"abc\\").is_err());
        assert!(p.parse(b"x\\N").is_err());
        assert!(p.parse(b"\\Nx").is_err());
        assert!(p.parse(b"ok\t\\N").is_ok());
        assert!(p.is_null(1));
    }

    /// The parser as first written, one byte at a time: the fast one must agree with it on
    /// every input, errors included.
    #[derive(Default)]
    struct ByteByByte {
        buf: Vec<u8>,
        fields: Vec<Option<(usize, usize)>>,
    }

    impl ByteByByte {
        fn parse(&mut self, row: &[u8]) -> Result<(), CopyRowError> {
            self.buf.clear();
            self.fields.clear();
            let row = row.strip_suffix(b"\n").unwrap_or(row);
            let mut start = 0;
            let mut i = 0;
            let mut null = false;
            while i <= row.len() {
                let b = row.get(i).copied();
                match b {
                    None | Some(b'\t') => {
                        if null {
                            if self.buf.len() != start {
                                return Err(CopyRowError {
                                    reason: "\\N mixed with other data",
                                    offset: i,
                                });
                            }
                            self.fields.push(None);
                        } else {
                            self.fields.push(Some((start, self.buf.len())));
                        }
                        null = false;
                        start = self.buf.len();
                        i += 1;
                    }
                    Some(b'\\') => {
                        let Some(&e) = row.get(i + 1) else {
                            return Err(CopyRowError {
                                reason: "backslash at the end of the row",
                                offset: i,
                            });
                        };
                        i += 2;
                        let byte = match e {
                            b'N' => {
                                if self.buf.len() != start {
                                    return Err(CopyRowError {
                                        reason: "\\N mixed with other data",
                                        offset: i - 2,
                                    });
                                }
                                null = true;
                                continue;
                            }
                            b'b' => 0x08,
                            b'f' => 0x0c,
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'v' => 0x0b,
                            b'0'..=b'7' => {
                                let mut v = u32::from(e - b'0');
                                for _ in 0..2 {
                                    match row.get(i) {
                                        Some(&d @ b'0'..=b'7') => {
                                            v = v * 8 + u32::from(d - b'0');
                                            i += 1;
                                        }
                                        _ => break,
                                    }
                                }
                                (v & 0xff) as u8
                            }
                            b'x' => {
                                let mut v = 0u8;
                                let mut n = 0;
                                while n < 2 {
                                    match row.get(i).and_then(|d| (*d as char).to_digit(16)) {
                                        Some(d) => {
                                            v = v * 16 + d as u8;
                                            i += 1;
                                            n += 1;
                                        }
                                        None => break,
                                    }
                                }
                                if n == 0 {
                                    b'x'
                                } else {
                                    v
                                }
                            }
                            other => other,
                        };
                        if null {
                            return Err(CopyRowError {
                                reason: "\\N mixed with other data",
                                offset: i,
                            });
                        }
                        self.buf.push(byte);
                    }
                    Some(other) => {
                        if null {
                            return Err(CopyRowError {
                                reason: "\\N mixed with other data",
                                offset: i,
                            });
                        }
                        self.buf.push(other);
                        i += 1;
                    }
                }
            }
            Ok(())
        }
    }

    fn agree(row: &[u8]) {
        let mut fast = CopyRowParser::new();
        let mut slow = ByteByByte::default();
        let (a, b) = (fast.parse(row), slow.parse(row));
        assert_eq!(a, b, "{row:?}");
        if a.is_ok() {
            let fields: Vec<_> = (0..fast.len())
                .map(|i| fast.get(i).map(<[u8]>::to_vec))
                .collect();
            let expected: Vec<_> = slow
                .fields
                .iter()
                .map(|f| f.map(|(s, e)| slow.buf[s..e].to_vec()))
                .collect();
            assert_eq!(fields, expected, "{row:?}");
        }
    }

    #[test]
    fn agrees_with_the_byte_by_byte_parser() {
        for row in [
            &b""[..],
            b"\n",
            b"a\tb\t\\N\n",
            b"\\N\\N",
            b"x\\N",
            b"\\Nx",
            b"\\N\\t",
            b"abc\\",
            b"\\1234\\x4g\\xzz\\q",
            b"\t\t",
        ] {
            agree(row);
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(row in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut p = CopyRowParser::new();
            let _ = p.parse(&row);
        }

        #[test]
        fn ascii_rows_are_those_of_ascii_fields(row in proptest::collection::vec(
            proptest::sample::select(b"\t\\Nnx0179afAz\n\xc3\xa9".to_vec()), 0..40)) {
            let mut p = CopyRowParser::new();
            if p.parse(&row).is_ok() {
                let all = (0..p.len()).all(|i| p.get(i).is_none_or(<[u8]>::is_ascii));
                proptest::prop_assert_eq!(p.is_ascii(), all);
            }
        }

        #[test]
        fn fast_and_byte_by_byte_agree(row in proptest::collection::vec(
            proptest::sample::select(b"\t\\Nntx0179afAz\n\xc3".to_vec()), 0..40)) {
            agree(&row);
        }

        #[test]
        fn round_trips_escaped_fields(values in proptest::collection::vec(proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20)), 1..8)) {
            let mut row = Vec::new();
            for (n, v) in values.iter().enumerate() {
                if n > 0 { row.push(b'\t'); }
                match v {
                    None => row.extend_from_slice(b"\\N"),
                    Some(bytes) => for &b in bytes {
                        match b {
                            b'\\' => row.extend_from_slice(b"\\\\"),
                            b'\t' => row.extend_from_slice(b"\\t"),
                            b'\n' => row.extend_from_slice(b"\\n"),
                            b'\r' => row.extend_from_slice(b"\\r"),
                            other => row.push(other),
                        }
                    },
                }
            }
            row.push(b'\n');
            proptest::prop_assert_eq!(fields(&row), values);
        }
    }
}
