//! The JetStream streams the bridge writes to: [`ensure_streams`] makes sure the CDC and INIT
//! streams exist, creating the missing ones with the bridge's settings and leaving existing ones
//! alone, warning (and reporting in [`StreamsInfo::warnings`]) where their settings break a
//! guarantee; the format check and the durability warnings; stream info requests.

use std::fmt;
use std::time::Duration;

use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};

use crate::config::{Format, StreamsConfig};

use super::connect::{
    api_request_failed, is_jetstream_disabled, request_failed, NatsError, NO_RESPONDERS,
};
use crate::wire::names::{
    CDC_SUBJECT_PREFIX, DLQ_STREAM, DLQ_SUBJECT_PREFIX, FORMAT_METADATA_KEY, INIT_SUBJECT_PREFIX,
    OUTBOX_STREAM, OUTBOX_SUBJECT_PREFIX,
};

/// Shortest CDC duplicate window that still covers a bridge restart: changes republished after
/// a crash arrive about this long after the first copy at most.
pub const MIN_SAFE_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Descriptions set on the streams the bridge creates, shown by `nats stream info`.
const INIT_DESCRIPTION: &str = "pgbridge snapshots (init.snap.*, init.meta.*)";
const CDC_DESCRIPTION: &str = "pgbridge change events (cdc.{table}.{op})";
const OUTBOX_DESCRIPTION: &str = "pgbridge outbox events (outbox.{aggregate_type}.{event_type})";
const DLQ_DESCRIPTION: &str =
    "pgbridge dead letters (dlq.outbox.{table}, dlq.outbox.=messages, dlq.cdc.{table})";
/// Retention of the dead letters: long, so that someone finds them and replays them.
const DLQ_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

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
    /// see `durability_warnings`); logged as warnings, kept apart from `warnings`.
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

/// The CDC stream's settings: `cdc.>`, file storage, limits retention, discard
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

/// The INIT stream's settings: `init.>`, file storage, limits retention, discard
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

/// The OUTBOX stream (`outbox.>`): retention and duplicate window as the CDC stream's, since
/// its events are replayed after a crash like changes.
pub fn outbox_stream_config(streams: &StreamsConfig) -> stream::Config {
    stream::Config {
        name: OUTBOX_STREAM.to_owned(),
        description: Some(OUTBOX_DESCRIPTION.to_owned()),
        subjects: vec![format!("{OUTBOX_SUBJECT_PREFIX}.>")],
        ..cdc_stream_config(streams)
    }
}

/// The DLQ stream (`dlq.>`), kept for `DLQ_MAX_AGE`.
pub fn dlq_stream_config(streams: &StreamsConfig) -> stream::Config {
    stream::Config {
        name: DLQ_STREAM.to_owned(),
        description: Some(DLQ_DESCRIPTION.to_owned()),
        subjects: vec![format!("{DLQ_SUBJECT_PREFIX}.>")],
        max_age: DLQ_MAX_AGE,
        ..cdc_stream_config(streams)
    }
}

/// Makes sure the OUTBOX and DLQ streams exist, as [`ensure_streams`] does for the CDC and
/// INIT streams, and returns the names of the ones it created. Warnings are logged.
pub async fn ensure_outbox_streams(
    js: &jetstream::Context,
    streams: &StreamsConfig,
) -> Result<Vec<String>, NatsError> {
    let mut created = Vec::new();
    for (config, max_age) in [
        (outbox_stream_config(streams), streams.cdc_max_age()),
        (dlq_stream_config(streams), DLQ_MAX_AGE),
    ] {
        let subject = config.subjects[0].clone();
        let info = ensure_stream(js, config, &mut created).await?;
        let warnings = check_stream(
            &info.config,
            &Requirements {
                subject,
                max_age,
                duplicate_window: Some(
                    streams
                        .cdc_duplicate_window()
                        .max(MIN_SAFE_DUPLICATE_WINDOW),
                ),
            },
        );
        for w in warnings {
            log::warn!("{w}");
        }
    }
    Ok(created)
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
    let mut cdc_config = cdc_stream_config(streams);
    // Only servers that know the setting are told it; older ones would refuse the stream.
    cdc_config.allow_batch_publish =
        super::publisher::server_has_fast_batches(&js.client().server_info().version);
    let cdc = ensure_stream(js, cdc_config, &mut created).await?;
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
    let replicas = config.num_replicas;
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
            // Too few servers for the replicas right now (a cluster starting, or nodes down):
            // retried, as the servers may come back.
            CreateStreamErrorKind::JetStream(error)
                if error.error_code() == ErrorCode::CLUSTER_NO_PEERS =>
            {
                Err(request_failed(
                    format!(
                        "creating stream '{name}' with {} replicas (fewer servers of the cluster are available)",
                        replicas
                    ),
                    error,
                ))
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

#[cfg(test)]
mod tests;
