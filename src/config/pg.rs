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
    /// Host name, IP address, or directory of the Unix socket (starts with `/`).
    pub host: String,
    /// Port.
    pub port: u16,
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
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            host: DEFAULT_PG_HOST.to_owned(),
            port: DEFAULT_PG_PORT,
            user: DEFAULT_PG_USER.to_owned(),
            password: None,
            dbname: DEFAULT_PG_DBNAME.to_owned(),
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            connect_timeout_secs: DEFAULT_PG_CONNECT_TIMEOUT_SECS,
        }
    }
}

impl PgConfig {
    /// Keyword/value pairs for `PQconnectdbParams`: host, port, user, password, dbname,
    /// connect_timeout and application_name, and sslmode, sslrootcert, sslcert and sslkey when
    /// configured: a keyword left out lets libpq read its `PG*` environment variable (`PGSSLMODE`,
    /// `PGSSLROOTCERT`, ...) and then its own default. The caller adds `replication`,
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
        params
    }
}
