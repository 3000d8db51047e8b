//! Control of a running bridge over HTTP: the server, the admin token, request parsing, the
//! router and the endpoints that change state (`POST /shutdown`, `POST /snapshots/{table}`,
//! `/streams/*`). The read-only documents (`/metrics`, `/status`, `/health`) are rendered by
//! [`crate::telemetry`]; control reads the counters there and never the other way round.
//!
//! A small HTTP/1.1 server on the standard library, bounded in every dimension so that no
//! request can hurt the bridge: one acceptor thread that holds up to [`server::MAX_PENDING`]
//! connections until they send something (408 after two silent seconds), [`server::WORKERS`] worker
//! threads fed through a queue of [`server::QUEUE`] connections (when it is full, new connections get a
//! 503 at once), one request per connection, limits on head and body size (see [`request`]),
//! a deadline for reading the request and a timeout for writing the answer. Nothing here
//! panics on input; a bad request gets a 4xx answer and the pipeline threads never notice.
//!
//! A general-purpose HTTP crate was not used because the bridge needs these guarantees more
//! than features: tiny_http 0.12, for one, allocates a request's whole announced
//! `Content-Length` in one piece when an unread body is dropped, so a single request with a
//! huge `Content-Length` aborts the process; it also reads header lines without a limit and
//! starts a thread per connection.

pub mod auth;
pub mod probe;
pub mod request;
pub mod response;
pub mod router;
pub mod server;
pub mod streams;

pub use router::HttpContext;
pub use server::{HttpError, HttpServer};

use std::sync::Arc;

use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::Telemetry;

/// Starts the HTTP server on `config.http` for one run. `shutdown` is what `POST /shutdown`
/// triggers; `metrics` is the registry `GET /metrics` renders.
pub fn serve(
    config: &Config,
    telemetry: &Arc<Telemetry>,
    metrics: Arc<Metrics>,
    snapshots: crate::snapshot::ServiceSlot,
    shutdown: &Shutdown,
) -> Result<HttpServer, HttpError> {
    HttpServer::start(
        config.http.socket_addr(),
        HttpContext {
            telemetry: Arc::clone(telemetry),
            metrics,
            snapshots,
            shutdown: shutdown.clone(),
            admin_token: config.http.admin_token.clone(),
            nats: config.nats.clone(),
            streams: config.streams.clone(),
        },
    )
}
