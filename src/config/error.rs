//! [`ConfigError`]: one line naming the file or the field, never a secret.

use std::path::PathBuf;

use super::overlay::field_sources;

/// Why the configuration could not be loaded or is not usable. Every message is one line that
/// names the file or the field, and never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    Io {
        /// The file named by `--config` / `BRIDGE_CONFIG`.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML, or has an unknown key or a wrongly typed value.
    #[error("{}: {message}", path.display())]
    Toml {
        /// The file named by `--config` / `BRIDGE_CONFIG`.
        path: PathBuf,
        /// The parser's message, prefixed with the line and column.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid {field}{}: {reason}", sources_hint(.field))]
    Invalid {
        /// The field as a TOML key, e.g. `replication.slot`.
        field: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// A connection URL cannot be parsed.
    #[error("invalid {field}{}: {reason}", sources_hint(.field))]
    Url {
        /// The field as a TOML key: `postgres.url` or `nats.urls`.
        field: &'static str,
        /// What is wrong; never the URL itself, which may hold a password.
        reason: String,
    },
}

/// " (--flag / ENV)" for a field, or nothing for a field without a flag.
fn sources_hint(field: &str) -> String {
    field_sources()
        .find(|(key, _, _)| *key == field)
        .map(|(_, flag, env)| format!(" ({flag} / {env})"))
        .unwrap_or_default()
}

pub(super) fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}
