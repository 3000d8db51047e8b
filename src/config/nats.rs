//! `[nats]`: the NATS servers, the one authentication method and TLS.

use std::fmt;
use std::path::PathBuf;

use serde::{Serialize, Serializer};

use super::error::{invalid, ConfigError};
use super::url::{parse_nats_url, redact_url_userinfo, NatsUrl, UrlCredentials};
use super::Secret;

/// NATS server list.
pub(crate) const DEFAULT_NATS_URL: &str = "nats://localhost:4222";
/// Inbox prefix: the NATS clients' own default.
pub(crate) const DEFAULT_INBOX_PREFIX: &str = "_INBOX";

/// NATS connection.
#[derive(Clone, PartialEq, Serialize)]
pub struct NatsConfig {
    /// Servers, as `nats://host:port`, `tls://host:port`, `host:port` or `host`; the client
    /// picks one and fails over to the others. Credentials in a URL (`user:password@` or
    /// `token@`) are taken out of it, used as the authentication, and redacted.
    #[serde(serialize_with = "serialize_redacted_urls")]
    pub urls: Vec<String>,
    /// User name (`NATS_BRIDGE_USER`); needs `password` too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password (`NATS_BRIDGE_PASSWORD`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Authentication token, instead of user and password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// A `.creds` file (JWT and NKey seed), instead of user/password or token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// A bare NKey user seed (`SU...`), for servers that list the user's public key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed: Option<Secret>,
    /// A file holding the NKey user seed, instead of `nkey_seed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS. Also on when a URL is `tls://` or a CA or client
    /// certificate is configured.
    pub tls_required: bool,
    /// PEM file of the CA certificates that sign the server's certificate (instead of the
    /// system's roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (`verify: true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Prefix of the bridge's inboxes: the subjects its PubAcks and the answers to its
    /// JetStream requests come back on (`{prefix}.{unique token}.…`). A prefix of its own lets
    /// NATS permissions keep every other user from publishing (forging a PubAck) or
    /// subscribing there.
    pub inbox_prefix: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec![DEFAULT_NATS_URL.to_owned()],
            user: None,
            password: None,
            token: None,
            creds_file: None,
            nkey_seed: None,
            nkey_file: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            inbox_prefix: DEFAULT_INBOX_PREFIX.to_owned(),
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("urls", &self.redacted_urls())
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("creds_file", &self.creds_file)
            .field("nkey_seed", &self.nkey_seed)
            .field("nkey_file", &self.nkey_file)
            .field("tls_required", &self.tls_required)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

fn serialize_redacted_urls<S: Serializer>(
    urls: &[String],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(urls.iter().map(|u| redact_url_userinfo(u)))
}

/// How the bridge authenticates to NATS: exactly one of these (see [`NatsConfig::auth`]).
#[derive(Clone, Debug, PartialEq)]
pub enum NatsAuth {
    /// No credentials.
    None,
    /// `nats.user` and `nats.password`, or `user:password@` in the URLs.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: Secret,
    },
    /// `nats.token`, or `token@` in the URLs.
    Token(Secret),
    /// `nats.creds_file`.
    CredsFile(PathBuf),
    /// `nats.nkey_seed`.
    NkeySeed(Secret),
    /// `nats.nkey_file`.
    NkeyFile(PathBuf),
}

impl NatsAuth {
    /// A name for logs: `none`, `user`, `token`, `creds`, `nkey`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            NatsAuth::None => "none",
            NatsAuth::UserPassword { .. } => "user",
            NatsAuth::Token(_) => "token",
            NatsAuth::CredsFile(_) => "creds",
            NatsAuth::NkeySeed(_) | NatsAuth::NkeyFile(_) => "nkey",
        }
    }
}

impl NatsConfig {
    /// The server list with credentials replaced by `***`, for logs.
    pub(crate) fn redacted_urls(&self) -> Vec<String> {
        self.urls.iter().map(|u| redact_url_userinfo(u)).collect()
    }

    /// Parses every server URL. Errors name the entry by position, never by its text, which
    /// may hold a password.
    pub(crate) fn servers(&self) -> Result<Vec<NatsUrl>, ConfigError> {
        let total = self.urls.len();
        self.urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                parse_nats_url(url).map_err(|reason| ConfigError::Url {
                    field: "nats.urls",
                    reason: format!("server {} of {total}: {reason}", i + 1),
                })
            })
            .collect()
    }

    /// True when every connection must use TLS: `tls_required`, a `tls://` URL (so that a
    /// fail-over never falls back to plain text), or a CA or client certificate.
    pub(crate) fn requires_tls(&self) -> bool {
        self.tls_required
            || self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self
                .urls
                .iter()
                .any(|u| u.trim_start().to_ascii_lowercase().starts_with("tls://"))
    }

    /// The one authentication method configured, from the settings or the URLs; an error
    /// when there are several.
    pub(crate) fn auth(&self) -> Result<NatsAuth, ConfigError> {
        let mut from_urls: Option<UrlCredentials> = None;
        for server in self.servers()? {
            if let Some(c) = server.credentials {
                if from_urls.as_ref().is_some_and(|seen| *seen != c) {
                    return Err(invalid(
                        "nats.urls",
                        "the server URLs carry different credentials; the client sends one set \
                         to every server",
                    ));
                }
                from_urls = Some(c);
            }
        }
        let mut methods = Vec::new();
        if let Some(c) = from_urls {
            methods.push(match c {
                UrlCredentials::UserPassword(user, password) => {
                    NatsAuth::UserPassword { user, password }
                }
                UrlCredentials::Token(token) => NatsAuth::Token(token),
            });
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            methods.push(NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            });
        }
        if let Some(token) = &self.token {
            methods.push(NatsAuth::Token(token.clone()));
        }
        if let Some(path) = &self.creds_file {
            methods.push(NatsAuth::CredsFile(path.clone()));
        }
        if let Some(seed) = &self.nkey_seed {
            methods.push(NatsAuth::NkeySeed(seed.clone()));
        }
        if let Some(path) = &self.nkey_file {
            methods.push(NatsAuth::NkeyFile(path.clone()));
        }
        if methods.len() > 1 {
            let field = if self.token.is_some() {
                "nats.token"
            } else if self.nkey_seed.is_some() {
                "nats.nkey_seed"
            } else if self.nkey_file.is_some() {
                "nats.nkey_file"
            } else if self.creds_file.is_some() {
                "nats.creds_file"
            } else {
                "nats.user"
            };
            let kinds: Vec<&str> = methods.iter().map(NatsAuth::kind).collect();
            return Err(invalid(
                field,
                format!(
                    "give only one NATS authentication: user and password, a token, a creds \
                     file or an nkey (found {}, counting credentials in nats.urls)",
                    kinds.join(" and ")
                ),
            ));
        }
        Ok(methods.pop().unwrap_or(NatsAuth::None))
    }

    /// A warning when credentials would cross the network in plain text: some authentication
    /// is configured, TLS is not required, and a server is neither loopback nor `wss://`. The
    /// server may still demand TLS itself, which the client then follows.
    pub fn plaintext_credentials_warning(&self) -> Option<String> {
        let auth = self.auth().ok()?;
        if auth == NatsAuth::None || self.requires_tls() {
            return None;
        }
        let exposed: Vec<String> = self
            .servers()
            .ok()?
            .into_iter()
            .filter(|s| s.scheme != "wss" && !s.is_loopback())
            .map(|s| s.server)
            .collect();
        if exposed.is_empty() {
            return None;
        }
        Some(format!(
            "NATS credentials ({}) would travel unencrypted to {} unless the server requires \
             TLS: use tls:// URLs or set nats.tls_required (--nats-tls-required / \
             NATS_TLS_REQUIRED)",
            auth.kind(),
            exposed.join(", ")
        ))
    }
}

/// A usable NKey user seed. The reason never shows the seed.
pub(crate) fn check_nkey_seed(seed: &str) -> Result<(), String> {
    if !seed.starts_with("SU") {
        return Err("is not an NKey user seed (those start with SU)".into());
    }
    nkeys::KeyPair::from_seed(seed)
        .map(|_| ())
        .map_err(|_| "is not a valid NKey seed (bad length or checksum)".into())
}
