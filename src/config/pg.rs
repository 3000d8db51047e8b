//! `[postgres]`: the PostgreSQL connection, and libpq's `sslmode`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Secret;

/// PostgreSQL host when neither a host nor a URL gives one.
pub(crate) const DEFAULT_PG_HOST: &str = "localhost";
/// PostgreSQL port.
pub(crate) const DEFAULT_PG_PORT: u16 = 5432;
/// PostgreSQL user.
pub(crate) const DEFAULT_PG_USER: &str = "postgres";
/// PostgreSQL database.
pub(crate) const DEFAULT_PG_DBNAME: &str = "postgres";
/// What `sslmode` means when none is configured: nothing is passed, so libpq applies its own
/// default, `PGSSLMODE` from the environment or else `prefer`.
pub(crate) const DEFAULT_PG_SSLMODE_TEXT: &str = "libpq's own: PGSSLMODE, else prefer";
/// libpq `connect_timeout`, in seconds.
pub(crate) const DEFAULT_PG_CONNECT_TIMEOUT_SECS: u64 = 10;
/// `application_name` sent to PostgreSQL, visible in `pg_stat_activity` and `pg_stat_replication`.
pub(crate) const PG_APPLICATION_NAME: &str = "pgbridge";

/// One port for every host, or one per host in the host's order: `5432` or `5432,5433`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgPorts(Vec<u16>);

impl PgPorts {
    /// The same port for every host.
    pub fn single(port: u16) -> Self {
        PgPorts(vec![port])
    }

    /// The ports as given.
    pub fn as_slice(&self) -> &[u16] {
        &self.0
    }

    /// The port of host number `i` (the only one when a single port serves every host).
    pub(crate) fn of_host(&self, i: usize) -> u16 {
        match self.0.as_slice() {
            [one] => *one,
            many => many.get(i).copied().unwrap_or(DEFAULT_PG_PORT),
        }
    }
}

impl From<Vec<u16>> for PgPorts {
    fn from(ports: Vec<u16>) -> Self {
        PgPorts(ports)
    }
}

impl fmt::Display for PgPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text: Vec<String> = self.0.iter().map(u16::to_string).collect();
        f.write_str(&text.join(","))
    }
}

impl FromStr for PgPorts {
    type Err = String;

    /// `5432` or a comma list `5432,5433`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(|p| {
                p.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("port '{}' is not a number from 1 to 65535", p.trim()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(PgPorts)
    }
}

/// A single port serializes as a number (as before several hosts were possible), a list as
/// the text `5432,5433`.
impl Serialize for PgPorts {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => serializer.serialize_u16(*one),
            _ => serializer.serialize_str(&self.to_string()),
        }
    }
}

/// In the file: `port = 5432`, `port = "5432,5433"` or `port = [5432, 5433]`.
impl<'de> Deserialize<'de> for PgPorts {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            One(u16),
            Text(String),
            List(Vec<u16>),
        }
        match Given::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "expected a port (5432), a comma list (\"5432,5433\") or an array ([5432, 5433])",
            )
        })? {
            Given::One(p) => Ok(PgPorts::single(p)),
            Given::Text(t) => t.parse().map_err(serde::de::Error::custom),
            Given::List(l) => Ok(PgPorts(l)),
        }
    }
}

/// libpq `target_session_attrs`: which of several hosts a connection may end on. The bridge
/// writes a replication slot and follows a promotion, so it accepts only the values that
/// reach the primary (and `any`, for a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TargetSessionAttrs {
    /// The first host that answers.
    Any,
    /// A host that accepts writes (the primary).
    ReadWrite,
    /// A host that is not in recovery (the primary).
    Primary,
}

impl TargetSessionAttrs {
    /// The libpq keyword value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::Primary => "primary",
        }
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TargetSessionAttrs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" => Ok(TargetSessionAttrs::Any),
            "read-write" => Ok(TargetSessionAttrs::ReadWrite),
            "primary" => Ok(TargetSessionAttrs::Primary),
            "read-only" | "standby" | "prefer-standby" => Err(format!(
                "target_session_attrs '{s}' would connect to a standby; the bridge needs the \
                 primary: use read-write or primary"
            )),
            _ => Err(format!(
                "unknown target_session_attrs '{s}' (expected read-write, primary or any)"
            )),
        }
    }
}

/// libpq `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS only if the server insists.
    Allow,
    /// Use TLS if the server supports it (libpq's default).
    #[default]
    Prefer,
    /// Always use TLS, without verifying the certificate.
    Require,
    /// Always use TLS and verify the certificate chain.
    VerifyCa,
    /// Always use TLS, verify the chain and the host name.
    VerifyFull,
}

impl SslMode {
    /// The libpq keyword value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            SslMode::Disable,
            SslMode::Allow,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| {
            format!(
                "unknown sslmode '{s}' (expected disable, allow, prefer, require, verify-ca or verify-full)"
            )
        })
    }
}

/// PostgreSQL connection, fully resolved: the URL, if any, is already expanded into these parts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PgConfig {
    /// Host name, IP address, or directory of the Unix socket (starts with `/`); several,
    /// comma separated, are tried in turn (see `target_session_attrs`).
    pub host: String,
    /// Port: one for every host, or one per host.
    pub port: PgPorts,
    /// Role to connect as; it needs REPLICATION and SELECT on the published tables.
    pub user: String,
    /// Password; `None` leaves it to libpq (`~/.pgpass`, trust, peer ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Database holding the publication.
    pub dbname: String,
    /// libpq `sslmode`; `None` passes nothing, so that libpq's own default (`PGSSLMODE`, else
    /// `prefer`) applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<SslMode>,
    /// libpq `sslrootcert`: CA certificates that sign the server's certificate (or `system`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
    /// libpq `sslcert`: the client certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslcert: Option<PathBuf>,
    /// libpq `sslkey`: the client certificate's private key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslkey: Option<PathBuf>,
    /// libpq `connect_timeout`, in seconds.
    pub connect_timeout_secs: u64,
    /// libpq `target_session_attrs`; `None` passes nothing (libpq's `PGTARGETSESSIONATTRS`,
    /// else `any`). Several hosts without it get `read-write` when the URL is expanded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_session_attrs: Option<TargetSessionAttrs>,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            host: DEFAULT_PG_HOST.to_owned(),
            port: PgPorts::single(DEFAULT_PG_PORT),
            user: DEFAULT_PG_USER.to_owned(),
            password: None,
            dbname: DEFAULT_PG_DBNAME.to_owned(),
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            connect_timeout_secs: DEFAULT_PG_CONNECT_TIMEOUT_SECS,
            target_session_attrs: None,
        }
    }
}

impl PgConfig {
    /// The hosts, each with its port: `h1:5432,[::1]:5433` (for the start-up line).
    pub(crate) fn addresses(&self) -> String {
        self.hosts()
            .enumerate()
            .map(|(i, h)| {
                let port = self.port.of_host(i);
                if h.contains(':') {
                    format!("[{h}]:{port}")
                } else {
                    format!("{h}:{port}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The hosts of the comma list.
    pub(crate) fn hosts(&self) -> impl Iterator<Item = &str> {
        self.host.split(',').map(str::trim)
    }

    /// Keyword/value pairs for `PQconnectdbParams`: host, port, user, password, dbname,
    /// connect_timeout and application_name, and target_session_attrs, sslmode, sslrootcert,
    /// sslcert and sslkey when configured: a keyword left out lets libpq read its `PG*`
    /// environment variable (`PGSSLMODE`, `PGSSLROOTCERT`, ...) and then its own default. The
    /// host and port may be comma lists; libpq tries the hosts in turn. The caller adds `replication`,
    /// `options` and the like, and must pass `expand_dbname = 0` so that a database name is never
    /// read as a connection string. The password is in clear text here: do not log the result.
    pub(crate) fn libpq_params(&self) -> Vec<(&'static str, String)> {
        let mut params = vec![
            ("host", self.host.clone()),
            ("port", self.port.to_string()),
            ("user", self.user.clone()),
        ];
        if let Some(password) = &self.password {
            params.push(("password", password.expose().to_owned()));
        }
        params.push(("dbname", self.dbname.clone()));
        if let Some(mode) = self.sslmode {
            params.push(("sslmode", mode.as_str().to_owned()));
        }
        for (key, path) in [
            ("sslrootcert", &self.sslrootcert),
            ("sslcert", &self.sslcert),
            ("sslkey", &self.sslkey),
        ] {
            if let Some(path) = path {
                params.push((key, path.to_string_lossy().into_owned()));
            }
        }
        params.extend([
            ("connect_timeout", self.connect_timeout_secs.to_string()),
            ("application_name", PG_APPLICATION_NAME.to_owned()),
        ]);
        if let Some(attrs) = self.target_session_attrs {
            params.push(("target_session_attrs", attrs.as_str().to_owned()));
        }
        params
    }
}
