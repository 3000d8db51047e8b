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

/// A Prometheus histogram as scraped: cumulative counts per upper bound (ascending, the
/// last one `+Inf`), and the sum of the observations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
}

impl Histogram {
    /// Histogram `name` in the text exposition format `text`; `None` when it is not there.
    pub fn parse(text: &str, name: &str) -> Option<Histogram> {
        let prefix = format!("{name}_bucket{{");
        let sum_prefix = format!("{name}_sum ");
        let mut h = Histogram::default();
        for line in text.lines() {
            if let Some(v) = line.strip_prefix(&sum_prefix) {
                h.sum = v.trim().parse().ok()?;
                continue;
            }
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
            h.buckets.push((bound, count));
        }
        if h.buckets.is_empty() {
            return None;
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(h)
    }

    /// The observations made between `earlier` (a scrape of the same histogram) and this one.
    /// Buckets missing from `earlier` count as empty there.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before = |bound: f64| {
            earlier
                .buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0.0, |(_, c)| *c)
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(b, c)| (b, (c - before(b)).max(0.0)))
                .collect(),
            sum: self.sum - earlier.sum,
        }
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.last().map_or(0, |(_, c)| *c as u64)
    }

    /// Estimated quantile `q` (0..1): linear within the bucket it falls in, the way
    /// Prometheus's `histogram_quantile` does; the lower bound of `+Inf` when it falls there.
    pub fn quantile(&self, q: f64) -> f64 {
        let total = self.count() as f64;
        if total == 0.0 {
            return f64::NAN;
        }
        let target = q * total;
        let (mut lo, mut below) = (0.0, 0.0);
        for &(bound, count) in &self.buckets {
            if count >= target && count > below {
                if bound.is_infinite() {
                    return lo;
                }
                return lo + (bound - lo) * (target - below) / (count - below);
            }
            lo = bound;
            below = count;
        }
        lo
    }

    /// The bounds `(lower, upper]` of the bucket quantile `q` falls in: all the buckets say
    /// about it, the estimate aside.
    pub fn bucket_of(&self, q: f64) -> Option<(f64, f64)> {
        let target = q * self.count() as f64;
        let (mut lo, mut below) = (0.0, 0.0);
        for &(bound, count) in &self.buckets {
            if count >= target && count > below {
                return Some((lo, bound));
            }
            lo = bound;
            below = count;
        }
        None
    }

    /// The upper bound of the highest bucket that holds an observation: the maximum is at
    /// most this (infinite when the `+Inf` bucket holds one).
    pub fn max_bound(&self) -> f64 {
        let mut below = 0.0;
        let mut top = f64::NAN;
        for &(bound, count) in &self.buckets {
            if count > below {
                top = bound;
            }
            below = count;
        }
        top
    }

    /// Share of the observations at most `bound`, when `bound` is a bucket boundary.
    pub fn share_within(&self, bound: f64) -> Option<f64> {
        let total = self.count() as f64;
        let (_, c) = self.buckets.iter().find(|(b, _)| *b == bound)?;
        (total > 0.0).then(|| c / total)
    }

    /// Mean of the observations (exact: from the sum and the count).
    pub fn mean(&self) -> f64 {
        self.sum / self.count() as f64
    }
}

/// GET http://127.0.0.1:{port}{path}, plain HTTP/1.0; `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    match http(port, "GET", path, None)? {
        (200, body) => Some(body),
        _ => None,
    }
}

/// `POST path` with an optional bearer token: the status and the body.
pub fn http_post(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    http(port, "POST", path, token)
}

fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, rest) = body.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.") {
        return None;
    }
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, rest.to_string()))
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
        let text = "x_bucket{le=\"0.001\"} 50\nx_bucket{le=\"0.002\"} 100\n\
                    x_bucket{le=\"0.005\"} 100\nx_bucket{le=\"+Inf\"} 100\nx_sum 0.1\nx_count 100\n";
        let h = Histogram::parse(text, "x").unwrap();
        assert_eq!(h.count(), 100);
        assert!((h.quantile(0.75) - 0.0015).abs() < 1e-9);
        assert_eq!(h.max_bound(), 0.002);
        assert_eq!(h.share_within(0.001), Some(0.5));
        assert!((h.mean() - 0.001).abs() < 1e-12);
        assert!(Histogram::parse(text, "y").is_none());
    }

    #[test]
    fn difference_of_two_scrapes() {
        let before = Histogram::parse(
            "x_bucket{le=\"0.001\"} 10\nx_bucket{le=\"0.002\"} 10\nx_bucket{le=\"+Inf\"} 10\nx_sum 0.005\n",
            "x",
        )
        .unwrap();
        let after = Histogram::parse(
            "x_bucket{le=\"0.001\"} 10\nx_bucket{le=\"0.002\"} 110\nx_bucket{le=\"+Inf\"} 111\nx_sum 0.2\n",
            "x",
        )
        .unwrap();
        let d = after.since(&before);
        assert_eq!(d.count(), 101);
        assert_eq!(d.buckets[0], (0.001, 0.0));
        assert!(d.max_bound().is_infinite());
        // The median lies in the second bucket: 50.5 of its 100 observations.
        assert!((d.quantile(0.5) - 0.001_505).abs() < 1e-9);
        assert!((d.sum - 0.195).abs() < 1e-12);
        assert_eq!(d.bucket_of(0.5), Some((0.001, 0.002)));
        assert_eq!(d.bucket_of(1.0), Some((0.002, f64::INFINITY)));
    }
}
