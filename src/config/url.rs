//! Connection URLs: PostgreSQL URLs, NATS server URLs, their user info and its redaction.
//!
//! The user info ends at the *last* `@` ([`split_userinfo`]). Errors describe the problem
//! without echoing the URL, which may hold a password.

use std::net::IpAddr;
use std::path::PathBuf;

use super::pg::DEFAULT_PG_PORT;
use super::{PgPorts, Secret, SslMode, TargetSessionAttrs, REDACTED};

/// The parts a PostgreSQL URL gave; `None` where it gave nothing.
#[derive(Debug, Default, PartialEq)]
pub(super) struct PgUrlParts {
    pub(super) host: Option<String>,
    pub(super) port: Option<PgPorts>,
    pub(super) user: Option<String>,
    pub(super) password: Option<Secret>,
    pub(super) dbname: Option<String>,
    pub(super) sslmode: Option<SslMode>,
    pub(super) sslrootcert: Option<PathBuf>,
    pub(super) sslcert: Option<PathBuf>,
    pub(super) sslkey: Option<PathBuf>,
    pub(super) connect_timeout_secs: Option<u64>,
    pub(super) target_session_attrs: Option<TargetSessionAttrs>,
}

/// Splits what follows `scheme://` at the user info, which ends at the LAST `@`: user names
/// and passwords are where unescaped reserved characters turn up (`/`, `?`, `#`, `@`), while
/// host, port, path and query have no reason to hold an `@` (write it `%40` there). Returns
/// the user info, if any, and the rest.
fn split_userinfo(rest: &str) -> (Option<&str>, &str) {
    match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    }
}

/// Parses `postgres[ql]://[user[:password]@][host][:port][,host[:port]...][/dbname][?k=v&...]`.
///
/// Error messages describe the problem without echoing the URL, which may hold a password.
pub(super) fn parse_pg_url(url: &str) -> Result<PgUrlParts, String> {
    let rest = ["postgresql://", "postgres://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))
        .ok_or("must start with postgres:// or postgresql://")?;
    let (userinfo, rest) = split_userinfo(rest);
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.split_once('/') {
        Some((authority, path)) => (authority, Some(path)),
        None => (before_query, None),
    };
    let mut parts = PgUrlParts::default();

    if let Some(userinfo) = userinfo {
        // The first ':' ends the user name; a password may hold more.
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        parts.user = non_empty(percent_decode(user, "user name")?);
        if let Some(password) = password {
            parts.password = non_empty(percent_decode(password, "password")?).map(Secret::from);
        }
    }
    // Several hosts, each with its own port or none: `h1:5432,h2:5433` (libpq's form).
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for host_port in authority.split(',') {
        let (host, port) = split_host_port(host_port)?;
        if host.is_empty() && authority.contains(',') {
            return Err("a host of the host list is empty".into());
        }
        hosts.push(host);
        ports.push(port);
    }
    parts.host = non_empty(hosts.join(","));
    // A host without a port gets the default one, as in libpq.
    if ports.iter().any(Option::is_some) {
        let ports: Vec<u16> = ports
            .into_iter()
            .map(|p| p.unwrap_or(DEFAULT_PG_PORT))
            .collect();
        parts.port = Some(PgPorts::from(ports));
    }
    if let Some(path) = path {
        parts.dbname = non_empty(percent_decode(path, "database name")?);
    }

    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair
            .split_once('=')
            // Not echoed: a mistyped pair may hold a secret.
            .ok_or("a query parameter has no '=value'")?;
        let key = percent_decode(key, "query parameter name")?;
        match key.as_str() {
            "password" => {
                parts.password = non_empty(percent_decode(value, "password")?).map(Secret::from)
            }
            "user" => parts.user = non_empty(percent_decode(value, "user name")?),
            "host" => parts.host = non_empty(percent_decode(value, "host")?),
            "port" => {
                let ports = percent_decode(value, "port")?
                    .split(',')
                    .map(parse_port)
                    .collect::<Result<Vec<_>, _>>()?;
                parts.port = Some(PgPorts::from(ports));
            }
            "target_session_attrs" => {
                parts.target_session_attrs =
                    Some(percent_decode(value, "target_session_attrs")?.parse()?)
            }
            "dbname" => parts.dbname = non_empty(percent_decode(value, "database name")?),
            "sslmode" => parts.sslmode = Some(percent_decode(value, "sslmode")?.parse()?),
            "sslrootcert" => parts.sslrootcert = non_empty_path(value, "sslrootcert")?,
            "sslcert" => parts.sslcert = non_empty_path(value, "sslcert")?,
            "sslkey" => parts.sslkey = non_empty_path(value, "sslkey")?,
            "connect_timeout" => {
                let value = percent_decode(value, "connect_timeout")?;
                parts.connect_timeout_secs = Some(value.parse().map_err(|_| {
                    format!("connect_timeout '{value}' is not a whole number of seconds")
                })?);
            }
            other => {
                return Err(format!(
                    "query parameter '{other}' is not supported (use sslmode, sslrootcert, \
                     sslcert, sslkey, connect_timeout, target_session_attrs, host, port, user, \
                     password or dbname)"
                ))
            }
        }
    }
    Ok(parts)
}

/// `[ipv6]` or `[ipv6]:port`: the address and the port's text; `None` when `authority` does
/// not start with `[`.
fn split_ipv6(authority: &str) -> Result<Option<(&str, Option<&str>)>, String> {
    let Some(bracketed) = authority.strip_prefix('[') else {
        return Ok(None);
    };
    let (host, after) = bracketed
        .split_once(']')
        .ok_or("IPv6 address without closing ']'")?;
    let port = match after {
        "" => None,
        p => Some(
            p.strip_prefix(':')
                .ok_or("unexpected text after the IPv6 address")?,
        ),
    };
    Ok(Some((host, port)))
}

/// `host[:port]` or `[ipv6][:port]`, the host percent-decoded; the port parsed when given.
fn split_host_port(host_port: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = match split_ipv6(host_port)? {
        Some((host, port)) => (host.to_owned(), port),
        None => match host_port.split_once(':') {
            Some((host, port)) => (percent_decode(host, "host")?, Some(port)),
            None => (percent_decode(host_port, "host")?, None),
        },
    };
    let port = match port.filter(|p| !p.is_empty()) {
        Some(p) => Some(parse_port(p)?),
        None => None,
    };
    Ok((host, port))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn non_empty_path(value: &str, what: &str) -> Result<Option<PathBuf>, String> {
    Ok(non_empty(percent_decode(value, what)?).map(PathBuf::from))
}

fn parse_port(port: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        // The text is not echoed: in a mistyped URL it may be a password.
        _ => Err("the port is not a number from 1 to 65535".into()),
    }
}

/// Decodes `%XX` escapes. `what` names the part in the error, which never shows the text.
fn percent_decode(s: &str, what: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("the {what} has an invalid percent-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the {what} is not UTF-8 after percent-decoding"))
}

// ---------------------------------------------------------------------------------------------
// Name rules
/// Parses a NATS server, `[scheme://][user[:password]@ | token@]host[:port][/path]` with scheme
/// nats (the default), tls, ws or wss. The user info ends at the last `@` ([`split_userinfo`])
/// and is percent-decoded. The reason never shows the URL's text.
pub(super) fn parse_nats_url(url: &str) -> Result<NatsUrl, String> {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => {
            let lower = scheme.to_ascii_lowercase();
            if !matches!(lower.as_str(), "nats" | "tls" | "ws" | "wss") {
                // Echoed only when it looks like a scheme, not a mangled user info.
                return Err(
                    if !scheme.is_empty()
                        && scheme.len() <= 10
                        && scheme.bytes().all(|b| b.is_ascii_alphanumeric())
                    {
                        format!("scheme '{scheme}' is not one of nats, tls, ws, wss")
                    } else {
                        "the scheme is not one of nats, tls, ws, wss".to_owned()
                    },
                );
            }
            (lower, rest)
        }
        None => ("nats".to_owned(), url),
    };
    let (userinfo, rest) = split_userinfo(rest);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) = match split_ipv6(authority)? {
        Some(host_port) => host_port,
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if !authority.starts_with('[') && host.contains([':', '?', '#', ' ']) {
        return Err("the host is not a host name or IP address (IPv6 goes in [...])".into());
    }
    if let Some(port) = port {
        parse_port(port)?;
    }
    let credentials = match userinfo.filter(|u| !u.is_empty()) {
        None => None,
        Some(userinfo) => Some(match userinfo.split_once(':') {
            Some((user, password)) => {
                let user = percent_decode(user, "user name")?;
                if user.is_empty() {
                    return Err("the user info has a password but no user name".into());
                }
                UrlCredentials::UserPassword(
                    user,
                    Secret::from(percent_decode(password, "password")?),
                )
            }
            None => UrlCredentials::Token(Secret::from(percent_decode(userinfo, "token")?)),
        }),
    };
    Ok(NatsUrl {
        server: format!("{scheme}://{authority}{path}"),
        scheme,
        host: host.to_owned(),
        credentials,
    })
}

/// Replaces the user info of a URL (`scheme://user:pass@host`, `user:pass@host`) with `***`,
/// by the same last-`@` rule the parsers use, so that whatever they took as user info is
/// hidden.
pub(super) fn redact_url_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    match split_userinfo(rest) {
        (Some(_), tail) => match scheme {
            Some(scheme) => format!("{scheme}://{REDACTED}@{tail}"),
            None => format!("{REDACTED}@{tail}"),
        },
        (None, _) => url.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// One entry of `nats.urls`, split into the address the client connects to and the credentials
/// the URL carried.
#[derive(Clone, Debug, PartialEq)]
pub struct NatsUrl {
    /// Lower-case scheme: `nats` (also when none was written), `tls`, `ws` or `wss`.
    pub scheme: String,
    /// Host name or IP address, without IPv6 brackets.
    pub host: String,
    /// `scheme://host[:port][/path]`, without user info: what the client is given.
    pub server: String,
    /// Credentials written in the URL.
    pub credentials: Option<UrlCredentials>,
}

/// Credentials written in a NATS URL.
#[derive(Clone, Debug, PartialEq)]
pub enum UrlCredentials {
    /// `user:password@`.
    UserPassword(String, Secret),
    /// `token@` (no `:`), NATS' convention for a token.
    Token(Secret),
}

impl NatsUrl {
    /// True for a loopback host (`localhost`, `127.0.0.0/8`, `::1`).
    pub(crate) fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

#[cfg(test)]
mod tests;
