//! pgbridge: PostgreSQL logical replication (pgoutput) into NATS JetStream.
//!
//! The library holds every part of the bridge; `main.rs` only parses the command line and
//! calls [`run`]. Tests drive the same entry points as the binary.

pub mod alloc;
pub mod cli;
pub mod config;
pub mod control;
pub mod mirror;
pub mod outbox;
pub mod pg;
pub mod pipeline;
pub mod runtime;
pub mod shutdown;
pub mod sink;
pub mod snapshot;
pub mod telemetry;
pub mod watch;
pub mod wire;

pub use pipeline::{run, RunError};
