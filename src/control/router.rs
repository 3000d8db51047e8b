//! Which endpoint a request is for, and the handlers.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::wire::fields;
use serde_json::json;

use crate::config::{NatsConfig, Secret, StreamsConfig};
use crate::shutdown::Shutdown;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::state::Telemetry;
use crate::telemetry::status;

use super::auth;
use super::request::Request;
use super::response::Response;
use super::streams::{self, StreamOp};

/// The endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`.
    Metrics,
    /// `GET /status`.
    Status,
    /// `GET /health`.
    Health,
    /// `POST /shutdown` (admin).
    Shutdown,
    /// `/streams/*` (admin).
    Streams(StreamOp),
    /// `POST /snapshots/{table}` (admin).
    Snapshot,
}

impl Route {
    /// True for the endpoints that need the admin token.
    pub fn is_admin(self) -> bool {
        matches!(self, Route::Shutdown | Route::Streams(_) | Route::Snapshot)
    }
}

/// Path, method, endpoint.
const ROUTES: &[(&str, &str, Route)] = &[
    ("/metrics", "GET", Route::Metrics),
    ("/status", "GET", Route::Status),
    ("/health", "GET", Route::Health),
    ("/shutdown", "POST", Route::Shutdown),
    ("/streams/info", "GET", Route::Streams(StreamOp::Info)),
    ("/streams/purge", "POST", Route::Streams(StreamOp::Purge)),
    ("/streams/create", "POST", Route::Streams(StreamOp::Create)),
    ("/streams/delete", "POST", Route::Streams(StreamOp::Delete)),
];

/// Path prefix of `POST /snapshots/{table}`.
const SNAPSHOTS_PREFIX: &str = "/snapshots/";

/// The endpoint for `method` and `path`, or the 404 / 405 answer.
pub fn route(method: &str, path: &str) -> Result<Route, Response> {
    if let Some(token) = path.strip_prefix(SNAPSHOTS_PREFIX) {
        if token.is_empty() || token.contains('/') {
            return Err(Response::error(
                404,
                "no such endpoint: use /snapshots/{table}",
            ));
        }
        if method != "POST" {
            return Err(Response::error(405, "use POST").with_header("Allow", "POST"));
        }
        return Ok(Route::Snapshot);
    }
    let Some((_, allowed, route)) = ROUTES.iter().find(|(p, _, _)| *p == path) else {
        return Err(Response::error(404, "no such endpoint"));
    };
    if method != *allowed {
        return Err(Response::error(405, format!("use {allowed}")).with_header("Allow", *allowed));
    }
    Ok(*route)
}

/// What the handlers need.
#[derive(Debug)]
pub struct HttpContext {
    /// Live state.
    pub telemetry: Arc<Telemetry>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The snapshot service, once it is connected to NATS.
    pub snapshots: crate::snapshot::ServiceSlot,
    /// Triggered by `POST /shutdown`.
    pub shutdown: Shutdown,
    /// The admin token; `None` refuses every admin request.
    pub admin_token: Option<Secret>,
    /// For the stream endpoints.
    pub nats: NatsConfig,
    /// The bridge's stream names and settings.
    pub streams: StreamsConfig,
}

/// Answers a request.
pub fn handle(req: &Request, ctx: &HttpContext, peer: Option<SocketAddr>) -> Response {
    let route = match route(&req.method, &req.path) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if route.is_admin() {
        if let Err(e) = auth::check(ctx.admin_token.as_ref(), req.header("authorization")) {
            log::warn!(
                "refused admin request {} {} from {}: {e}",
                req.method,
                req.path,
                peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
            );
            return e.response();
        }
    }
    match route {
        Route::Metrics => Response::text(200, ctx.metrics.content_type(), ctx.metrics.render()),
        Route::Status => Response::json(200, &status::status_json(&ctx.telemetry.snapshot())),
        Route::Health => {
            let h = status::health(&ctx.telemetry.snapshot());
            Response::json(h.http_status(), &h.to_json())
        }
        Route::Shutdown => {
            log::info!(
                "shutdown requested over HTTP by {}",
                peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
            );
            ctx.shutdown.trigger();
            Response::json(200, &json!({ "status": "shutting down" }))
        }
        Route::Streams(op) => {
            let name = req.query_param("stream");
            if let Err(resp) = streams::check_target(op, name.as_deref(), &ctx.streams) {
                return resp;
            }
            let name = name.unwrap_or_default();
            if op != StreamOp::Info {
                log::info!(
                    "admin: {} stream '{name}' requested over HTTP by {}",
                    op.as_str(),
                    peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                );
            }
            streams::run(op, &name, &ctx.nats, &ctx.streams)
        }
        Route::Snapshot => {
            let token = req.path.strip_prefix(SNAPSHOTS_PREFIX).unwrap_or_default();
            request_snapshot(ctx, token, peer)
        }
    }
}

/// `POST /snapshots/{table}`: the same rules and answer document as a NATS request; 202 when
/// accepted, 4xx/5xx with the reason otherwise.
fn request_snapshot(ctx: &HttpContext, token: &str, peer: Option<SocketAddr>) -> Response {
    let Some(service) = ctx.snapshots.get() else {
        return Response::json(
            503,
            &json!({fields::STATUS: fields::STATUS_ERROR, fields::REASON: "unavailable",
                fields::ERROR: "snapshots are not available yet: the bridge is not connected to its broker; try again later"}),
        )
        .with_header("Retry-After", "5");
    };
    match service.request(token) {
        Ok(a) => {
            log::info!(
                "snapshot {} of {}.{} requested over HTTP by {}",
                a.snapshot_id,
                a.schema,
                a.table,
                peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
            );
            Response::json(202, &a.to_json())
        }
        Err(r) => {
            let resp = Response::json(r.http_status(), &r.to_json());
            match r.retry_after_secs() {
                Some(s) => resp.with_header("Retry-After", s.to_string()),
                None => resp,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::counters::{NatsStats, PublisherStats};
    use crate::telemetry::metrics::{commit_to_puback_histogram, BridgeInfo};

    fn ctx(token: Option<&str>) -> HttpContext {
        let shutdown = Shutdown::new();
        let telemetry = Arc::new(Telemetry::new(
            shutdown.clone(),
            Arc::new(PublisherStats::default()),
            Arc::new(NatsStats::default()),
            4,
        ));
        let metrics = Metrics::new(
            Arc::clone(&telemetry),
            commit_to_puback_histogram().unwrap(),
            &BridgeInfo {
                version: "v".into(),
                slot: "s".into(),
                publication: "p".into(),
            },
        )
        .unwrap();
        HttpContext {
            telemetry,
            metrics: Arc::new(metrics),
            snapshots: Default::default(),
            shutdown,
            admin_token: token.map(Secret::new),
            nats: NatsConfig::default(),
            streams: StreamsConfig::default(),
        }
    }

    fn req(method: &str, path: &str, auth: Option<&str>) -> Request {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (path.to_owned(), None),
        };
        Request {
            method: method.into(),
            path,
            query,
            headers: auth
                .map(|a| vec![("authorization".to_owned(), a.to_owned())])
                .unwrap_or_default(),
            body: Vec::new(),
        }
    }

    #[test]
    fn routing() {
        assert_eq!(route("GET", "/metrics"), Ok(Route::Metrics));
        assert_eq!(route("POST", "/shutdown"), Ok(Route::Shutdown));
        assert_eq!(
            route("GET", "/streams/info"),
            Ok(Route::Streams(StreamOp::Info))
        );
        assert_eq!(route("GET", "/nope").unwrap_err().status, 404);
        assert_eq!(route("GET", "/metrics/").unwrap_err().status, 404);
        let r = route("DELETE", "/health").unwrap_err();
        assert_eq!(r.status, 405);
        assert_eq!(r.headers, vec![("Allow", "GET".to_owned())]);
        assert_eq!(route("GET", "/shutdown").unwrap_err().status, 405);
        assert_eq!(route("get", "/status").unwrap_err().status, 405);
        assert_eq!(route("POST", "/snapshots/users"), Ok(Route::Snapshot));
        assert_eq!(
            route("POST", "/snapshots/sales.orders"),
            Ok(Route::Snapshot)
        );
        assert_eq!(route("GET", "/snapshots/users").unwrap_err().status, 405);
        assert_eq!(route("POST", "/snapshots/").unwrap_err().status, 404);
        assert_eq!(route("POST", "/snapshots/a/b").unwrap_err().status, 404);
    }

    #[test]
    fn read_only_endpoints_answer_without_a_token() {
        let c = ctx(None);
        let m = handle(&req("GET", "/metrics", None), &c, None);
        assert_eq!(m.status, 200);
        assert!(String::from_utf8_lossy(&m.body).contains("bridge_uptime_seconds"));
        assert_eq!(handle(&req("GET", "/status", None), &c, None).status, 200);
        // Not streaming yet.
        assert_eq!(handle(&req("GET", "/health", None), &c, None).status, 503);
    }

    #[test]
    fn admin_endpoints_need_the_token() {
        let c = ctx(None);
        assert_eq!(
            handle(&req("POST", "/shutdown", None), &c, None).status,
            403
        );
        assert_eq!(
            handle(&req("POST", "/shutdown", Some("Bearer x")), &c, None).status,
            403
        );
        assert_eq!(
            handle(&req("GET", "/streams/info?stream=CDC", None), &c, None).status,
            403
        );
        assert_eq!(
            handle(&req("POST", "/snapshots/users", None), &c, None).status,
            403
        );
        assert!(!c.shutdown.is_triggered());

        let c = ctx(Some("tok"));
        assert_eq!(
            handle(&req("POST", "/shutdown", None), &c, None).status,
            401
        );
        assert_eq!(
            handle(&req("POST", "/shutdown", Some("Bearer nope")), &c, None).status,
            401
        );
        assert_eq!(
            handle(
                &req("POST", "/streams/purge?stream=CDC", Some("Bearer nope")),
                &c,
                None
            )
            .status,
            401
        );
        assert_eq!(
            handle(
                &req("POST", "/snapshots/users", Some("Bearer nope")),
                &c,
                None
            )
            .status,
            401
        );
        // With the token but before the snapshot service exists: 503, try again.
        assert_eq!(
            handle(
                &req("POST", "/snapshots/users", Some("Bearer tok")),
                &c,
                None
            )
            .status,
            503
        );
        // Checked before the stream name: no information without the token.
        assert_eq!(
            handle(&req("POST", "/streams/purge?stream=OTHER", None), &c, None).status,
            401
        );
        assert_eq!(
            handle(
                &req("POST", "/streams/purge?stream=OTHER", Some("Bearer tok")),
                &c,
                None
            )
            .status,
            400
        );
        assert!(!c.shutdown.is_triggered());
        assert_eq!(
            handle(&req("POST", "/shutdown", Some("Bearer tok")), &c, None).status,
            200
        );
        assert!(c.shutdown.is_triggered());
    }
}
