//! Operations: what a running bridge tells about itself, and how it is controlled.
//!
//! - [`counters`]: the durable position and the publisher's and NATS connection's counters,
//!   written by the pipeline and the sink;
//! - [`state`]: live counters and flags, written by the pipeline threads and the monitor;
//! - [`metrics`]: the Prometheus registry (`GET /metrics`);
//! - [`status`]: the `/status` and `/health` documents;
//! - [`http`]: the HTTP server, its endpoints and the admin token;
//! - [`monitor`]: the slot-lag monitor thread;
//! - [`logs`]: the periodic `METRICS` log line.
//!
//! [`start`] starts the HTTP, monitor and metrics-log threads of one run.

pub mod counters;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod monitor;
pub mod state;
pub mod status;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::Histogram;

use crate::config::Config;
use crate::shutdown::Shutdown;

pub use state::{Phase, Snapshot, Telemetry};

/// How long [`TelemetryThreads::stop`] waits for the monitor, which may be inside a
/// PostgreSQL connection attempt; after that it is left to end by itself.
const MONITOR_STOP_WAIT: Duration = Duration::from_secs(2);

/// Why the telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The HTTP server could not start.
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// The metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// A thread could not be started.
    #[error("cannot start a telemetry thread: {0}")]
    Thread(std::io::Error),
}

impl TelemetryError {
    /// True when the operator must change the configuration (e.g. the port is taken).
    pub fn is_configuration(&self) -> bool {
        matches!(self, TelemetryError::Http(e) if e.is_configuration())
    }
}

/// The telemetry threads of one run; [`TelemetryThreads::stop`] ends them.
#[derive(Debug)]
pub struct TelemetryThreads {
    http: http::HttpServer,
    monitor: JoinHandle<()>,
    metrics_log: Option<JoinHandle<()>>,
    stop: Shutdown,
}

/// Starts the HTTP server (on `config.http`), the slot monitor and the `METRICS` log line.
/// `shutdown` is what `POST /shutdown` triggers; `latency` is the histogram the publisher
/// observes.
pub fn start(
    config: &Config,
    telemetry: Arc<Telemetry>,
    latency: Histogram,
    shutdown: &Shutdown,
) -> Result<TelemetryThreads, TelemetryError> {
    let metrics = metrics::Metrics::new(
        Arc::clone(&telemetry),
        latency,
        &metrics::BridgeInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            slot: config.replication.slot.clone(),
            publication: config.replication.publication.clone(),
        },
    )?;
    let http = http::HttpServer::start(
        config.http.socket_addr(),
        http::HttpContext {
            telemetry: Arc::clone(&telemetry),
            metrics: Arc::new(metrics),
            shutdown: shutdown.clone(),
            admin_token: config.http.admin_token.clone(),
            nats: config.nats.clone(),
            streams: config.streams.clone(),
        },
    )?;
    let stop = Shutdown::new();
    let monitor = monitor::spawn_monitor(config, Arc::clone(&telemetry), stop.clone())
        .map_err(TelemetryError::Thread)?;
    let metrics_log = match config.monitor.metrics_log_interval() {
        Some(every) => Some(
            logs::spawn_metrics_log(telemetry, every, stop.clone())
                .map_err(TelemetryError::Thread)?,
        ),
        None => None,
    };
    Ok(TelemetryThreads {
        http,
        monitor,
        metrics_log,
        stop,
    })
}

impl TelemetryThreads {
    /// The HTTP server's address (useful with port 0).
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.http.local_addr()
    }

    /// Stops the threads and frees the HTTP port.
    pub fn stop(self) {
        self.stop.trigger();
        self.http.stop();
        if let Some(h) = self.metrics_log {
            let _ = h.join();
        }
        let deadline = Instant::now() + MONITOR_STOP_WAIT;
        while !self.monitor.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.monitor.is_finished() {
            let _ = self.monitor.join();
        }
    }
}
