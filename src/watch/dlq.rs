//! `bridge dlq`: the dead letters in stream `DLQ`. `list` prints each as a JSON line (stream
//! sequence, subject, reason, where it was meant to go, message id, size); `replay` publishes
//! chosen ones again to where they were meant to go (or to `--to`), with their original
//! headers and message id, waits for JetStream to store each, and then removes it from `DLQ`.

use std::io::Write;

use async_nats::jetstream::{self, stream::Stream};
use async_nats::HeaderMap;
use serde_json::json;

use super::{on_nats, open_stream, WatchError};
use crate::config::Config;
use crate::wire::names::{
    DLQ_STREAM, ERROR_DETAIL_HEADER, ERROR_HEADER, SOURCE_HEADER, TRUNCATED_HEADER,
};

/// NATS connection name.
const CONNECTION_NAME: &str = "pgbridge-dlq";

/// Headers the bridge adds to a dead letter; a replay leaves them out.
const DEAD_LETTER_HEADERS: [&str; 4] = [
    ERROR_HEADER,
    ERROR_DETAIL_HEADER,
    SOURCE_HEADER,
    TRUNCATED_HEADER,
];

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

/// Prints every dead letter as a JSON line on `out`; how many.
pub fn list(config: &Config, out: &mut dyn Write) -> Result<u64, WatchError> {
    on_nats(config, CONNECTION_NAME, |client| async move {
        let stream = open_stream(&jetstream::new(client), DLQ_STREAM).await?;
        let (first, last) = bounds(&stream).await?;
        let mut n = 0;
        for seq in first..=last {
            // Gaps: replayed (removed) dead letters.
            let Ok(m) = stream.get_raw_message(seq).await else {
                continue;
            };
            let h = &m.headers;
            let line = json!({
                "seq": seq,
                "subject": m.subject.as_str(),
                "error": header(h, ERROR_HEADER),
                "source": header(h, SOURCE_HEADER),
                "msg_id": header(h, "Nats-Msg-Id"),
                "bytes": m.payload.len(),
                "truncated_from": header(h, TRUNCATED_HEADER).and_then(|v| v.parse::<u64>().ok()),
                "detail": header(h, ERROR_DETAIL_HEADER),
            });
            writeln!(out, "{line}")?;
            n += 1;
        }
        Ok(n)
    })
}

/// Publishes the dead letters `seqs` again, each to `to` or to where it was meant to go, and
/// removes each from `DLQ` once stored (unless `keep`). Prints one JSON line per letter.
pub fn replay(
    config: &Config,
    seqs: &[u64],
    to: Option<&str>,
    keep: bool,
    out: &mut dyn Write,
) -> Result<(), WatchError> {
    on_nats(config, CONNECTION_NAME, |client| async move {
        let js = jetstream::new(client);
        let stream = open_stream(&js, DLQ_STREAM).await?;
        for &seq in seqs {
            let m = stream.get_raw_message(seq).await.map_err(|e| {
                WatchError::Usage(format!(
                    "no dead letter with sequence {seq} in {DLQ_STREAM}: {e}"
                ))
            })?;
            if let Some(size) = header(&m.headers, TRUNCATED_HEADER) {
                return Err(WatchError::Usage(format!(
                    "dead letter {seq} holds only the start of its body ({} of {size} bytes): it cannot be replayed; raise the limit, then publish the event again from its source",
                    m.payload.len()
                )));
            }
            let target = match to {
                Some(t) => t.to_owned(),
                None => header(&m.headers, SOURCE_HEADER)
                    .unwrap_or_default()
                    .to_owned(),
            };
            if !valid_subject(&target) {
                return Err(WatchError::Usage(format!(
                    "dead letter {seq} was meant for {target:?}, which is not a subject to publish to: give --to SUBJECT"
                )));
            }
            let mut headers = HeaderMap::new();
            for (name, values) in m.headers.iter() {
                let name = name.to_string();
                if DEAD_LETTER_HEADERS.contains(&name.as_str())
                    || (name.starts_with("Nats-") && name != "Nats-Msg-Id")
                {
                    continue;
                }
                for v in values {
                    headers.append(name.as_str(), v.as_str());
                }
            }
            let ack = js
                .publish_with_headers(target.clone(), headers, m.payload.clone())
                .await
                .map_err(|e| WatchError::Runtime(format!("publishing to {target}: {e}")))?
                .await
                .map_err(|e| {
                    WatchError::Runtime(format!("JetStream did not store it on {target}: {e}"))
                })?;
            if !keep {
                stream.delete_message(seq).await.map_err(|e| {
                    WatchError::Runtime(format!("stored, but removing dead letter {seq}: {e}"))
                })?;
            }
            let line = json!({
                "seq": seq,
                "replayed_to": target,
                "stream": ack.stream,
                "stream_seq": ack.sequence,
                "duplicate": ack.duplicate,
                "removed": !keep,
            });
            writeln!(out, "{line}")?;
        }
        Ok(())
    })
}

async fn bounds(stream: &Stream) -> Result<(u64, u64), WatchError> {
    let info = stream
        .get_info()
        .await
        .map_err(|e| WatchError::Runtime(format!("JetStream: reading stream {DLQ_STREAM}: {e}")))?;
    Ok((info.state.first_sequence, info.state.last_sequence))
}

/// A subject a message can be published to: no empty token, no white space, no wildcard.
fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && !t.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_publishable_subjects_are_replay_targets() {
        assert!(valid_subject("outbox.order.OrderPlaced"));
        for bad in [
            "",
            "outbox..X",
            "outbox.a b.c",
            "outbox.*.x",
            "outbox.>",
            "a.",
            ".a",
        ] {
            assert!(!valid_subject(bad), "{bad:?}");
        }
    }
}
