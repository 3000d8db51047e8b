//! Operations: what a running bridge tells about itself, and how it is controlled.
//!
//! - [`counters`]: the durable position and the publisher's and NATS connection's counters,
//!   written by the pipeline and the sink;
//! - [`state`]: live counters and flags, written by the pipeline threads and the monitor;
//! - [`metrics`]: the Prometheus registry (`GET /metrics`);
//! - [`status`]: the `/status` and `/health` documents;
//! - [`monitor`]: the slot-lag monitor thread;
//! - [`logs`]: the periodic `METRICS` log line.
//!
//! [`start`] starts the monitor and metrics-log threads of one run. The HTTP server that
//! serves these documents is in [`crate::control`]; it reads from here, never the reverse.

pub mod counters;
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
    /// The metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// A thread could not be started.
    #[error("cannot start a telemetry thread: {0}")]
    Thread(std::io::Error),
}

/// The telemetry threads of one run; [`TelemetryThreads::stop`] ends them.
#[derive(Debug)]
pub struct TelemetryThreads {
    metrics: Arc<metrics::Metrics>,
    monitor: JoinHandle<()>,
    metrics_log: Option<JoinHandle<()>>,
    stop: Shutdown,
    /// What the monitor waits for before its first read; triggered at stop too.
    setup_attempted: Shutdown,
}

/// Registers the metrics and starts the slot monitor and the `METRICS` log line. `latency` is
/// the histogram the publisher observes.
pub fn start(
    config: &Config,
    telemetry: Arc<Telemetry>,
    latency: Histogram,
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
    let stop = Shutdown::new();
    let setup_attempted = telemetry.setup_attempted();
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
        metrics: Arc::new(metrics),
        monitor,
        metrics_log,
        stop,
        setup_attempted,
    })
}

impl TelemetryThreads {
    /// The metrics registry, which `GET /metrics` renders.
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Stops the threads.
    pub fn stop(self) {
        self.stop.trigger();
        self.setup_attempted.trigger();
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
