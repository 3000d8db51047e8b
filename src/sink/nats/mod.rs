//! The NATS JetStream sink: the connection ([`connect`]), the streams ([`streams`]), the
//! publisher with its window of PubAcks ([`publisher`], [`puback`]), and [`NatsSink`], which the
//! pipeline drives.
//!
//! Everything here is async and meant for the small tokio runtime of the calling thread.

mod connect;
pub mod puback;
pub mod publisher;
mod streams;

/// First token of every change subject (`cdc.{table}.{op}`).
pub const CDC_SUBJECT_PREFIX: &str = "cdc";
/// First token of every snapshot subject (`init.snap.…`, `init.meta.…`).
pub const INIT_SUBJECT_PREFIX: &str = "init";
/// Connection name the bridge shows in the server's monitoring (`/connz`).
pub const CONNECTION_NAME: &str = "pgbridge";

pub use connect::{connect, connect_with_stats, max_payload, NatsError};
pub use streams::{
    cdc_stream_config, check_jetstream, check_stream_format, ensure_streams, init_stream_config,
    stream_last_sequence, StreamWarning, StreamsInfo,
};
