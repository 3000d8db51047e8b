//! The positions topic of exactly-once delivery, read back: the last committed record of this
//! bridge's key (see [`crate::wire::kafka::PositionRecord`]), read `read_committed`, so a
//! position written in an aborted (or still open) transaction never counts.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::pg::timeline::TimelineHistory;
use crate::pg::Lsn;
use crate::wire::kafka::{position_key, PositionRecord};

use super::{client_config, Context, REQUEST_TIMEOUT};

/// How long reading the positions topic to its end may take before it counts as failed.
const READ_LIMIT: Duration = Duration::from_secs(30);
/// Longest single poll, so that the limit is looked at.
const POLL_WAIT: Duration = Duration::from_millis(500);

impl ConsumerContext for Context {}

/// This bridge's position as the last committed positions record for its key states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Committed {
    /// The record's `end_lsn`: the end of the last PostgreSQL transaction in Kafka.
    pub(crate) end: Lsn,
    /// The timeline that WAL was written on.
    pub(crate) timeline: u32,
}

/// Where this bridge's position stands in Kafka: the last committed record written for
/// `system_identifier` and `slot` on `topic` (partition 0) with a readable `end_lsn`, `None`
/// when there is none.
pub(crate) fn read(
    kafka: &KafkaConfig,
    context: Context,
    topic: &str,
    system_identifier: &str,
    slot: &str,
) -> Result<Option<Committed>, KafkaError> {
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
                        Ok(r) => r.end_for(system_identifier, slot).map(|end| Committed {
                            end,
                            timeline: r.timeline,
                        }),
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

/// Why a positions record does not fit the server it would be resumed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Untrusted {
    /// Its position lies beyond the server's WAL.
    AheadOfServer,
    /// Its timeline is not on the history of the server's timeline at its position; where that
    /// timeline ended on the history, if it is a past timeline of it.
    OffHistory { switch_point: Option<Lsn> },
}

/// Checks a record's position, `end` on `timeline`, against the server: a server restored from
/// a backup (or a standby promoted from an older one) keeps its system identifier, so a record
/// of its former life matches the key but may lie beyond the WAL the server has (`server_wal`,
/// taken before the record was read: the WAL only grows) or on a timeline the server's
/// history (`history`) left before that position. Skipping up to such a record would lose
/// changes.
pub(crate) fn check(
    end: Lsn,
    timeline: u32,
    server_wal: Lsn,
    history: &TimelineHistory,
) -> Result<(), Untrusted> {
    if end > server_wal {
        return Err(Untrusted::AheadOfServer);
    }
    if !history.contains(timeline, end) {
        return Err(Untrusted::OffHistory {
            switch_point: history.switch_point(timeline),
        });
    }
    Ok(())
}

impl Untrusted {
    /// What was found and what it means, for the refusal's line.
    pub(crate) fn explain(&self, server_wal: Lsn, history: &TimelineHistory) -> String {
        match self {
            Untrusted::AheadOfServer => format!(
                "ahead of the server's WAL position {server_wal} (timeline {}): the cluster was restored from a backup or its data directory replaced, keeping its system identifier",
                history.current()
            ),
            Untrusted::OffHistory { switch_point } => {
                let story = match switch_point {
                    Some(sw) => format!("that timeline ended at {sw}"),
                    None => "that timeline is not in its history".to_string(),
                };
                format!(
                    "which is not on the history of the server's timeline {} ({story}; server WAL position {server_wal}): the server was restored to an earlier point (PITR) or promoted from a standby before it had that position",
                    history.current()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Timeline 3: timeline 1 ended at 0/5000000, timeline 2 at 0/9000000.
    fn history3() -> TimelineHistory {
        TimelineHistory::parse(
            3,
            "1\t0/5000000\tno recovery target\n2\t0/9000000\tpromoted\n",
        )
        .unwrap()
    }

    #[test]
    fn a_record_at_or_below_the_server_on_its_timeline_is_trusted() {
        let one = TimelineHistory::single(1);
        assert_eq!(check(Lsn(0x300), 1, Lsn(0x300), &one), Ok(()));
        assert_eq!(check(Lsn(0x100), 1, Lsn(0x300), &one), Ok(()));
        // A past timeline up to its switch point, and the current one.
        let h = history3();
        assert_eq!(check(Lsn(0x500_0000), 1, Lsn(0xA00_0000), &h), Ok(()));
        assert_eq!(check(Lsn(0x800_0000), 2, Lsn(0xA00_0000), &h), Ok(()));
        assert_eq!(check(Lsn(0x980_0000), 3, Lsn(0xA00_0000), &h), Ok(()));
    }

    #[test]
    fn a_record_beyond_the_servers_wal_is_refused() {
        let one = TimelineHistory::single(1);
        assert_eq!(
            check(Lsn(0x301), 1, Lsn(0x300), &one),
            Err(Untrusted::AheadOfServer)
        );
        // Checked first: also on another timeline.
        assert_eq!(
            check(Lsn(0x1_0000_0000), 1, Lsn(0xA00_0000), &history3()),
            Err(Untrusted::AheadOfServer)
        );
        let line = Untrusted::AheadOfServer.explain(Lsn(0x300), &one);
        assert!(line.contains("0/300 (timeline 1)"), "{line}");
    }

    #[test]
    fn a_record_off_the_servers_history_is_refused() {
        let h = history3();
        // Timeline 1 past its switch point: the server left it before that position.
        let off = check(Lsn(0x600_0000), 1, Lsn(0xA00_0000), &h);
        assert_eq!(
            off,
            Err(Untrusted::OffHistory {
                switch_point: Some(Lsn(0x500_0000))
            })
        );
        let line = off.unwrap_err().explain(Lsn(0xA00_0000), &h);
        assert!(
            line.contains(
                "timeline 3 (that timeline ended at 0/5000000; server WAL position 0/A000000)"
            ),
            "{line}"
        );
        // A timeline the server never was on (a later one, or another branch).
        assert_eq!(
            check(Lsn(0x100), 4, Lsn(0xA00_0000), &h),
            Err(Untrusted::OffHistory { switch_point: None })
        );
        assert_eq!(
            check(Lsn(0x100), 2, Lsn(0x300), &TimelineHistory::single(1)),
            Err(Untrusted::OffHistory { switch_point: None })
        );
    }
}
