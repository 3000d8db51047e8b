//! The positions topic of exactly-once delivery, read back: the last committed record of this
//! bridge's key (see [`crate::wire::kafka::PositionRecord`]), read `read_committed`, so a
//! position written in an aborted (or still open) transaction never counts.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::pg::Lsn;
use crate::wire::kafka::{position_key, PositionRecord};

use super::{client_config, Context, REQUEST_TIMEOUT};

/// How long reading the positions topic to its end may take before it counts as failed.
const READ_LIMIT: Duration = Duration::from_secs(30);
/// Longest single poll, so that the limit is looked at.
const POLL_WAIT: Duration = Duration::from_millis(500);

impl ConsumerContext for Context {}

/// Where this bridge's position stands in Kafka: the last committed `end_lsn` written for
/// `system_identifier` and `slot` on `topic` (partition 0), `None` when there is none.
pub(crate) fn read(
    kafka: &KafkaConfig,
    context: Context,
    topic: &str,
    system_identifier: &str,
    slot: &str,
) -> Result<Option<Lsn>, KafkaError> {
    let mut config = client_config(kafka);
    config
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // A consumer's group is needed by the client only; it joins none (assign, no commit).
        .set("group.id", "pgbridge-positions");
    // Producer-only settings in the shared configuration would only be warned about.
    for k in ["enable.idempotence", "acks", "transactional.id"] {
        config.remove(k);
    }
    let consumer: BaseConsumer<Context> = config.create_with_context(context)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let key = position_key(system_identifier, slot);
    let mut found = None;
    let deadline = Instant::now() + READ_LIMIT;
    loop {
        if Instant::now() > deadline {
            return Err(KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::RequestTimedOut,
            ));
        }
        match consumer.poll(POLL_WAIT) {
            None => {}
            // read_committed: the end is the last stable offset.
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(found),
            Some(Err(e)) => return Err(e),
            Some(Ok(m)) => {
                if m.key() != Some(key.as_bytes()) {
                    continue;
                }
                found = match m.payload() {
                    // A tombstone: the position was removed by hand.
                    None => None,
                    Some(v) => match serde_json::from_slice::<PositionRecord>(v) {
                        Ok(r) => r.end_for(system_identifier, slot),
                        Err(e) => {
                            log::warn!(
                                "positions topic {topic}: offset {} of key {key} is not a position record ({e}); ignored",
                                m.offset()
                            );
                            found
                        }
                    },
                };
            }
        }
    }
}

/// How long a transactional call (init, commit, abort) may block.
pub(crate) const TRANSACTION_CALL_TIMEOUT: Duration = REQUEST_TIMEOUT;
