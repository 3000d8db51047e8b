//! The integration tests: one binary, a module per area. They run the real `bridge` binary
//! against throw-away PostgreSQL and nats-server processes (the `testkit` crate). Tests that
//! must not share a moment with each other (chaos, clusters, memory, fail-over, the big mirror
//! scenarios) hold `testkit::heavy()`.

mod bridge_run;
mod chaos;
mod cli;
mod cluster;
mod deploy;
mod envelope;
mod failover;
mod ha;
mod harness;
mod identity;
mod kafka;
mod kafka_cluster;
mod kafka_envelope;
mod kafka_eos;
mod kafka_outbox;
mod kafka_sasl;
mod kafka_snapshot;
mod liveness;
mod memory;
mod mirror;
mod nats_permissions;
mod nats_setup;
mod outbox;
mod outbox_example;
mod pgoutput_vectors;
mod pipeline;
mod pipeline_faults;
mod publisher;
mod python_consumer;
mod replication;
mod scale_out;
mod snapshot;
mod snapshot_requests;
mod start_checks;
mod tail;
mod telemetry;
mod tls;
mod versions;
