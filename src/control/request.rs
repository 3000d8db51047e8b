//! Reading one HTTP/1.x request from a connection, within fixed limits of size and time.
//!
//! Everything is bounded before it is buffered: the request line and headers together
//! ([`MAX_HEAD_BYTES`], [`MAX_HEADERS`]), the body ([`MAX_BODY_BYTES`], refused from its
//! `Content-Length` before a byte of it is read), and the time to receive all of it. Anything
//! outside the limits or the grammar becomes a [`RequestError`] with the 4xx/5xx status to
//! answer; parsing never panics.

use std::io::{ErrorKind, Read};
use std::time::Instant;

/// Longest request line plus headers.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines.
pub const MAX_HEADERS: usize = 64;
/// Longest body (the admin endpoints take none or a small JSON document).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why no request could be read; [`RequestError::status`] gives the answer to send.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The peer closed the connection before sending a whole request head.
    #[error("connection closed before a complete request")]
    Closed,
    /// The request did not arrive in time.
    #[error("timed out reading the request")]
    Timeout,
    /// The request line or a header does not follow HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Request line and headers exceed [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`].
    #[error("request line and headers larger than {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} lines")]
    HeadTooLarge,
    /// The body exceeds [`MAX_BODY_BYTES`].
    #[error("request body larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    /// A body sent without `Content-Length` (chunked).
    #[error("send the request body with Content-Length (Transfer-Encoding is not accepted)")]
    LengthRequired,
    /// An HTTP version other than 1.0 and 1.1.
    #[error("HTTP version not supported (use HTTP/1.1)")]
    Version,
    /// Reading from the connection failed.
    #[error("reading the request: {0}")]
    Io(std::io::Error),
}

impl RequestError {
    /// The status code to answer with, or `None` when nobody is left to answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            RequestError::Closed | RequestError::Io(_) => None,
            RequestError::Timeout => Some(408),
            RequestError::Malformed(_) => Some(400),
            RequestError::HeadTooLarge => Some(431),
            RequestError::BodyTooLarge => Some(413),
            RequestError::LengthRequired => Some(411),
            RequestError::Version => Some(505),
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string after `?`, if any.
    pub query: Option<String>,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty when none was sent).
    pub body: Vec<u8>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The percent-decoded value of query parameter `key`, if present and decodable.
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k)? == key)
                .then(|| percent_decode(v))
                .flatten()
        })
    }
}

/// Decodes `%XX` escapes and `+` (space) of a query component; `None` when invalid.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Request line and headers of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Method.
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Parses the request line and headers (everything before the empty line).
pub fn parse_head(head: &[u8]) -> Result<Head, RequestError> {
    let text = std::str::from_utf8(head).map_err(|_| RequestError::Malformed("not UTF-8"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed(
            "request line is not: METHOD /path HTTP/1.1",
        ));
    };
    if !is_token(method) {
        return Err(RequestError::Malformed("invalid method"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(RequestError::Malformed("request target must be a path"));
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") => return Err(RequestError::Version),
        _ => return Err(RequestError::Malformed("missing HTTP version")),
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if headers.len() == MAX_HEADERS {
            return Err(RequestError::HeadTooLarge);
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(RequestError::Malformed("header line without ':'"))?;
        if !is_token(name) {
            return Err(RequestError::Malformed("invalid header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        headers,
    })
}

/// The body length a head announces: `Ok(0)` without a body.
fn content_length(head: &Head) -> Result<usize, RequestError> {
    if head.headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(RequestError::LengthRequired);
    }
    let mut length: Option<u64> = None;
    for (_, v) in head.headers.iter().filter(|(n, _)| n == "content-length") {
        if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RequestError::Malformed("invalid Content-Length"));
        }
        let n: u64 = v
            .parse()
            .map_err(|_| RequestError::Malformed("invalid Content-Length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(RequestError::Malformed(
                "conflicting Content-Length headers",
            ));
        }
        length = Some(n);
    }
    match length {
        Some(n) if n > MAX_BODY_BYTES as u64 => Err(RequestError::BodyTooLarge),
        Some(n) => Ok(n as usize),
        None => Ok(0),
    }
}

fn read_some(r: &mut impl Read, buf: &mut [u8], deadline: Instant) -> Result<usize, RequestError> {
    loop {
        if Instant::now() >= deadline {
            return Err(RequestError::Timeout);
        }
        match r.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(RequestError::Timeout)
            }
            Err(e) => return Err(RequestError::Io(e)),
        }
    }
}

/// End of the head: index of the blank line's first byte and the length of the terminator.
fn find_head_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let start = from.saturating_sub(3);
    (start..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if buf[i..].starts_with(b"\n\n") {
            Some((i, 2))
        } else {
            None
        }
    })
}

/// Reads one request from `r` (whose reads should time out on their own) until `deadline`.
pub fn read_request(r: &mut impl Read, deadline: Instant) -> Result<Request, RequestError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head_len, term) = loop {
        let room = MAX_HEAD_BYTES + 4 - buf.len();
        let n = read_some(r, &mut chunk[..room.min(4096)], deadline)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                RequestError::Closed
            } else {
                RequestError::Malformed("connection closed inside the request head")
            });
        }
        let before = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf, before) {
            break end;
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(RequestError::HeadTooLarge);
        }
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(RequestError::HeadTooLarge);
    }
    let head = parse_head(&buf[..head_len])?;
    let length = content_length(&head)?;
    let mut body: Vec<u8> = buf[head_len + term..].to_vec();
    body.truncate(length);
    while body.len() < length {
        let want = (length - body.len()).min(chunk.len());
        let n = read_some(r, &mut chunk[..want], deadline)?;
        if n == 0 {
            return Err(RequestError::Malformed("connection closed inside the body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, query) = match head.target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (head.target, None),
    };
    Ok(Request {
        method: head.method,
        path,
        query,
        headers: head.headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;
    use std::time::Duration;

    fn read(bytes: &[u8]) -> Result<Request, RequestError> {
        read_request(
            &mut Cursor::new(bytes.to_vec()),
            Instant::now() + Duration::from_secs(5),
        )
    }

    fn status(bytes: &[u8]) -> Option<u16> {
        read(bytes).err().and_then(|e| e.status())
    }

    #[test]
    fn a_plain_get() {
        let r = read(b"GET /streams/info?stream=CDC&x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\n\r\n")
            .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/streams/info");
        assert_eq!(r.query_param("stream").as_deref(), Some("CDC"));
        assert_eq!(r.query_param("nope"), None);
        assert_eq!(r.header("AUTHORIZATION"), Some("Bearer t"));
        assert!(r.body.is_empty());
    }

    #[test]
    fn a_post_with_a_body_and_bare_newlines() {
        let r = read(b"POST /x HTTP/1.0\nContent-Length: 5\n\nhello, and more").unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.body, b"hello");
    }

    #[test]
    fn malformed_requests_get_400() {
        assert_eq!(status(b"\x00\x01garbage\xff\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET /\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET  / HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET http://x/ HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n"), Some(400));
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx"),
            Some(400)
        );
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost"), Some(400));
        assert_eq!(status(b"GET / HTTP/2.0\r\n\r\n"), Some(505));
        assert!(matches!(read(b""), Err(RequestError::Closed)));
    }

    #[test]
    fn oversized_heads_and_bodies_are_refused_unread() {
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 100 * 1024));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(&big), Some(431));

        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(&many), Some(431));

        // Refused from the header alone: no body follows.
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 10485760\r\n\r\n"),
            Some(413)
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            Some(411)
        );
        // A body shorter than announced, then EOF.
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
            Some(400)
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Eb+c").as_deref(), Some("a.b c"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%FF"), None);
    }

    #[test]
    fn a_slow_peer_times_out() {
        struct Slow;
        impl Read for Slow {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from(ErrorKind::WouldBlock))
            }
        }
        let e = read_request(&mut Slow, Instant::now() + Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.status(), Some(408));
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = read(&bytes);
            let _ = parse_head(&bytes);
        }

        #[test]
        fn parsing_request_like_text_never_panics(s in "[A-Z]{0,6} /[ -~]{0,40} HTTP/1\\.[01]\r\n([A-Za-z-]{0,10}:[ -~]{0,20}\r\n){0,5}\r\n[ -~]{0,20}") {
            let _ = read(s.as_bytes());
        }
    }
}
