//! Connecting to NATS: servers, credentials, TLS, the reconnect policy and the connection's
//! counters, and [`NatsError`], the error of everything on the NATS side.
//!
//! [`connect`] opens a client that reconnects forever once it is up, but fails fast with a
//! clear [`NatsError`] when the first connection cannot be made, so the caller decides whether
//! to retry. Nothing here formats a password, token or credential-bearing URL into a log line
//! or an error.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{RequestError, RequestErrorKind};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectError, ConnectErrorKind, ConnectOptions, Event, ServerError};

use crate::config::{check_nkey_seed, NatsAuth, NatsConfig};
use crate::telemetry::counters::NatsStats;

/// Longest wait for one server to accept the TCP connection and the handshake.
pub const SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the first connection as a whole (all servers of the list).
pub const INITIAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two reconnect attempts once the connection was lost. Short, because
/// the wal thread is held back while NATS is away.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// Interval of client pings; a connection that silently died is noticed after two missed ones.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);

/// Why connecting to NATS or setting up JetStream failed. Every message is one line that says
/// what to do, and never contains a secret. Match on the variant to decide what to do next;
/// [`NatsError::is_configuration`] separates what a retry cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// No server of the list accepted a connection in time.
    #[error(
        "cannot reach NATS at {}: {source}; check that nats-server is running there and that \
         --nats-url / NATS_URL points at it",
        .urls.join(", ")
    )]
    Unreachable {
        /// The configured servers, credentials replaced by `***`.
        urls: Vec<String>,
        /// The client's last error (I/O, DNS, TLS or timeout).
        source: ConnectError,
    },
    /// The server refused the credentials (or wanted some and got none).
    #[error(
        "NATS at {} refused the bridge's credentials ({source}): check the user and password \
         (--nats-user / NATS_BRIDGE_USER, --nats-password / NATS_BRIDGE_PASSWORD), the token \
         (--nats-token / NATS_BRIDGE_TOKEN), the creds file (--nats-creds / NATS_BRIDGE_CREDS), \
         the nkey (--nats-nkey-seed / NATS_NKEY_SEED, --nats-nkey-file / NATS_NKEY_FILE) or the \
         credentials in the URLs",
        .urls.join(", ")
    )]
    Authentication {
        /// The configured servers, credentials replaced by `***`.
        urls: Vec<String>,
        /// What the client reported; the server's answer never echoes the secret.
        source: ConnectError,
    },
    /// The TLS handshake failed, or the server and the client disagree about TLS.
    #[error(
        "TLS with NATS at {} failed: {source}; check that the server's certificate is signed by \
         the CA in --nats-tls-ca-file / NATS_TLS_CA_FILE (or the system's roots) and names the \
         host of the URL, that the client certificate (--nats-tls-cert-file, \
         --nats-tls-key-file) is one the server accepts, and that the server has TLS enabled",
        .urls.join(", ")
    )]
    Tls {
        /// The configured servers, credentials replaced by `***`.
        urls: Vec<String>,
        /// The client's error.
        source: ConnectError,
    },
    /// The `.creds` or NKey seed file could not be read or parsed.
    #[error(
        "cannot use NATS credentials file {}: {source}; check {setting}",
        path.display()
    )]
    Credentials {
        /// The configured file.
        path: PathBuf,
        /// The setting naming it.
        setting: &'static str,
        /// Why it could not be used.
        source: std::io::Error,
    },
    /// The server list cannot be parsed (normally caught by the configuration check first).
    #[error("invalid NATS server list {}: fix --nats-url / NATS_URL", .urls.join(", "))]
    InvalidUrl {
        /// The configured servers, credentials replaced by `***`.
        urls: Vec<String>,
    },
    /// The server runs without JetStream, or not for the bridge's account.
    #[error(
        "JetStream is not enabled on the NATS server: start nats-server with -js (or jetstream {{}} \
         in its config), and enable JetStream for the bridge's account if the server uses \
         accounts ({reason})"
    )]
    JetStreamDisabled {
        /// What the server answered.
        reason: String,
    },
    /// JetStream refused to create a stream the bridge needs.
    #[error(
        "JetStream refused to create stream '{stream}' (subjects {subjects}): {reason}; fix what \
         the server names (another stream already holding these subjects, account or storage \
         limits) or create the stream yourself"
    )]
    StreamRefused {
        /// The stream's name.
        stream: String,
        /// The subjects it was to hold.
        subjects: String,
        /// The server's error.
        reason: String,
    },
    /// The CDC stream holds messages in another format than the configured one: one stream
    /// (and the `schemas` bucket) must not mix MessagePack and JSON.
    #[error(
        "stream '{stream}' holds {found} messages ({source_of_format}) but --format is {configured}: \
         start with --format {found}, or use a new stream (--stream) for {configured}, or purge \
         '{stream}' once its consumers no longer need it"
    )]
    FormatMismatch {
        /// The stream's name.
        stream: String,
        /// The format of the stream's messages.
        found: &'static str,
        /// The configured format.
        configured: &'static str,
        /// How `found` was learnt: the stream's metadata or its last message.
        source_of_format: String,
    },
    /// The server refused a publish or subscription for lack of permissions; the line names
    /// the connection, the subject and what the user needs.
    #[error("{0}")]
    PermissionRefused(String),
    /// A JetStream API request failed in a way that may pass (timeout, connection lost).
    #[error("JetStream request failed while {what}: {source}; the NATS server may be busy or unreachable")]
    Request {
        /// What the bridge was doing, e.g. `reading stream 'CDC'`.
        what: String,
        /// The client's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl NatsError {
    /// True when retrying cannot help and the operator must change something: wrong
    /// credentials, JetStream disabled, a stream the server refuses (exit code 2). False for
    /// transient failures (server unreachable, request timed out) that a retry may overcome.
    pub fn is_configuration(&self) -> bool {
        match self {
            NatsError::Authentication { .. }
            | NatsError::Credentials { .. }
            | NatsError::InvalidUrl { .. }
            | NatsError::JetStreamDisabled { .. }
            | NatsError::StreamRefused { .. }
            | NatsError::FormatMismatch { .. }
            | NatsError::PermissionRefused(_) => true,
            // A handshake can fail while the server's certificate is being replaced: retried.
            NatsError::Unreachable { .. } | NatsError::Tls { .. } | NatsError::Request { .. } => {
                false
            }
        }
    }
}

pub(super) fn request_failed(
    what: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> NatsError {
    NatsError::Request {
        what: what.into(),
        source: Box::new(source),
    }
}

/// "JetStream not enabled" and "not enabled for account" answers of the JetStream API.
pub(super) fn is_jetstream_disabled(error: &jetstream::Error) -> bool {
    matches!(
        error.error_code(),
        ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
    )
}

/// Nobody subscribes to `$JS.API.>` when the server runs without JetStream: the request gets
/// a "no responders" status instead of an answer.
pub(super) const NO_RESPONDERS: &str = "no responders on the JetStream API";

pub(super) fn api_request_failed(what: String, error: RequestError) -> NatsError {
    match error.kind() {
        RequestErrorKind::NoResponders => NatsError::JetStreamDisabled {
            reason: NO_RESPONDERS.to_owned(),
        },
        _ => request_failed(what, error),
    }
}

/// Records a client event in `stats`. `seen_connect` is per connection: the first `Connected` is the
/// initial connection, every later one a reconnect.
fn on_event(stats: &NatsStats, event: &Event, seen_connect: &AtomicBool, client: &ClientName) {
    match event {
        Event::Connected => {
            stats.connected.store(true, Ordering::Relaxed);
            if seen_connect.swap(true, Ordering::Relaxed) {
                let n = stats.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
                log::info!("NATS connection re-established (reconnect {n}); publishing resumes");
            }
            stats.changed.notify_one();
        }
        Event::Disconnected => {
            stats.connected.store(false, Ordering::Relaxed);
            stats.disconnects.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "NATS connection lost; reconnecting (publishing and acknowledgements to \
                 PostgreSQL wait until it is back)"
            );
            stats.changed.notify_one();
        }
        Event::LameDuckMode => log::warn!(
            "NATS server entered lame duck mode (shutting down); the client moves to another \
             server of the list when it closes"
        ),
        Event::SlowConsumer(sid) => {
            log::warn!("NATS slow consumer on subscription {sid}: messages were dropped")
        }
        Event::ServerError(e) if is_permissions_violation(e) => {
            let line = format!(
                "NATS refused {}: {e}; {}",
                client.name,
                permissions_needed(&client.inbox_prefix)
            );
            stats.record_refusal(line);
        }
        Event::ServerError(e) => log::warn!("NATS server error: {e}"),
        // Every failed reconnect attempt reports one; the Disconnected warning says enough.
        Event::ClientError(e) => log::debug!("NATS client error: {e}"),
        Event::Draining | Event::Closed => log::debug!("NATS connection {event}"),
    }
}

/// Runs `work` on a connection until it ends or the server refuses the connection a
/// permission (`stats` are the connection's): work that cannot get further without it, such
/// as setting up the streams or a one-shot command, ends with
/// [`NatsError::PermissionRefused`] (exit code 2) instead of waiting for answers that never
/// come. Streaming waits such a refusal out instead: an operator may grant the permission.
pub async fn unless_refused<T, E: From<NatsError>>(
    stats: &NatsStats,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    tokio::select! {
        done = work => done,
        line = stats.first_refusal() => Err(NatsError::PermissionRefused(line).into()),
    }
}

/// True for the server's refusal of a publish or subscription the user may not make.
fn is_permissions_violation(e: &ServerError) -> bool {
    matches!(e, ServerError::Other(text) if text.contains("Permissions Violation"))
}

/// Who a connection is, for the error a refused permission gets.
struct ClientName {
    /// The connection's name (`pgbridge`, `pgbridge-mirror`, ...).
    name: String,
    /// `nats.inbox_prefix`.
    inbox_prefix: String,
}

/// What the bridge's NATS user, and the commands that read its streams, must be allowed (the
/// operations guide, *NATS permissions*), told with a refusal so that the fix is in the same
/// line.
fn permissions_needed(inbox_prefix: &str) -> String {
    format!(
        "the bridge's NATS user must be allowed to publish on cdc.>, init.>, outbox.>, dlq.>, \
         $KV.schemas.>, the JetStream API subjects of its streams and of the schemas bucket \
         (docs/operations.md, NATS permissions, lists each) and the snapshot requesters' \
         inboxes (--snapshot-reply-prefix, _INBOX. by default), and to subscribe on \
         snapshot.request.> and on its own inboxes {inbox_prefix}.> (--nats-inbox-prefix); \
         bridge mirror, tail and snapshot read the streams through the JetStream API and \
         subscribe on their inboxes {inbox_prefix}.>"
    )
}

/// Delay before reconnect attempt `attempts` (1-based): none for the first, then 250 ms doubling
/// up to [`MAX_RECONNECT_DELAY`].
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(250u64 << exp).min(MAX_RECONNECT_DELAY)
}

/// Connects to NATS with fresh [`NatsStats`]; see [`connect_with_stats`].
pub async fn connect(
    config: &NatsConfig,
    name: &str,
) -> Result<(Client, Arc<NatsStats>), NatsError> {
    let stats = Arc::new(NatsStats::default());
    let client = connect_with_stats(config, name, Arc::clone(&stats)).await?;
    Ok((client, stats))
}

/// Connects to the configured NATS servers as `name` (normally
/// [`CONNECTION_NAME`](super::CONNECTION_NAME)) with the configured credentials and TLS
/// settings. Every NATS connection of the bridge (publisher,
/// snapshot service, admin requests, `bridge mirror`) is made here, so that they all apply.
///
/// The first connection is tried once over the server list, bounded by
/// `INITIAL_CONNECT_TIMEOUT`; failing that the error says why ([`NatsError::Unreachable`],
/// [`NatsError::Authentication`], ...) and the caller decides whether to retry. Once connected,
/// the client reconnects forever by itself; `stats` counts the losses and reconnects.
pub async fn connect_with_stats(
    config: &NatsConfig,
    name: &str,
    stats: Arc<NatsStats>,
) -> Result<Client, NatsError> {
    let urls = config.redacted_urls();
    // Normally checked by the configuration already; the client gets the URLs without their
    // user info, which it would ignore anyway, and the credentials explicitly.
    let servers: Vec<String> = match config.servers() {
        Ok(servers) => servers.into_iter().map(|s| s.server).collect(),
        Err(_) => return Err(NatsError::InvalidUrl { urls }),
    };
    let auth = config
        .auth()
        .map_err(|_| NatsError::InvalidUrl { urls: urls.clone() })?;
    let mut options = ConnectOptions::new();
    match auth {
        NatsAuth::None => {}
        NatsAuth::UserPassword { user, password } => {
            options = options.user_and_password(user, password.expose().to_owned());
        }
        NatsAuth::Token(token) => options = options.token(token.expose().to_owned()),
        NatsAuth::CredsFile(path) => {
            options =
                options
                    .credentials_file(&path)
                    .await
                    .map_err(|source| NatsError::Credentials {
                        path: path.clone(),
                        setting: "--nats-creds / NATS_BRIDGE_CREDS",
                        source,
                    })?;
        }
        NatsAuth::NkeySeed(seed) => options = options.nkey(seed.expose().to_owned()),
        NatsAuth::NkeyFile(path) => {
            let seed = read_nkey_file(&path).map_err(|source| NatsError::Credentials {
                path: path.clone(),
                setting: "--nats-nkey-file / NATS_NKEY_FILE",
                source,
            })?;
            options = options.nkey(seed);
        }
    }
    if config.requires_tls() {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let seen_connect = AtomicBool::new(false);
    let events = Arc::clone(&stats);
    let client_name = ClientName {
        name: name.to_owned(),
        inbox_prefix: config.inbox_prefix.clone(),
    };
    options = options
        .name(name)
        .custom_inbox_prefix(config.inbox_prefix.as_str())
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .connection_timeout(SERVER_CONNECT_TIMEOUT)
        .ping_interval(PING_INTERVAL)
        .event_callback(move |event| {
            on_event(&events, &event, &seen_connect, &client_name);
            async {}
        });

    let attempt = options.connect(servers.as_slice());
    let client = match tokio::time::timeout(INITIAL_CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(client)) => client,
        Ok(Err(source)) => {
            return Err(match source.kind() {
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                    NatsError::Authentication { urls, source }
                }
                ConnectErrorKind::ServerParse => NatsError::InvalidUrl { urls },
                _ if is_tls_failure(&source) => NatsError::Tls { urls, source },
                _ => NatsError::Unreachable { urls, source },
            })
        }
        Err(_elapsed) => {
            return Err(NatsError::Unreachable {
                urls,
                source: ConnectError::new(ConnectErrorKind::TimedOut),
            })
        }
    };
    // The Connected event is handled on the client's own task, maybe later than this.
    stats.connected.store(true, Ordering::Relaxed);
    let info = client.server_info();
    log::info!(
        "connected to NATS {} (server {}, max payload {} bytes, JetStream {})",
        info.version,
        info.server_name,
        max_payload(&client),
        if info.jetstream { "on" } else { "off" }
    );
    Ok(client)
}

/// True when the connection failed in TLS: the client reports a refused certificate or a
/// handshake alert as an I/O error wrapping the rustls error.
fn is_tls_failure(error: &ConnectError) -> bool {
    use async_nats::rustls;
    if error.kind() == ConnectErrorKind::Tls {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if e.is::<rustls::Error>()
            || e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// The NKey user seed in `path`: its first line starting with `SU` (the file `nk -gen user`
/// writes holds only that line). The error never shows the file's content.
fn read_nkey_file(path: &std::path::Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU"))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no NKey user seed in it (a line starting with SU)",
            )
        })?;
    check_nkey_seed(seed).map_err(|reason| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the seed {reason}"),
        )
    })?;
    Ok(seed.to_owned())
}

/// Largest message the connected server accepts, headers included (`max_payload` of its
/// `INFO`). A change that does not fit cannot be published and must be reported.
pub fn max_payload(client: &Client) -> usize {
    match client.server_info().max_payload {
        0 => client.max_payload(),
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permissions_violation_says_what_the_user_needs() {
        let refused =
            ServerError::Other("Permissions Violation for Subscription to \"_INBOX.abc.*\"".into());
        assert!(is_permissions_violation(&refused));
        assert!(!is_permissions_violation(&ServerError::Other(
            "Maximum Payload Violation".into()
        )));
        assert!(!is_permissions_violation(
            &ServerError::AuthorizationViolation
        ));
        let hint = permissions_needed("_INBOX_pgbridge");
        assert!(
            hint.contains(
                "subscribe on snapshot.request.> and on its own inboxes _INBOX_pgbridge.>"
            ),
            "{hint}"
        );
        assert!(
            hint.contains("bridge mirror, tail and snapshot")
                && hint.contains("subscribe on their inboxes _INBOX_pgbridge.>"),
            "{hint}"
        );
        assert!(
            hint.contains("JetStream API subjects of its streams")
                && hint.contains("--nats-inbox-prefix"),
            "{hint}"
        );
    }

    #[test]
    fn reconnect_delays_grow_to_the_cap() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(250));
        assert_eq!(reconnect_delay(3), Duration::from_millis(500));
        assert_eq!(reconnect_delay(5), Duration::from_secs(2));
        assert_eq!(reconnect_delay(1_000_000), MAX_RECONNECT_DELAY);
    }

    #[test]
    fn stats_count_reconnects_not_the_first_connect() {
        let stats = NatsStats::default();
        let seen = AtomicBool::new(false);
        let name = ClientName {
            name: crate::sink::nats::CONNECTION_NAME.into(),
            inbox_prefix: "_INBOX".into(),
        };
        on_event(&stats, &Event::Connected, &seen, &name);
        assert!(stats.is_connected());
        assert_eq!(stats.reconnects(), 0);
        on_event(&stats, &Event::Disconnected, &seen, &name);
        assert!(!stats.is_connected());
        assert_eq!(stats.disconnects(), 1);
        on_event(&stats, &Event::Connected, &seen, &name);
        assert!(stats.is_connected());
        assert_eq!(stats.reconnects(), 1);
    }

    #[test]
    fn configuration_errors_are_told_apart() {
        let disabled = NatsError::JetStreamDisabled {
            reason: NO_RESPONDERS.into(),
        };
        assert!(disabled.is_configuration());
        assert!(disabled
            .to_string()
            .starts_with("JetStream is not enabled on the NATS server: start nats-server with -js (or jetstream {} in its config)"));
        let unreachable = NatsError::Unreachable {
            urls: vec!["nats://***@h:4222".into()],
            source: ConnectError::new(ConnectErrorKind::TimedOut),
        };
        assert!(!unreachable.is_configuration());
        assert!(unreachable.to_string().contains("nats://***@h:4222"));
        let refused = NatsError::StreamRefused {
            stream: "CDC".into(),
            subjects: "cdc.>".into(),
            reason: "subjects overlap".into(),
        };
        assert!(refused.is_configuration());
        assert!(!request_failed("x", std::io::Error::other("timeout")).is_configuration());
    }
}
