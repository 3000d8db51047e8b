//! `bridge health`: the client side of `GET /health`, for container health checks in images
//! that hold nothing but the bridge.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::config::HttpConfig;

/// Longest time the probe may take, connection included.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of answer read.
const MAX_ANSWER: u64 = 64 * 1024;

/// Where to reach the bridge's HTTP server: its address, or loopback when it listens on every
/// address.
pub fn probe_addr(http: &HttpConfig) -> SocketAddr {
    let ip = match http.bind {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, http.port)
}

/// Sends `GET /health` and returns the status code and the body.
pub fn probe_health(http: &HttpConfig) -> std::io::Result<(u16, String)> {
    let addr = probe_addr(http);
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut raw)?;
    parse_answer(&raw).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no HTTP answer from {addr}"),
        )
    })
}

/// Status code and body of a raw HTTP answer.
fn parse_answer(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.trim_end().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_binds_are_probed_on_loopback() {
        let mut http = HttpConfig {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 9191,
            admin_token: None,
        };
        assert_eq!(probe_addr(&http).to_string(), "127.0.0.1:9191");
        http.bind = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        assert_eq!(probe_addr(&http).to_string(), "[::1]:9191");
        http.bind = "10.1.2.3".parse().unwrap();
        assert_eq!(probe_addr(&http).to_string(), "10.1.2.3:9191");
    }

    #[test]
    fn answers_are_parsed() {
        assert_eq!(
            parse_answer(b"HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\n{\"x\":1}\n"),
            Some((503, "{\"x\":1}".to_owned()))
        );
        assert_eq!(parse_answer(b"garbage"), None);
    }
}
