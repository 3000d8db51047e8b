//! NATS side of the measurements: stream polling, the latency consumer, message fields.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, stream::Stream};

/// Messages in `stream` now (0 while it does not exist). Keeps the stream handle between calls.
pub async fn stream_messages(
    js: &jetstream::Context,
    cache: &mut Option<Stream>,
    name: &str,
) -> u64 {
    if cache.is_none() {
        *cache = js.get_stream(name).await.ok();
    }
    match cache {
        Some(s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        None => 0,
    }
}

/// The string field `key` of a MessagePack change event.
pub fn field(payload: &[u8], key: &str) -> Option<String> {
    let value = rmpv::decode::read_value(&mut &payload[..]).ok()?;
    value
        .as_map()?
        .iter()
        .find_map(|(k, v)| (k.as_str() == Some(key)).then(|| v.as_str().map(str::to_string))?)
}

/// The unsigned integer field `key` of a MessagePack change event.
pub fn uint_field(payload: &[u8], key: &str) -> Option<u64> {
    let value = rmpv::decode::read_value(&mut &payload[..]).ok()?;
    value
        .as_map()?
        .iter()
        .find_map(|(k, v)| (k.as_str() == Some(key)).then(|| v.as_u64())?)
}

/// `2025-12-10T10:30:00.123456Z` as µs since the Unix epoch.
pub fn parse_commit_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 27 || b[26] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec, us) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..26)?);
    // Howard Hinnant's days_from_civil.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if mo > 2 { mo - 3 } else { mo + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) * 1_000_000) + us)
}

pub fn now_unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros() as i64
}

/// p-th percentile (0..=100) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Quantile `q` (0..1) of a Prometheus histogram `name` in `text` (linear within a bucket),
/// with the count; `None` when the histogram is not there.
pub fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let le_at = rest.find("le=\"")? + 4;
        let le_end = le_at + rest[le_at..].find('"')?;
        let le = &rest[le_at..le_end];
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        let count: f64 = rest.rsplit(' ').next()?.trim().parse().ok()?;
        buckets.push((bound, count));
    }
    if buckets.is_empty() {
        return None;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return Some((f64::NAN, 0));
    }
    let target = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(bound, count) in &buckets {
        if count >= target {
            if bound.is_infinite() {
                return Some((lo, total as u64));
            }
            let frac = if count > below {
                (target - below) / (count - below)
            } else {
                0.0
            };
            return Some((lo + (bound - lo) * frac, total as u64));
        }
        lo = bound;
        below = count;
    }
    Some((lo, total as u64))
}

/// GET http://127.0.0.1:{port}{path}, plain HTTP/1.0; `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, rest) = body.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.")
        .then_some(())
        .filter(|_| head.split(' ').nth(1) == Some("200"))?;
    Some(rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_time() {
        assert_eq!(
            parse_commit_time("1970-01-01T00:00:01.000002Z"),
            Some(1_000_002)
        );
        assert_eq!(
            parse_commit_time("2000-01-01T00:00:00.000000Z"),
            Some(946_684_800_000_000)
        );
    }

    #[test]
    fn quantile() {
        let text =
            "x_bucket{le=\"0.001\"} 50\nx_bucket{le=\"0.002\"} 100\nx_bucket{le=\"+Inf\"} 100\n";
        let (v, n) = histogram_quantile(text, "x", 0.75).unwrap();
        assert_eq!(n, 100);
        assert!((v - 0.0015).abs() < 1e-9);
    }
}
