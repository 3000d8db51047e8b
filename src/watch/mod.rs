//! Commands that show what the bridge publishes, for people and scripts: `bridge tail` prints
//! the CDC stream's changes as JSON lines, `bridge snapshot` requests a table snapshot and
//! follows its progress. Both only read (ordered consumers and core NATS requests), so they
//! leave nothing behind on the server. `bridge dlq` lists the dead letters and replays them.

pub mod dlq;
mod render;
pub mod snapshot;
pub mod tail;

// Connecting and its errors are the sink's (one place for TLS, credentials and reconnects).
use crate::config::Config;
use crate::sink::nats::{connect, unless_refused, NatsError};

/// Why a watch command stopped.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// NATS unreachable, credentials refused, JetStream disabled.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// A command-line value that cannot work (bad filter, unknown stream).
    #[error("{0}")]
    Usage(String),
    /// The bridge refused the snapshot request.
    #[error("snapshot of {table} refused: {reason}")]
    Refused {
        /// The table token.
        table: String,
        /// The bridge's reason.
        reason: String,
    },
    /// The bridge reported the snapshot failed.
    #[error("snapshot {snapshot_id} of {table} failed: {reason}")]
    Failed {
        /// The table token.
        table: String,
        /// The snapshot.
        snapshot_id: String,
        /// The bridge's error.
        reason: String,
    },
    /// A JetStream or NATS request failed, or a message is not what the bridge publishes.
    #[error("{0}")]
    Runtime(String),
    /// Writing the output failed (other than a closed pipe).
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl WatchError {
    /// 2 for what the user must fix on the command line or in the configuration, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            WatchError::Nats(e) if e.is_configuration() => 2,
            WatchError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Runs a command's `work` on a runtime of its own with a NATS connection named `name`. A
/// permission the server refuses the connection ends it, as it ends the bridge's start: a
/// command gets no further without it.
fn on_nats<T, F, Fut>(config: &Config, name: &str, work: F) -> Result<T, WatchError>
where
    F: FnOnce(async_nats::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, WatchError>>,
{
    let rt = crate::runtime::current_thread()
        .map_err(|e| WatchError::Runtime(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async {
        let (client, stats) = connect(&config.nats, name).await?;
        unless_refused(&stats, work(client)).await
    })
}

/// Opens a stream; a missing one is a usage error (wrong `--stream`, or no bridge ran yet).
async fn open_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Result<async_nats::jetstream::stream::Stream, WatchError> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    js.get_stream(name).await.map_err(|e| match e.kind() {
        GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            WatchError::Usage(format!(
                "JetStream stream '{name}' does not exist: start the bridge first (it creates \
                 its streams), or fix --stream"
            ))
        }
        _ => WatchError::Runtime(format!("JetStream: reading stream '{name}': {e}")),
    })
}
