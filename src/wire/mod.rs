//! The message contract: everything a consumer of the bridge relies on, in one place.
//!
//! * [`names`]: subject prefixes, the snapshot request prefix, the schemas bucket and its keys,
//!   header names and stream metadata keys;
//! * [`subject`]: how a table becomes subject tokens, the change and snapshot subjects, and
//!   parsing them back;
//! * [`id`]: the deterministic message id of each change;
//! * [`fields`]: the field names of every message kind;
//! * [`event`]: the change event the pipeline hands to the publisher;
//! * [`outbox`]: outbox events, their subjects and dead letters;
//! * [`encode`]: change events, snapshot chunks and documents in MessagePack or JSON, and
//!   change events in Debezium's envelope;
//! * [`text`]: decimal numbers, timestamps and base64 as the messages write them;
//! * [`decode`]: the consumer side, reading messages back (used by `bridge mirror` and the
//!   watch commands).
//!
//! The producer (pipeline, sink, snapshot service) and the consumers (mirror, watch) both
//! use this module and nothing of each other, so the contract changes in one place.

pub mod decode;
pub mod encode;
pub mod event;
pub mod fields;
pub mod id;
pub mod kafka;
pub mod names;
pub mod outbox;
pub mod subject;
pub mod text;
