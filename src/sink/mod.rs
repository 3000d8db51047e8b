//! Everything that speaks to NATS: encoding, subjects, JetStream streams and publishing.

pub mod encode;
pub mod nats;
pub mod puback;
pub mod publisher;
pub mod subject;
