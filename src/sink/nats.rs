//! The NATS connection and the JetStream set-up the publisher and the snapshot thread build on.
//!
//! - [`connect`] opens a client that reconnects forever once it is up, but fails fast with a
//!   clear [`NatsError`] when the first connection cannot be made, so the caller decides whether
//!   to retry. Connection losses and reconnects are counted in [`NatsStats`].
//! - [`ensure_streams`] makes sure the CDC and INIT streams of DESIGN §3 exist: it creates the
//!   missing ones with the bridge's settings and leaves existing ones alone, warning (and
//!   reporting in [`StreamsInfo::warnings`]) where their settings break a guarantee.
//!
//! Everything here is async and meant for the small tokio runtime of the calling thread. Nothing
//! here formats a password, token or credential-bearing URL into a log line or an error.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamErrorKind, RequestError, RequestErrorKind};
use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectError, ConnectErrorKind, ConnectOptions, Event};

use crate::config::{check_nkey_seed, Format, NatsAuth, NatsConfig, StreamsConfig};
use crate::wire::names::{CDC_SUBJECT_PREFIX, FORMAT_METADATA_KEY, INIT_SUBJECT_PREFIX};

/// Connection name the bridge shows in the server's monitoring (`/connz`).
pub const CONNECTION_NAME: &str = "pgbridge";

/// Longest wait for one server to accept the TCP connection and the handshake.
pub const SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the first connection as a whole (all servers of the list).
pub const INITIAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two reconnect attempts once the connection was lost. Short, because
/// the wal thread is held back while NATS is away.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// Interval of client pings; a connection that silently died is noticed after two missed ones.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest CDC duplicate window that still covers a bridge restart: changes republished after
/// a crash arrive about this long after the first copy at most.
pub const MIN_SAFE_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Descriptions set on the streams the bridge creates, shown by `nats stream info`.
const INIT_DESCRIPTION: &str = "pgbridge snapshots (init.snap.*, init.meta.*)";
const CDC_DESCRIPTION: &str = "pgbridge change events (cdc.{table}.{op})";

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

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
            | NatsError::FormatMismatch { .. } => true,
            // A handshake can fail while the server's certificate is being replaced: retried.
            NatsError::Unreachable { .. } | NatsError::Tls { .. } | NatsError::Request { .. } => {
                false
            }
        }
    }
}

fn request_failed(
    what: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> NatsError {
    NatsError::Request {
        what: what.into(),
        source: Box::new(source),
    }
}

/// "JetStream not enabled" and "not enabled for account" answers of the JetStream API.
fn is_jetstream_disabled(error: &jetstream::Error) -> bool {
    matches!(
        error.error_code(),
        ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
    )
}

/// Nobody subscribes to `$JS.API.>` when the server runs without JetStream: the request gets
/// a "no responders" status instead of an answer.
const NO_RESPONDERS: &str = "no responders on the JetStream API";

fn api_request_failed(what: String, error: RequestError) -> NatsError {
    match error.kind() {
        RequestErrorKind::NoResponders => NatsError::JetStreamDisabled {
            reason: NO_RESPONDERS.to_owned(),
        },
        _ => request_failed(what, error),
    }
}

// ---------------------------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------------------------

/// Connection state and counters of one NATS connection, updated from the client's event
/// callback and read by metrics and `/status`. Share it across attempts of the same logical
/// connection (e.g. when the caller retries [`connect_with_stats`]), not between connections.
#[derive(Debug, Default)]
pub struct NatsStats {
    /// True while the client holds a connection to a server.
    pub connected: AtomicBool,
    /// Times the connection came back after it was lost (`bridge_nats_reconnects_total`).
    pub reconnects: AtomicU64,
    /// Times the connection was lost.
    pub disconnects: AtomicU64,
    /// Woken at every connect and disconnect, for the publisher to wait on instead of polling.
    pub changed: tokio::sync::Notify,
}

impl NatsStats {
    /// True while connected.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Disconnects so far.
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }

    /// Records a client event. `seen_connect` is per connection: the first `Connected` is the
    /// initial connection, every later one a reconnect.
    fn on_event(&self, event: &Event, seen_connect: &AtomicBool) {
        match event {
            Event::Connected => {
                self.connected.store(true, Ordering::Relaxed);
                if seen_connect.swap(true, Ordering::Relaxed) {
                    let n = self.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
                    log::info!(
                        "NATS connection re-established (reconnect {n}); publishing resumes"
                    );
                }
                self.changed.notify_one();
            }
            Event::Disconnected => {
                self.connected.store(false, Ordering::Relaxed);
                self.disconnects.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "NATS connection lost; reconnecting (publishing and acknowledgements to \
                     PostgreSQL wait until it is back)"
                );
                self.changed.notify_one();
            }
            Event::LameDuckMode => log::warn!(
                "NATS server entered lame duck mode (shutting down); the client moves to another \
                 server of the list when it closes"
            ),
            Event::SlowConsumer(sid) => {
                log::warn!("NATS slow consumer on subscription {sid}: messages were dropped")
            }
            Event::ServerError(e) => log::warn!("NATS server error: {e}"),
            // Every failed reconnect attempt reports one; the Disconnected warning says enough.
            Event::ClientError(e) => log::debug!("NATS client error: {e}"),
            Event::Draining | Event::Closed => log::debug!("NATS connection {event}"),
        }
    }
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

/// Connects to the configured NATS servers as `name` (normally [`CONNECTION_NAME`]) with the
/// configured credentials and TLS settings. Every NATS connection of the bridge (publisher,
/// snapshot service, admin requests, `bridge mirror`) is made here, so that they all apply.
///
/// The first connection is tried once over the server list, bounded by
/// [`INITIAL_CONNECT_TIMEOUT`]; failing that the error says why ([`NatsError::Unreachable`],
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
    options = options
        .name(name)
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .connection_timeout(SERVER_CONNECT_TIMEOUT)
        .ping_interval(PING_INTERVAL)
        .event_callback(move |event| {
            events.on_event(&event, &seen_connect);
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

// ---------------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------------

/// What [`ensure_streams`] found or made.
#[derive(Debug, Clone)]
pub struct StreamsInfo {
    /// The CDC stream as the server reports it.
    pub cdc: stream::Info,
    /// The INIT stream as the server reports it.
    pub init: stream::Info,
    /// The CDC stream's last sequence at set-up time (0 when empty).
    pub cdc_last_sequence: u64,
    /// Names of the streams this call created.
    pub created: Vec<String>,
    /// Settings of the streams that break a guarantee; each was also logged as a warning.
    pub warnings: Vec<StreamWarning>,
    /// Durability limits that hold for the default set-up too (a single-replica CDC stream,
    /// see [`durability_warnings`]); logged as warnings, kept apart from `warnings`.
    pub durability: Vec<StreamWarning>,
}

/// A stream setting that breaks one of the bridge's guarantees. The stream is used as it is;
/// the message says what goes wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamWarning {
    /// Memory storage: the stream is lost when nats-server restarts.
    MemoryStorage {
        /// Stream name.
        stream: String,
    },
    /// Duplicate window shorter than the configured one or than a restart takes.
    DuplicateWindowTooShort {
        /// Stream name.
        stream: String,
        /// The stream's window.
        actual: Duration,
        /// The shortest safe window.
        wanted: Duration,
    },
    /// The stream's subjects do not cover every subject the bridge publishes to.
    SubjectsNotCovered {
        /// Stream name.
        stream: String,
        /// The stream's subjects.
        subjects: Vec<String>,
        /// The subject filter the bridge needs, e.g. `cdc.>`.
        wanted: String,
    },
    /// Messages expire sooner than configured.
    MaxAgeTooShort {
        /// Stream name.
        stream: String,
        /// The stream's max age.
        actual: Duration,
        /// The configured one (zero: unlimited).
        wanted: Duration,
    },
    /// A message or size limit with `discard new`: a full stream refuses new messages.
    DiscardNewWithLimits {
        /// Stream name.
        stream: String,
    },
    /// A per-subject message limit: older changes of a table vanish early.
    PerSubjectLimit {
        /// Stream name.
        stream: String,
        /// `max_msgs_per_subject`.
        limit: i64,
    },
    /// Work-queue or interest retention: messages vanish once consumed.
    NotLimitsRetention {
        /// Stream name.
        stream: String,
        /// `workqueue` or `interest`.
        retention: &'static str,
    },
    /// `no_ack`: the stream sends no PubAck, so nothing is ever confirmed to PostgreSQL.
    NoAck {
        /// Stream name.
        stream: String,
    },
    /// One replica on file storage: a PubAck does not mean the message is on disk unless the
    /// server syncs every write, which a client cannot see.
    SingleReplica {
        /// Stream name.
        stream: String,
    },
}

impl StreamWarning {
    /// The stream the warning is about.
    pub fn stream(&self) -> &str {
        match self {
            StreamWarning::MemoryStorage { stream }
            | StreamWarning::DuplicateWindowTooShort { stream, .. }
            | StreamWarning::SubjectsNotCovered { stream, .. }
            | StreamWarning::MaxAgeTooShort { stream, .. }
            | StreamWarning::DiscardNewWithLimits { stream }
            | StreamWarning::PerSubjectLimit { stream, .. }
            | StreamWarning::NotLimitsRetention { stream, .. }
            | StreamWarning::NoAck { stream }
            | StreamWarning::SingleReplica { stream } => stream,
        }
    }
}

impl fmt::Display for StreamWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamWarning::MemoryStorage { stream } => write!(
                f,
                "stream '{stream}' uses memory storage: its messages are lost when nats-server \
                 restarts; recreate it with file storage"
            ),
            StreamWarning::DuplicateWindowTooShort {
                stream,
                actual,
                wanted,
            } => write!(
                f,
                "stream '{stream}' has a duplicate window of {}, shorter than {}: changes \
                 republished after a bridge restart can be stored twice; raise it, e.g. nats \
                 stream edit {stream} --dupe-window {}",
                human(*actual),
                human(*wanted),
                human(*wanted)
            ),
            StreamWarning::SubjectsNotCovered {
                stream,
                subjects,
                wanted,
            } => write!(
                f,
                "stream '{stream}' holds subjects [{}], which do not cover {wanted}: messages \
                 outside them are refused; add {wanted} to its subjects",
                subjects.join(", ")
            ),
            StreamWarning::MaxAgeTooShort {
                stream,
                actual,
                wanted,
            } if wanted.is_zero() => write!(
                f,
                "stream '{stream}' keeps messages for {}, but unlimited retention is \
                 configured: consumers bootstrapping from a snapshot may find the changes they \
                 need gone; remove the stream's age limit",
                human(*actual)
            ),
            StreamWarning::MaxAgeTooShort {
                stream,
                actual,
                wanted,
            } => write!(
                f,
                "stream '{stream}' keeps messages for {}, less than the configured {}: \
                 consumers bootstrapping from a snapshot may find the changes they need gone; \
                 raise it, e.g. nats stream edit {stream} --max-age {}",
                human(*actual),
                human(*wanted),
                human(*wanted)
            ),
            StreamWarning::DiscardNewWithLimits { stream } => write!(
                f,
                "stream '{stream}' has a message or size limit with discard policy 'new': once \
                 full it refuses new messages and the bridge stalls; use discard 'old' (nats \
                 stream edit {stream} --discard old) or remove the limit"
            ),
            StreamWarning::PerSubjectLimit { stream, limit } => write!(
                f,
                "stream '{stream}' keeps only {limit} messages per subject: older changes of a \
                 table are removed early and mirrors miss them; remove the limit (nats stream \
                 edit {stream} --max-msgs-per-subject -1)"
            ),
            StreamWarning::NotLimitsRetention { stream, retention } => write!(
                f,
                "stream '{stream}' uses {retention} retention: messages are removed once \
                 consumed, so later consumers cannot bootstrap; recreate it with limits retention"
            ),
            StreamWarning::SingleReplica { stream } => write!(
                f,
                "stream '{stream}' has a single replica: unless nats-server syncs every write \
                 (jetstream {{ sync_interval: always }}), acknowledged changes stay in the OS \
                 cache for up to 2 minutes, and a crash of the NATS host (not just of the \
                 process) can lose changes PostgreSQL has already released; set sync_interval: \
                 always or use a 3-replica stream on a cluster (nats stream edit {stream} \
                 --replicas 3)"
            ),
            StreamWarning::NoAck { stream } => write!(
                f,
                "stream '{stream}' is configured with no_ack: JetStream confirms nothing, so the \
                 bridge never acknowledges WAL to PostgreSQL; recreate it without no_ack"
            ),
        }
    }
}

/// Compact duration for messages: `7d`, `2h`, `2m`, `10s`, `500ms`.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    for (unit, len) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs.is_multiple_of(len) {
            return format!("{}{unit}", secs / len);
        }
    }
    format!("{secs}s")
}

/// What the bridge needs of one stream.
struct Requirements {
    /// Subject filter the stream must cover, e.g. `cdc.>`.
    subject: String,
    /// Configured retention (zero: unlimited).
    max_age: Duration,
    /// Shortest acceptable duplicate window, for streams that de-duplicate.
    duplicate_window: Option<Duration>,
}

/// The CDC stream's settings (DESIGN §3): `cdc.>`, file storage, limits retention, discard
/// old, the configured max age and duplicate window.
pub fn cdc_stream_config(streams: &StreamsConfig) -> stream::Config {
    stream::Config {
        name: streams.cdc.clone(),
        description: Some(CDC_DESCRIPTION.to_owned()),
        subjects: vec![format!("{CDC_SUBJECT_PREFIX}.>")],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_age: streams.cdc_max_age(),
        duplicate_window: streams.cdc_duplicate_window(),
        num_replicas: streams.replicas,
        ..Default::default()
    }
}

/// The INIT stream's settings (DESIGN §3): `init.>`, file storage, limits retention, discard
/// old, the configured max age (7 days by default).
pub fn init_stream_config(streams: &StreamsConfig) -> stream::Config {
    stream::Config {
        name: streams.init.clone(),
        description: Some(INIT_DESCRIPTION.to_owned()),
        subjects: vec![format!("{INIT_SUBJECT_PREFIX}.>")],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_age: streams.init_max_age(),
        num_replicas: streams.replicas,
        ..Default::default()
    }
}

/// Checks that the server answers the JetStream API for this account. Gives
/// [`NatsError::JetStreamDisabled`] when it does not.
pub async fn check_jetstream(js: &jetstream::Context) -> Result<(), NatsError> {
    let response: Response<serde_json::Value> = js
        .request("INFO", &())
        .await
        .map_err(|e| api_request_failed("reading the JetStream account".to_owned(), e))?;
    match response {
        Response::Ok(_) => Ok(()),
        Response::Err { error } if is_jetstream_disabled(&error) => {
            Err(NatsError::JetStreamDisabled {
                reason: error.to_string(),
            })
        }
        Response::Err { error } => Err(request_failed("reading the JetStream account", error)),
    }
}

/// Makes sure the CDC and INIT streams exist: creates missing ones with [`cdc_stream_config`]
/// and [`init_stream_config`], leaves existing ones as they are, and warns about every setting
/// that breaks a guarantee (also returned in [`StreamsInfo::warnings`]).
pub async fn ensure_streams(
    js: &jetstream::Context,
    streams: &StreamsConfig,
) -> Result<StreamsInfo, NatsError> {
    check_jetstream(js).await?;
    let mut created = Vec::new();
    let cdc = ensure_stream(js, cdc_stream_config(streams), &mut created).await?;
    let init = ensure_stream(js, init_stream_config(streams), &mut created).await?;

    let mut warnings = check_stream(
        &cdc.config,
        &Requirements {
            subject: format!("{CDC_SUBJECT_PREFIX}.>"),
            max_age: streams.cdc_max_age(),
            duplicate_window: Some(
                streams
                    .cdc_duplicate_window()
                    .max(MIN_SAFE_DUPLICATE_WINDOW),
            ),
        },
    );
    warnings.extend(check_stream(
        &init.config,
        &Requirements {
            subject: format!("{INIT_SUBJECT_PREFIX}.>"),
            max_age: streams.init_max_age(),
            duplicate_window: None,
        },
    ));
    let durability = durability_warnings(&cdc.config);
    for w in warnings.iter().chain(&durability) {
        log::warn!("{w}");
    }
    Ok(StreamsInfo {
        cdc_last_sequence: cdc.state.last_sequence,
        cdc,
        init,
        created,
        warnings,
        durability,
    })
}

/// The format a payload is in: JSON documents start with `{`, a MessagePack map never does.
pub fn payload_format(payload: &[u8]) -> Format {
    if payload.first() == Some(&b'{') {
        Format::Json
    } else {
        Format::Msgpack
    }
}

/// The format recorded in a stream's metadata, if any.
fn metadata_format(config: &stream::Config) -> Option<Format> {
    match config.metadata.get(FORMAT_METADATA_KEY).map(String::as_str) {
        Some("json") => Some(Format::Json),
        Some("msgpack") => Some(Format::Msgpack),
        _ => None,
    }
}

/// Refuses a CDC stream whose messages are in another format than `format`, so one stream
/// never mixes MessagePack and JSON. The stream's format is its metadata entry
/// [`FORMAT_METADATA_KEY`], or for a stream without it (created by an older bridge, or by
/// hand) the first byte of its last message. An empty stream takes any format: its metadata
/// is set to `format` (the bridge creates the stream empty, so this records the format of a
/// stream it creates).
pub async fn check_stream_format(
    js: &jetstream::Context,
    cdc: &stream::Info,
    format: Format,
) -> Result<(), NatsError> {
    let name = cdc.config.name.clone();
    let recorded = metadata_format(&cdc.config);
    if cdc.state.messages == 0 {
        if recorded == Some(format) {
            return Ok(());
        }
        let mut config = cdc.config.clone();
        config
            .metadata
            .insert(FORMAT_METADATA_KEY.to_owned(), format.as_str().to_owned());
        // Not fatal: without the entry the next start reads the last message instead.
        match js.update_stream(config).await {
            Ok(_) => log::info!(
                "stream '{name}' is empty: its format is now {} (metadata {FORMAT_METADATA_KEY})",
                format.as_str()
            ),
            Err(e) => log::warn!(
                "cannot record the format in stream '{name}''s metadata ({e}); the next start reads it from the last message"
            ),
        }
        return Ok(());
    }
    let (found, source_of_format) = match recorded {
        Some(f) => (f, format!("its metadata {FORMAT_METADATA_KEY}")),
        None => {
            let what = format!("reading the last message of stream '{name}'");
            let stream = js
                .get_stream_no_info(&name)
                .await
                .map_err(|e| request_failed(what.clone(), e))?;
            match stream.get_raw_message(cdc.state.last_sequence).await {
                Ok(msg) => (
                    payload_format(&msg.payload),
                    format!("its last message, sequence {}", cdc.state.last_sequence),
                ),
                // Deleted or expired meanwhile: nothing to compare with.
                Err(e) => {
                    log::warn!("cannot read the format of stream '{name}' ({what}: {e})");
                    return Ok(());
                }
            }
        }
    };
    if found == format {
        return Ok(());
    }
    Err(NatsError::FormatMismatch {
        stream: name,
        found: found.as_str(),
        configured: format.as_str(),
        source_of_format,
    })
}

/// [`StreamWarning::SingleReplica`] for a CDC stream with one replica on file storage (memory
/// storage has its own warning). The server's `sync_interval` is not visible to a client (only
/// to its monitoring port or the system account), so the warning says "unless".
pub fn durability_warnings(cdc: &stream::Config) -> Vec<StreamWarning> {
    if cdc.storage == StorageType::File && cdc.num_replicas <= 1 {
        vec![StreamWarning::SingleReplica {
            stream: cdc.name.clone(),
        }]
    } else {
        Vec::new()
    }
}

/// The last sequence of stream `name` (0 when empty), e.g. a snapshot's `cdc_stream_seq`.
pub async fn stream_last_sequence(js: &jetstream::Context, name: &str) -> Result<u64, NatsError> {
    match stream_info(js, name).await? {
        Some(info) => Ok(info.state.last_sequence),
        None => Err(request_failed(
            format!("reading stream '{name}'"),
            std::io::Error::new(std::io::ErrorKind::NotFound, "stream not found"),
        )),
    }
}

/// Stream info, or `None` when the stream does not exist.
async fn stream_info(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Info>, NatsError> {
    let what = format!("reading stream '{name}'");
    if !valid_stream_name(name) {
        return Err(NatsError::StreamRefused {
            stream: name.to_owned(),
            subjects: String::new(),
            reason: "invalid stream name (no '.', '*', '>', '/', '\\' or white space)".to_owned(),
        });
    }
    let response: Response<stream::Info> = js
        .request(format!("STREAM.INFO.{name}"), &())
        .await
        .map_err(|e| api_request_failed(what.clone(), e))?;
    match response {
        Response::Ok(info) => Ok(Some(info)),
        Response::Err { error } if error.error_code() == ErrorCode::STREAM_NOT_FOUND => Ok(None),
        Response::Err { error } if is_jetstream_disabled(&error) => {
            Err(NatsError::JetStreamDisabled {
                reason: error.to_string(),
            })
        }
        Response::Err { error } => Err(request_failed(what, error)),
    }
}

fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace())
}

/// Returns the stream's info, creating the stream first if it does not exist.
async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
    created: &mut Vec<String>,
) -> Result<stream::Info, NatsError> {
    let name = config.name.clone();
    if let Some(info) = stream_info(js, &name).await? {
        log::info!(
            "using existing JetStream stream '{name}' ({} messages, last sequence {})",
            info.state.messages,
            info.state.last_sequence
        );
        return Ok(info);
    }
    let subjects = config.subjects.join(", ");
    let summary = format!(
        "subjects {subjects}, file storage, max age {}, duplicate window {}",
        if config.max_age.is_zero() {
            "unlimited".to_owned()
        } else {
            human(config.max_age)
        },
        if config.duplicate_window.is_zero() {
            "server default".to_owned()
        } else {
            human(config.duplicate_window)
        }
    );
    match js.create_stream(config).await {
        Ok(stream) => {
            log::info!("created JetStream stream '{name}' ({summary})");
            created.push(name);
            Ok(stream.cached_info().clone())
        }
        Err(e) => match e.kind() {
            CreateStreamErrorKind::JetStreamUnavailable => Err(NatsError::JetStreamDisabled {
                reason: NO_RESPONDERS.to_owned(),
            }),
            CreateStreamErrorKind::JetStream(error) if is_jetstream_disabled(&error) => {
                Err(NatsError::JetStreamDisabled {
                    reason: error.to_string(),
                })
            }
            // Another bridge created it between our look-up and our create: use theirs.
            CreateStreamErrorKind::JetStream(error)
                if error.error_code() == ErrorCode::STREAM_NAME_EXIST =>
            {
                stream_info(js, &name).await?.ok_or_else(|| {
                    request_failed(
                        format!("reading stream '{name}'"),
                        std::io::Error::other("stream vanished right after it was created"),
                    )
                })
            }
            CreateStreamErrorKind::JetStream(error) => Err(NatsError::StreamRefused {
                stream: name,
                subjects,
                reason: error.to_string(),
            }),
            CreateStreamErrorKind::EmptyStreamName
            | CreateStreamErrorKind::InvalidStreamName
            | CreateStreamErrorKind::DomainAndExternalSet => Err(NatsError::StreamRefused {
                stream: name,
                subjects,
                reason: e.to_string(),
            }),
            CreateStreamErrorKind::TimedOut
            | CreateStreamErrorKind::Response
            | CreateStreamErrorKind::NotFound
            | CreateStreamErrorKind::ResponseParse => {
                Err(request_failed(format!("creating stream '{name}'"), e))
            }
        },
    }
}

/// The settings of `config` that break a guarantee the bridge gives.
fn check_stream(config: &stream::Config, req: &Requirements) -> Vec<StreamWarning> {
    let stream = || config.name.clone();
    let mut out = Vec::new();
    if config.storage == StorageType::Memory {
        out.push(StreamWarning::MemoryStorage { stream: stream() });
    }
    if let Some(wanted) = req.duplicate_window {
        if config.duplicate_window < wanted {
            out.push(StreamWarning::DuplicateWindowTooShort {
                stream: stream(),
                actual: config.duplicate_window,
                wanted,
            });
        }
    }
    if !config
        .subjects
        .iter()
        .any(|s| subject_covers(s, &req.subject))
    {
        out.push(StreamWarning::SubjectsNotCovered {
            stream: stream(),
            subjects: config.subjects.clone(),
            wanted: req.subject.clone(),
        });
    }
    // Zero means unlimited on both sides.
    if !config.max_age.is_zero() && (req.max_age.is_zero() || config.max_age < req.max_age) {
        out.push(StreamWarning::MaxAgeTooShort {
            stream: stream(),
            actual: config.max_age,
            wanted: req.max_age,
        });
    }
    if config.discard == DiscardPolicy::New && (config.max_messages > 0 || config.max_bytes > 0) {
        out.push(StreamWarning::DiscardNewWithLimits { stream: stream() });
    }
    if config.max_messages_per_subject > 0 {
        out.push(StreamWarning::PerSubjectLimit {
            stream: stream(),
            limit: config.max_messages_per_subject,
        });
    }
    match config.retention {
        RetentionPolicy::Limits => {}
        RetentionPolicy::Interest => out.push(StreamWarning::NotLimitsRetention {
            stream: stream(),
            retention: "interest",
        }),
        RetentionPolicy::WorkQueue => out.push(StreamWarning::NotLimitsRetention {
            stream: stream(),
            retention: "workqueue",
        }),
    }
    if config.no_ack {
        out.push(StreamWarning::NoAck { stream: stream() });
    }
    out
}

/// True when every subject matching `wanted` also matches the filter `filter` (NATS wildcards:
/// `*` one token, `>` one or more trailing tokens).
fn subject_covers(filter: &str, wanted: &str) -> bool {
    let mut f = filter.split('.');
    let mut w = wanted.split('.');
    loop {
        match (f.next(), w.next()) {
            (Some(">"), Some(_)) => return true,
            (Some(_), Some(">")) => return false,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn cdc_requirements() -> Requirements {
        Requirements {
            subject: "cdc.>".to_owned(),
            max_age: Duration::from_secs(7 * 86_400),
            duplicate_window: Some(Duration::from_secs(120)),
        }
    }

    #[test]
    fn subject_cover_rules() {
        assert!(subject_covers("cdc.>", "cdc.>"));
        assert!(subject_covers(">", "cdc.>"));
        assert!(subject_covers("*.>", "cdc.>"));
        assert!(!subject_covers("cdc.*", "cdc.>"));
        assert!(!subject_covers("cdc.*.*", "cdc.>"));
        assert!(!subject_covers("cdc", "cdc.>"));
        assert!(!subject_covers("init.>", "cdc.>"));
        assert!(!subject_covers("cdc.users.>", "cdc.>"));
        assert!(subject_covers("cdc.*", "cdc.users"));
        assert!(subject_covers("cdc.users.insert", "cdc.users.insert"));
        assert!(!subject_covers("cdc.users.insert", "cdc.users"));
    }

    #[test]
    fn our_stream_configs_pass_our_checks() {
        let streams = StreamsConfig::default();
        let cdc = cdc_stream_config(&streams);
        assert_eq!(cdc.name, "CDC");
        assert_eq!(cdc.subjects, vec!["cdc.>".to_owned()]);
        assert_eq!(cdc.storage, StorageType::File);
        assert_eq!(cdc.discard, DiscardPolicy::Old);
        assert_eq!(cdc.retention, RetentionPolicy::Limits);
        assert_eq!(cdc.duplicate_window, Duration::from_secs(120));
        assert_eq!(cdc.num_replicas, 1);
        assert_eq!(check_stream(&cdc, &cdc_requirements()), vec![]);
        let init = init_stream_config(&streams);
        assert_eq!(init.name, "INIT");
        assert_eq!(init.subjects, vec!["init.>".to_owned()]);
        assert_eq!(init.max_age, Duration::from_secs(7 * 86_400));
        let r3 = StreamsConfig {
            replicas: 3,
            ..StreamsConfig::default()
        };
        assert_eq!(cdc_stream_config(&r3).num_replicas, 3);
        assert_eq!(init_stream_config(&r3).num_replicas, 3);
        let req = Requirements {
            subject: "init.>".to_owned(),
            max_age: Duration::from_secs(7 * 86_400),
            duplicate_window: None,
        };
        assert_eq!(check_stream(&init, &req), vec![]);
    }

    #[test]
    fn every_broken_guarantee_is_reported() {
        let config = stream::Config {
            name: "CDC".to_owned(),
            subjects: vec!["cdc.users.*".to_owned()],
            storage: StorageType::Memory,
            duplicate_window: Duration::from_secs(10),
            max_age: Duration::from_secs(3600),
            discard: DiscardPolicy::New,
            max_bytes: 1 << 20,
            max_messages_per_subject: 5,
            retention: RetentionPolicy::WorkQueue,
            no_ack: true,
            ..Default::default()
        };
        let w = check_stream(&config, &cdc_requirements());
        assert_eq!(
            w,
            vec![
                StreamWarning::MemoryStorage {
                    stream: "CDC".into()
                },
                StreamWarning::DuplicateWindowTooShort {
                    stream: "CDC".into(),
                    actual: Duration::from_secs(10),
                    wanted: Duration::from_secs(120),
                },
                StreamWarning::SubjectsNotCovered {
                    stream: "CDC".into(),
                    subjects: vec!["cdc.users.*".into()],
                    wanted: "cdc.>".into(),
                },
                StreamWarning::MaxAgeTooShort {
                    stream: "CDC".into(),
                    actual: Duration::from_secs(3600),
                    wanted: Duration::from_secs(7 * 86_400),
                },
                StreamWarning::DiscardNewWithLimits {
                    stream: "CDC".into()
                },
                StreamWarning::PerSubjectLimit {
                    stream: "CDC".into(),
                    limit: 5
                },
                StreamWarning::NotLimitsRetention {
                    stream: "CDC".into(),
                    retention: "workqueue"
                },
                StreamWarning::NoAck {
                    stream: "CDC".into()
                },
            ]
        );
        assert!(w.iter().all(|w| w.stream() == "CDC"));
        let text = w[1].to_string();
        assert!(text.contains("10s") && text.contains("2m"), "{text}");
        assert!(text.contains("--dupe-window 2m"), "{text}");
    }

    #[test]
    fn max_age_zero_means_unlimited() {
        let mut req = cdc_requirements();
        let mut config = cdc_stream_config(&StreamsConfig::default());
        config.max_age = Duration::ZERO;
        assert_eq!(check_stream(&config, &req), vec![]);
        // A limited stream where unlimited retention is configured is too short.
        req.max_age = Duration::ZERO;
        config.max_age = Duration::from_secs(86_400);
        let w = check_stream(&config, &req);
        assert!(
            matches!(&w[..], [StreamWarning::MaxAgeTooShort { .. }]),
            "{w:?}"
        );
        assert!(w[0].to_string().contains("unlimited"));
        // A longer retention than configured is fine.
        req.max_age = Duration::from_secs(3600);
        assert_eq!(check_stream(&config, &req), vec![]);
    }

    #[test]
    fn discard_new_without_limits_is_fine() {
        let mut config = cdc_stream_config(&StreamsConfig::default());
        config.discard = DiscardPolicy::New;
        assert_eq!(check_stream(&config, &cdc_requirements()), vec![]);
        config.max_messages = 1000;
        assert_eq!(
            check_stream(&config, &cdc_requirements()),
            vec![StreamWarning::DiscardNewWithLimits {
                stream: "CDC".into()
            }]
        );
    }

    #[test]
    fn single_replica_file_stream_gets_the_durability_warning() {
        let mut config = cdc_stream_config(&StreamsConfig::default());
        // The server's default for a stream created without a replica count is 1.
        assert!(config.num_replicas <= 1);
        let w = durability_warnings(&config);
        assert_eq!(
            w,
            vec![StreamWarning::SingleReplica {
                stream: "CDC".into()
            }]
        );
        let text = w[0].to_string();
        assert!(
            text.contains("unless nats-server syncs every write")
                && text.contains("sync_interval: always")
                && text.contains("--replicas 3"),
            "{text}"
        );
        config.num_replicas = 3;
        assert_eq!(durability_warnings(&config), vec![]);
        config.num_replicas = 1;
        config.storage = StorageType::Memory;
        assert_eq!(durability_warnings(&config), vec![]);
    }

    #[test]
    fn payload_formats_are_told_by_the_first_byte() {
        use crate::config::Format;
        assert_eq!(payload_format(br#"{"table":"users"}"#), Format::Json);
        // A MessagePack map: fixmap, map16 or map32.
        assert_eq!(payload_format(&[0x8b, 0xa5]), Format::Msgpack);
        assert_eq!(payload_format(&[0xde, 0, 16]), Format::Msgpack);
        let mut config = stream::Config::default();
        assert_eq!(metadata_format(&config), None);
        config
            .metadata
            .insert(FORMAT_METADATA_KEY.into(), "json".into());
        assert_eq!(metadata_format(&config), Some(Format::Json));
        let e = NatsError::FormatMismatch {
            stream: "CDC".into(),
            found: "json",
            configured: "msgpack",
            source_of_format: "its metadata pgbridge.format".into(),
        };
        assert!(e.is_configuration());
        assert!(e.to_string().contains("start with --format json"));
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(human(Duration::from_secs(120)), "2m");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_millis(1500)), "1500ms");
        assert_eq!(human(Duration::ZERO), "0ms");
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
        stats.on_event(&Event::Connected, &seen);
        assert!(stats.is_connected());
        assert_eq!(stats.reconnects(), 0);
        stats.on_event(&Event::Disconnected, &seen);
        assert!(!stats.is_connected());
        assert_eq!(stats.disconnects(), 1);
        stats.on_event(&Event::Connected, &seen);
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

    #[test]
    fn stream_names() {
        assert!(valid_stream_name("CDC"));
        assert!(valid_stream_name("my-cdc_2"));
        assert!(!valid_stream_name(""));
        assert!(!valid_stream_name("a.b"));
        assert!(!valid_stream_name("a b"));
        assert!(!valid_stream_name("a>"));
    }
}
