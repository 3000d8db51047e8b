//! Text forms of the contract's values, written without allocating: decimal numbers,
//! timestamps (RFC 3339 UTC with microseconds) and base64. WAL positions (`X/X`) are written
//! by [`Lsn::ascii`](crate::pg::Lsn::ascii), the one LSN text writer, which `Display` shares.
//!
//! The writers for the hot paths return ASCII bytes rather than `&str`: the encoders copy
//! bytes anyway, and checking UTF-8 on text known to be ASCII cost about a hundred
//! instructions a call, several calls per published change.

/// `v` in decimal ASCII digits, written into `buf` (20 bytes hold any `u64`); the hot paths
/// (message ids, reply subjects, JSON numbers) use it instead of `format!`, which costs several
/// times more.
pub fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[at..]
}

/// Appends ASCII bytes (from [`decimal`], [`Lsn::ascii`](crate::pg::Lsn::ascii)) to a string
/// without checking them as UTF-8; a byte above 0x7F would be taken as Latin-1, never as
/// invalid text.
pub fn push_ascii(s: &mut String, ascii: &[u8]) {
    s.extend(ascii.iter().map(|&b| char::from(b)));
}

/// Length of a timestamp as [`format_timestamp`] writes it: `2025-12-10T10:30:00.123456Z`.
pub const TIMESTAMP_LEN: usize = 27;

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Days from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_DAY: i64 = days_from_civil(2000, 1, 1);

/// First microsecond of 0001-01-01, in µs since 2000-01-01.
const MIN_MICROS: i64 = (days_from_civil(1, 1, 1) - PG_EPOCH_DAY) * MICROS_PER_DAY;

/// Last microsecond of 9999-12-31, in µs since 2000-01-01.
const MAX_MICROS: i64 = (days_from_civil(10_000, 1, 1) - PG_EPOCH_DAY) * MICROS_PER_DAY - 1;

/// The current time in µs since the Unix epoch.
pub fn now_unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The current time as [`format_timestamp`] writes it (snapshot metas, schema documents).
pub fn now_timestamp() -> String {
    let micros = now_unix_micros();
    let mut buf = [0u8; TIMESTAMP_LEN];
    format_timestamp(crate::pg::pgoutput::unix_to_pg_micros(micros), &mut buf).to_string()
}

/// A PostgreSQL timestamp (µs since 2000-01-01 UTC) as RFC 3339 UTC text with microseconds,
/// e.g. `2025-12-10T10:30:00.123456Z`, written into `buf` without allocating.
///
/// Times before 0001-01-01 or after 9999-12-31 are clamped to the first or last microsecond of
/// that range, which is all a four-digit year can express.
pub fn format_timestamp(micros: i64, buf: &mut [u8; TIMESTAMP_LEN]) -> &str {
    std::str::from_utf8(timestamp_ascii(micros, buf)).expect("digits and separators are ASCII")
}

/// [`format_timestamp`] as ASCII bytes, for the encoders.
pub fn timestamp_ascii(micros: i64, buf: &mut [u8; TIMESTAMP_LEN]) -> &[u8; TIMESTAMP_LEN] {
    let micros = micros.clamp(MIN_MICROS, MAX_MICROS);
    let days = micros.div_euclid(MICROS_PER_DAY);
    let of_day = micros.rem_euclid(MICROS_PER_DAY);
    let (year, month, day) = civil_from_days(days + PG_EPOCH_DAY);
    let secs = of_day / 1_000_000;

    *buf = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut buf[0..4], year as u64);
    put_digits(&mut buf[5..7], u64::from(month));
    put_digits(&mut buf[8..10], u64::from(day));
    put_digits(&mut buf[11..13], (secs / 3600) as u64);
    put_digits(&mut buf[14..16], (secs / 60 % 60) as u64);
    put_digits(&mut buf[17..19], (secs % 60) as u64);
    put_digits(&mut buf[20..26], (of_day % 1_000_000) as u64);
    buf
}

/// Fills `dst` with the low `dst.len()` decimal digits of `v`, zero-padded.
fn put_digits(dst: &mut [u8], mut v: u64) {
    for d in dst.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
pub(crate) const fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    // Count from 0000-03-01 so the leap day is the last day of the (shifted) year.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let mp = if month > 2 { month - 3 } else { month + 9 } as i64; // March = 0
    let doy = (153 * mp + 2) / 5 + day as i64 - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
pub(crate) const fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    (year, month, day)
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Appends `data` in standard base64 (RFC 4648 §4) with padding.
pub fn push_base64(out: &mut Vec<u8>, data: &[u8]) {
    let sym = |n: u32, shift: u32| BASE64[((n >> shift) & 63) as usize];
    out.reserve(data.len().div_ceil(3) * 4);
    let mut chunks = data.chunks_exact(3);
    for c in &mut chunks {
        let n = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
        out.extend_from_slice(&[sym(n, 18), sym(n, 12), sym(n, 6), sym(n, 0)]);
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[sym(n, 18), sym(n, 12), b'=', b'=']);
        }
        [a, b] => {
            let n = u32::from(a) << 16 | u32::from(b) << 8;
            out.extend_from_slice(&[sym(n, 18), sym(n, 12), sym(n, 6), b'=']);
        }
        _ => {}
    }
}

/// `data` in standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    push_base64(&mut out, data);
    // Only base64 symbols were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Standard base64 with padding; `None` when `text` is not base64.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (i, quad) in bytes.chunks(4).enumerate() {
        let last = i + 1 == bytes.len() / 4;
        let mut n = 0u32;
        let mut pad = 0;
        for (j, &c) in quad.iter().enumerate() {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                b'=' if last && j >= 2 => {
                    pad += 1;
                    0
                }
                _ => return None,
            };
            if pad > 0 && c != b'=' {
                return None;
            }
            n = (n << 6) | u32::from(v);
        }
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// 2025-12-10T10:30:00.123456Z in µs since 2000-01-01.
    const SAMPLE_TIME: i64 = 818_677_800_123_456;

    /// Standard base64 written bit by bit, unlike the chunked encoder under test.
    pub(crate) fn base64_reference(data: &[u8]) -> String {
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let bits: Vec<u8> = data
            .iter()
            .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
            .collect();
        let mut out: String = bits
            .chunks(6)
            .map(|c| {
                let v = (0..6).fold(0, |acc, i| acc << 1 | c.get(i).copied().unwrap_or(0));
                alphabet.as_bytes()[usize::from(v)] as char
            })
            .collect();
        while !out.len().is_multiple_of(4) {
            out.push('=');
        }
        out
    }

    #[test]
    fn decimal_writes_every_u64() {
        let mut buf = [0u8; 20];
        for v in [0, 7, 10, 4_294_967_295, u64::MAX] {
            assert_eq!(decimal(v, &mut buf), v.to_string().as_bytes());
        }
    }

    #[test]
    fn base64_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = Vec::new();
            push_base64(&mut out, input.as_bytes());
            assert_eq!(String::from_utf8(out).unwrap(), want);
            assert_eq!(base64_reference(input.as_bytes()), want);
        }
        let mut out = Vec::new();
        push_base64(&mut out, &[0xfb, 0xff, 0xbf]);
        assert_eq!(out, b"+/+/");
    }

    #[test]
    fn base64_round_trips() {
        for len in 0..20u8 {
            let data: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(base64_decode(&base64(&data)), Some(data));
        }
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64_decode("Zm9vYg=="), Some(b"foob".to_vec()));
        assert_eq!(base64_decode("Zm9=Yg=="), None);
        assert_eq!(base64_decode("abc"), None);
    }

    // ---- Timestamps ----

    fn ts(micros: i64) -> String {
        let mut buf = [0; TIMESTAMP_LEN];
        format_timestamp(micros, &mut buf).to_owned()
    }

    /// µs since 2000-01-01 of a Unix time in seconds (values from `date -u -d ... +%s`).
    fn from_unix(secs: i64) -> i64 {
        (secs - 946_684_800) * 1_000_000
    }

    #[test]
    fn timestamps() {
        let day = MICROS_PER_DAY;
        let cases = [
            (0, "2000-01-01T00:00:00.000000Z"),
            (1, "2000-01-01T00:00:00.000001Z"),
            (-1, "1999-12-31T23:59:59.999999Z"),
            (-day, "1999-12-31T00:00:00.000000Z"),
            (SAMPLE_TIME, "2025-12-10T10:30:00.123456Z"),
            (from_unix(0), "1970-01-01T00:00:00.000000Z"),
            (from_unix(0) - 1, "1969-12-31T23:59:59.999999Z"),
            // 2000 is a leap year (divisible by 400).
            (59 * day, "2000-02-29T00:00:00.000000Z"),
            (60 * day, "2000-03-01T00:00:00.000000Z"),
            (
                from_unix(1_709_251_199) + 500_000,
                "2024-02-29T23:59:59.500000Z",
            ),
            (
                from_unix(1_709_251_199) + 1_000_000,
                "2024-03-01T00:00:00.000000Z",
            ),
            // 1900 and 2100 are not (divisible by 100), 1600 is.
            (from_unix(-2_203_977_600), "1900-02-28T00:00:00.000000Z"),
            (
                from_unix(-2_203_977_600) + day,
                "1900-03-01T00:00:00.000000Z",
            ),
            (from_unix(4_107_456_000), "2100-02-28T00:00:00.000000Z"),
            (
                from_unix(4_107_456_000) + day,
                "2100-03-01T00:00:00.000000Z",
            ),
            (from_unix(-11_670_998_400), "1600-02-29T00:00:00.000000Z"),
            (from_unix(-62_135_596_800), "0001-01-01T00:00:00.000000Z"),
            (
                from_unix(253_402_300_799) + 999_999,
                "9999-12-31T23:59:59.999999Z",
            ),
        ];
        for (micros, want) in cases {
            assert_eq!(ts(micros), want, "{micros}");
        }
        assert_eq!(MIN_MICROS, from_unix(-62_135_596_800));
        assert_eq!(MAX_MICROS, from_unix(253_402_300_799) + 999_999);
    }

    #[test]
    fn timestamps_outside_years_1_to_9999_are_clamped() {
        for micros in [MIN_MICROS - 1, MIN_MICROS - MICROS_PER_DAY * 400, i64::MIN] {
            assert_eq!(ts(micros), "0001-01-01T00:00:00.000000Z");
        }
        for micros in [MAX_MICROS + 1, MAX_MICROS + MICROS_PER_DAY * 400, i64::MAX] {
            assert_eq!(ts(micros), "9999-12-31T23:59:59.999999Z");
        }
    }

    /// Every day of years 1 to 9999 against a calendar that counts day by day.
    #[test]
    fn civil_conversion_matches_counting_days() {
        let leap = |y: i64| y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
        let (mut y, mut m, mut d) = (1i64, 1u32, 1u32);
        let mut days = days_from_civil(1, 1, 1);
        assert_eq!(days, -719_162);
        while y < 10_000 {
            assert_eq!(civil_from_days(days), (y, m, d));
            assert_eq!(days_from_civil(y, m, d), days);
            let month_len = match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > month_len {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
            days += 1;
        }
        assert_eq!(days, days_from_civil(10_000, 1, 1));
        assert_eq!(PG_EPOCH_DAY, 10_957);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn base64_matches_reference(data in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            push_base64(&mut out, &data);
            prop_assert_eq!(String::from_utf8(out).unwrap(), base64_reference(&data));
        }

        #[test]
        fn timestamps_are_well_formed(micros in any::<i64>()) {
            let text = ts(micros);
            prop_assert_eq!(text.len(), TIMESTAMP_LEN);
            let clamped = micros.clamp(MIN_MICROS, MAX_MICROS);
            let days = clamped.div_euclid(MICROS_PER_DAY);
            let (y, m, d) = civil_from_days(days + PG_EPOCH_DAY);
            prop_assert_eq!(days_from_civil(y, m, d), days + PG_EPOCH_DAY);
            prop_assert_eq!(&text[..10], format!("{y:04}-{m:02}-{d:02}"));
            let of_day = clamped.rem_euclid(MICROS_PER_DAY);
            let (h, mi, sec, us) = (
                of_day / 3_600_000_000,
                of_day / 60_000_000 % 60,
                of_day / 1_000_000 % 60,
                of_day % 1_000_000,
            );
            prop_assert_eq!(&text[10..], format!("T{h:02}:{mi:02}:{sec:02}.{us:06}Z"));
        }
    }
}
