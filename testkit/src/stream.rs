//! Reading a JetStream stream back, and checks on what it holds.

use std::time::{Duration, Instant};

use crate::nats::with_nats;

/// One message stored in a JetStream stream.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Stream sequence.
    pub seq: u64,
    /// Subject.
    pub subject: String,
    /// The `Nats-Msg-Id` header.
    pub msg_id: Option<String>,
    /// The `Pgbridge-Last-In-Tx` header.
    pub last_in_tx_header: Option<String>,
    /// Every header but the status line, as (name, value), sorted.
    pub headers: Vec<(String, String)>,
    /// Payload.
    pub payload: Vec<u8>,
    /// When JetStream stored it (the server's clock: the same host in tests).
    pub stored_at: std::time::SystemTime,
}

/// Longest wait for the next message before the reader starts a new ordered consumer where the
/// last one stopped: after an R3 stream lost and regained its quorum, an ordered consumer was
/// once seen to deliver nothing more although the stream held the messages.
const READ_STALL: Duration = Duration::from_secs(15);

/// Reads every message of `stream` (empty when the stream does not exist yet), in stream
/// order, through an ordered consumer.
pub fn read_stream(nats_url: &str, stream: &str) -> Vec<StoredMessage> {
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    use futures_util::StreamExt;
    with_nats(nats_url, |client| async move {
        let js = async_nats::jetstream::new(client);
        let Ok(mut s) = js.get_stream(stream).await else {
            return Vec::new();
        };
        let info = s.info().await.expect("stream info").clone();
        let mut out = Vec::new();
        if info.state.messages == 0 {
            return out;
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let total = info.state.messages as usize;
        let mut next_seq = info.state.first_sequence;
        'consumers: while out.len() < total {
            let config = OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: next_seq,
                },
                ..Default::default()
            };
            let consumer = s.create_consumer(config).await.expect("ordered consumer");
            let mut messages = consumer.messages().await.expect("consume");
            while out.len() < total {
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(next) = tokio::time::timeout(left.min(READ_STALL), messages.next()).await
                else {
                    assert!(
                        Instant::now() < deadline,
                        "reading {stream} timed out at sequence {next_seq}: {} of {total} messages read",
                        out.len()
                    );
                    eprintln!(
                        "reading {stream}: nothing for {READ_STALL:?} at sequence {next_seq}; \
                         reading on from there with a new consumer"
                    );
                    continue 'consumers;
                };
                let message = stored_message(&next.expect("stream ended").expect("message"));
                next_seq = message.seq + 1;
                let last = message.seq >= info.state.last_sequence;
                out.push(message);
                if last {
                    break 'consumers;
                }
            }
        }
        out
    })
}

/// A message as a consumer received it, with its stream sequence, time and headers.
fn stored_message(next: &async_nats::jetstream::Message) -> StoredMessage {
    let info_of = next.info().expect("message info");
    let stored_at = std::time::UNIX_EPOCH
        + Duration::from_nanos(
            u64::try_from(info_of.published.unix_timestamp_nanos()).unwrap_or(0),
        );
    StoredMessage {
        seq: info_of.stream_sequence,
        stored_at,
        subject: next.subject.to_string(),
        msg_id: next
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string()),
        last_in_tx_header: next
            .headers
            .as_ref()
            .and_then(|h| h.get("Pgbridge-Last-In-Tx"))
            .map(|v| v.as_str().to_string()),
        headers: next
            .headers
            .as_ref()
            .map(|h| {
                let mut all: Vec<(String, String)> = h
                    .iter()
                    .flat_map(|(k, vs)| {
                        vs.iter()
                            .map(move |v| (k.to_string(), v.as_str().to_string()))
                    })
                    .collect();
                all.sort();
                all
            })
            .unwrap_or_default(),
        payload: next.payload.to_vec(),
    }
}

impl StoredMessage {
    /// The value of header `name`, if the message has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Number of messages in `stream` (0 when it does not exist).
pub fn stream_len(nats_url: &str, stream: &str) -> u64 {
    with_nats(nats_url, |client| async move {
        let js = async_nats::jetstream::new(client);
        match js.get_stream(stream).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        }
    })
}

/// The row ids of a stream of JSON change events (`--format json`), with their message ids,
/// in stream order.
pub fn json_row_ids(messages: &[StoredMessage]) -> Vec<(i64, String)> {
    messages
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("JSON event");
            let id = v["columns"]
                .as_array()
                .and_then(|cols| cols.iter().find(|c| c["name"] == "id"))
                .and_then(|c| c["value"].as_i64())
                .unwrap_or_else(|| panic!("no integer id column in {v}"));
            (id, m.msg_id.clone().expect("Nats-Msg-Id"))
        })
        .collect()
}

/// Asserts that `rows` (row id, message id, in stream order) hold ids 1..=n each exactly once,
/// by row id and by message id, in increasing order.
pub fn assert_once_in_order(rows: &[(i64, String)], n: u64) {
    let ids: std::collections::HashSet<&String> = rows.iter().map(|(_, m)| m).collect();
    assert_eq!(ids.len(), rows.len(), "a message id is stored twice");
    for w in rows.windows(2) {
        assert!(
            w[0].0 < w[1].0,
            "stream order is not commit order: row {} ({}) before row {} ({})",
            w[0].0,
            w[0].1,
            w[1].0,
            w[1].1
        );
    }
    let got: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    let want: Vec<i64> = (1..=n as i64).collect();
    if got != want {
        let have: std::collections::HashSet<i64> = got.iter().copied().collect();
        let missing: Vec<i64> = want
            .iter()
            .filter(|i| !have.contains(i))
            .take(20)
            .copied()
            .collect();
        panic!(
            "stream holds {} rows, {n} committed; first missing: {missing:?}",
            got.len()
        );
    }
}
