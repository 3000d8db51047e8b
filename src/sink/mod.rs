//! Everything that speaks to NATS: encoding, subjects, JetStream streams and publishing.

pub mod encode;
pub mod nats;
pub mod schemas;
pub mod snapshot;
pub mod subject;
