//! Loading: the defaults, then the file, the environment and the flags, each an [`Overlay`];
//! then the PostgreSQL URL is expanded and the result validated.

use std::path::{Path, PathBuf};

use super::error::ConfigError;
use super::overlay::{Overlay, PgOverlay};
use super::pg::{
    DEFAULT_PG_CONNECT_TIMEOUT_SECS, DEFAULT_PG_DBNAME, DEFAULT_PG_HOST, DEFAULT_PG_PORT,
    DEFAULT_PG_USER,
};
use super::replication::{Envelope, Format};
use super::url::{parse_pg_url, PgUrlParts};
use super::{Config, PgConfig, PgPorts, TargetSessionAttrs};

/// What the sources say, in rising precedence over the defaults: the configuration file, the
/// environment, the command line.
#[derive(Clone, Debug, Default)]
pub struct Layers {
    /// The TOML file (`--config` / `BRIDGE_CONFIG`), read by [`Config::load`].
    pub file: Option<PathBuf>,
    /// The values given by environment variables.
    pub env: Overlay,
    /// The values given by command-line flags.
    pub flags: Overlay,
}

impl Config {
    /// Loads the effective configuration: the defaults, then the file (if any), the environment
    /// and the flags, each only where it gives a value; expands the PostgreSQL URL; validates
    /// the result.
    pub fn load(layers: Layers) -> Result<Self, ConfigError> {
        let mut overlay = match &layers.file {
            Some(path) => read_file(path)?,
            None => Overlay::default(),
        };
        overlay.merge(layers.env);
        overlay.merge(layers.flags);
        let config = resolve(overlay)?;
        config.validate()?;
        Ok(config)
    }
}

fn read_file(path: &Path) -> Result<Overlay, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_file(&text, path)
}

/// Parses a configuration file; `origin` names it in error messages, which give the line and
/// column.
pub(super) fn parse_file(text: &str, origin: &Path) -> Result<Overlay, ConfigError> {
    toml::from_str(text).map_err(|err| {
        let message = err.message().replace('\n', " ");
        let message = match err.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: {message}")
            }
            None => message,
        };
        ConfigError::Toml {
            path: origin.to_owned(),
            message,
        }
    })
}

/// Lays the merged overlay over the defaults and expands the PostgreSQL URL.
pub(super) fn resolve(mut overlay: Overlay) -> Result<Config, ConfigError> {
    let mut config = Config {
        postgres: resolve_pg(std::mem::take(&mut overlay.postgres))?,
        ..Config::default()
    };
    // The Debezium envelope is JSON: it implies `--format json` unless a format is given,
    // and validation refuses a given `msgpack` rather than ignoring it.
    if overlay.replication.envelope == Some(Envelope::Debezium)
        && overlay.replication.format.is_none()
    {
        overlay.replication.format = Some(Format::Json);
    }
    overlay.apply_to(&mut config);
    config.nats.urls = config
        .nats
        .urls
        .iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    Ok(config)
}

/// Each part: given on its own, else the URL's, else the default.
fn resolve_pg(given: PgOverlay) -> Result<PgConfig, ConfigError> {
    let url = match &given.url {
        Some(url) => parse_pg_url(url.expose()).map_err(|reason| ConfigError::Url {
            field: "postgres.url",
            reason,
        })?,
        None => PgUrlParts::default(),
    };
    let host = given
        .host
        .or(url.host)
        .unwrap_or_else(|| DEFAULT_PG_HOST.to_owned());
    // With several hosts, only the primary will do: a standby cannot hold the slot.
    let target_session_attrs = given
        .target_session_attrs
        .or(url.target_session_attrs)
        .or_else(|| host.contains(',').then_some(TargetSessionAttrs::ReadWrite));
    Ok(PgConfig {
        host,
        port: given
            .port
            .or(url.port)
            .unwrap_or(PgPorts::single(DEFAULT_PG_PORT)),
        user: given
            .user
            .or(url.user)
            .unwrap_or_else(|| DEFAULT_PG_USER.to_owned()),
        password: given.password.or(url.password),
        dbname: given
            .dbname
            .or(url.dbname)
            .unwrap_or_else(|| DEFAULT_PG_DBNAME.to_owned()),
        sslmode: given.sslmode.or(url.sslmode),
        sslrootcert: given.sslrootcert.or(url.sslrootcert),
        sslcert: given.sslcert.or(url.sslcert),
        sslkey: given.sslkey.or(url.sslkey),
        connect_timeout_secs: given
            .connect_timeout_secs
            .or(url.connect_timeout_secs)
            .unwrap_or(DEFAULT_PG_CONNECT_TIMEOUT_SECS),
        target_session_attrs,
    })
}
