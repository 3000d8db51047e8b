//! The `/streams/*` admin endpoints: info on any stream; purge, delete and create on the
//! bridge's own streams (the configured CDC and INIT names; create uses the bridge's settings).
//!
//! Each request opens its own NATS connection on a small current-thread runtime and closes it
//! afterwards: admin requests are rare, and nothing stays running between them. The whole
//! operation, connection included, is bounded by [`ADMIN_TIMEOUT`].

use std::time::Duration;

use async_nats::jetstream::context::{ContextBuilder, RequestErrorKind};
use async_nats::jetstream::response::Response as JsResponse;
use serde_json::{json, Value};

use crate::config::{NatsConfig, StreamsConfig};
use crate::sink::nats;

use super::response::Response;

/// Longest time one admin operation may take, NATS connection included.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Timeout of one JetStream API request.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection name of admin requests, as the server's monitoring shows it.
pub const ADMIN_CONNECTION_NAME: &str = "pgbridge-admin";

/// What to do with a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamOp {
    /// `GET /streams/info`: the server's stream info (configuration and state).
    Info,
    /// `POST /streams/purge`: remove every message.
    Purge,
    /// `POST /streams/create`: create with the bridge's settings.
    Create,
    /// `POST /streams/delete`: delete the stream and its messages.
    Delete,
}

impl StreamOp {
    /// Lower-case name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamOp::Info => "info",
            StreamOp::Purge => "purge",
            StreamOp::Create => "create",
            StreamOp::Delete => "delete",
        }
    }
}

/// A stream name JetStream accepts and that is safe inside an API subject.
pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.chars().any(|c| {
            matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control()
        })
}

/// Checks the name and that the bridge may change that stream; the answer when not.
pub fn check_target(
    op: StreamOp,
    name: Option<&str>,
    streams: &StreamsConfig,
) -> Result<(), Response> {
    let Some(name) = name else {
        return Err(Response::error(400, "missing query parameter: stream=NAME"));
    };
    if !valid_stream_name(name) {
        return Err(Response::error(400, "invalid stream name"));
    }
    if op != StreamOp::Info && name != streams.cdc && name != streams.init {
        return Err(Response::error(
            400,
            format!(
                "the bridge {}s only its own streams ({} and {})",
                op.as_str(),
                streams.cdc,
                streams.init
            ),
        ));
    }
    Ok(())
}

/// The answer to a JetStream API reply: its body on success, the server's error otherwise.
fn from_api(reply: JsResponse<Value>, ok_status: u16) -> Response {
    match reply {
        JsResponse::Ok(v) => Response::json(ok_status, &v),
        JsResponse::Err { error } => {
            let status = u16::try_from(error.code())
                .ok()
                .filter(|c| (400..=599).contains(c))
                .unwrap_or(502);
            Response::error(status, error.to_string())
        }
    }
}

fn request_failed(e: async_nats::jetstream::context::RequestError) -> Response {
    match e.kind() {
        RequestErrorKind::NoResponders => {
            Response::error(503, "JetStream is not enabled on the NATS server")
        }
        RequestErrorKind::TimedOut => Response::error(504, "JetStream did not answer in time"),
        _ => Response::error(502, format!("JetStream request failed: {e}")),
    }
}

/// Runs `op` on stream `name` (already checked with [`check_target`]).
pub fn run(
    op: StreamOp,
    name: &str,
    nats_config: &NatsConfig,
    streams: &StreamsConfig,
) -> Response {
    let rt = match crate::runtime::current_thread() {
        Ok(rt) => rt,
        Err(e) => return Response::error(500, format!("cannot start a runtime: {e}")),
    };
    rt.block_on(async {
        let work = async {
            let client = match nats::connect(nats_config, ADMIN_CONNECTION_NAME).await {
                Ok((client, _)) => client,
                Err(e) => return Response::error(503, e.to_string()),
            };
            let js = ContextBuilder::new().timeout(API_TIMEOUT).build(client);
            let api = |verb: &str| format!("STREAM.{verb}.{name}");
            // The server reads `{}` as "no parameters"; some verbs refuse `null`.
            match op {
                StreamOp::Info => match js.request(api("INFO"), &json!({})).await {
                    Ok(reply) => from_api(reply, 200),
                    Err(e) => request_failed(e),
                },
                StreamOp::Purge => match js.request(api("PURGE"), &json!({})).await {
                    Ok(reply) => from_api(reply, 200),
                    Err(e) => request_failed(e),
                },
                StreamOp::Delete => match js.request(api("DELETE"), &json!({})).await {
                    Ok(reply) => from_api(reply, 200),
                    Err(e) => request_failed(e),
                },
                StreamOp::Create => {
                    match js
                        .request::<_, _, JsResponse<Value>>(api("INFO"), &json!({}))
                        .await
                    {
                        Ok(JsResponse::Ok(info)) => {
                            return Response::json(
                                409,
                                &json!({ "error": "stream exists", "stream": info }),
                            )
                        }
                        Ok(JsResponse::Err { error })
                            if error.error_code()
                                == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND => {}
                        Ok(other) => return from_api(other, 200),
                        Err(e) => return request_failed(e),
                    }
                    let config = if name == streams.cdc {
                        nats::cdc_stream_config(streams)
                    } else {
                        nats::init_stream_config(streams)
                    };
                    match js.request(api("CREATE"), &config).await {
                        Ok(reply) => from_api(reply, 201),
                        Err(e) => request_failed(e),
                    }
                }
            }
        };
        match tokio::time::timeout(ADMIN_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Response::error(504, "the NATS operation timed out"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bridges_streams_can_be_changed() {
        let s = StreamsConfig::default();
        assert!(check_target(StreamOp::Info, Some("OTHER"), &s).is_ok());
        assert!(check_target(StreamOp::Purge, Some("CDC"), &s).is_ok());
        assert!(check_target(StreamOp::Delete, Some("INIT"), &s).is_ok());
        assert_eq!(
            check_target(StreamOp::Delete, Some("OTHER"), &s)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            check_target(StreamOp::Info, None, &s).unwrap_err().status,
            400
        );
        for bad in ["", "a.b", "a b", "a*", "x>", "a/b"] {
            assert_eq!(
                check_target(StreamOp::Info, Some(bad), &s)
                    .unwrap_err()
                    .status,
                400,
                "{bad:?}"
            );
        }
    }
}
