//! Snapshots into the INIT stream (see [`super`]).

use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::Context;
use bytes::Bytes;

use crate::sink::nats::{max_payload, stream_last_sequence};
use crate::wire::fields;
use crate::wire::names::INIT_SUBJECT_PREFIX;
use crate::wire::subject::push_table_token;

use super::super::chunks::{is_failure_document, SnapshotFailure};
use super::{AckWindow, InitTarget, InitWriter, LastMeta};

/// Bytes of chunks whose PubAck may be outstanding at once: two max_payloads. A chunk is
/// at most about half the server's max_payload, so that is at least four chunks.
const IN_FLIGHT_MAX_PAYLOADS: usize = 2;

/// The INIT stream, through the snapshot service's JetStream context and runtime.
pub(in crate::snapshot) struct NatsInit {
    pub(in crate::snapshot) js: Context,
    pub(in crate::snapshot) rt: tokio::runtime::Handle,
    pub(in crate::snapshot) init_stream: String,
    pub(in crate::snapshot) cdc_stream: String,
}

fn meta_subject(schema: &str, table: &str) -> String {
    let mut token = String::new();
    push_table_token(&mut token, schema, table);
    format!("{INIT_SUBJECT_PREFIX}.meta.{token}")
}

/// What a request refused as `in_progress` waits for, in the INIT stream.
fn awaited_meta(init_stream: &str, schema: &str, table: &str) -> String {
    format!(
        "its meta message {} in stream '{init_stream}'",
        meta_subject(schema, table)
    )
}

impl InitTarget for NatsInit {
    fn name(&self) -> String {
        format!("stream '{}'", self.init_stream)
    }

    fn awaited_meta(&self, schema: &str, table: &str) -> String {
        awaited_meta(&self.init_stream, schema, table)
    }

    fn meta_location(&self, schema: &str, table: &str) -> (String, String) {
        (self.name(), meta_subject(schema, table))
    }

    fn last_meta(&self, schema: &str, table: &str) -> Result<LastMeta, String> {
        let subject = meta_subject(schema, table);
        self.rt.block_on(async {
            let stream = self
                .js
                .get_stream_no_info(&self.init_stream)
                .await
                .map_err(|e| e.to_string())?;
            match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(msg) => Ok(if is_failure_document(&msg.payload) {
                    LastMeta::Failed
                } else {
                    LastMeta::Finished
                }),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                    Ok(LastMeta::Missing)
                }
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn open<'a>(
        &'a self,
        schema: &str,
        table: &str,
    ) -> Result<Box<dyn InitWriter + 'a>, SnapshotFailure> {
        let mut token = String::new();
        push_table_token(&mut token, schema, table);
        let max = max_payload(&self.js.client());
        Ok(Box::new(NatsWriter {
            out: NatsOut { target: self, max },
            token,
            in_flight: AckWindow::new(max.saturating_mul(IN_FLIGHT_MAX_PAYLOADS)),
        }))
    }
}

/// One snapshot into the INIT stream.
struct NatsWriter<'a> {
    out: NatsOut<'a>,
    token: String,
    /// Chunks published and not yet acknowledged.
    in_flight: AckWindow<(String, PublishAckFuture)>,
}

/// Publishing to the INIT stream, apart from the window so both can be borrowed at once.
struct NatsOut<'a> {
    target: &'a NatsInit,
    max: usize,
}

impl NatsOut<'_> {
    /// Publishes one message; its PubAck is awaited with [`Self::wait_ack`].
    fn send(
        &self,
        subject: String,
        id: String,
        payload: Bytes,
    ) -> Result<(String, PublishAckFuture), SnapshotFailure> {
        let t = self.target;
        t.rt.block_on(async {
            let msg = PublishMessage::build().payload(payload).message_id(id);
            match t.js.send_publish(subject.clone(), msg).await {
                Ok(ack) => Ok((subject, ack)),
                Err(e) => Err(SnapshotFailure::Publish {
                    reason: self.publish_reason(e),
                    subject,
                }),
            }
        })
    }

    /// Waits (at most `timeout`) for the PubAck of a message published to `subject`.
    fn wait_ack(
        &self,
        (subject, ack): (String, PublishAckFuture),
        timeout: Duration,
    ) -> Result<(), SnapshotFailure> {
        self.target.rt.block_on(async {
            let failed = |reason: String| SnapshotFailure::Publish {
                subject: subject.clone(),
                reason,
            };
            tokio::time::timeout(timeout, ack)
                .await
                .map_err(|_| failed(format!("no PubAck within {timeout:?}")))?
                .map_err(|e| failed(self.publish_reason(e)))?;
            Ok(())
        })
    }

    /// What a failed publish means, with what to do when the message is too large.
    fn publish_reason(&self, e: async_nats::jetstream::context::PublishError) -> String {
        if e.kind() == PublishErrorKind::MaxPayloadExceeded {
            format!(
                "{e}: the message exceeds the NATS server's max_payload of {} bytes; raise it in the nats-server configuration",
                self.max
            )
        } else {
            e.to_string()
        }
    }
}

impl InitWriter for NatsWriter<'_> {
    fn cdc_position(&mut self) -> Result<Vec<(&'static str, serde_json::Value)>, SnapshotFailure> {
        let t = self.out.target;
        let seq =
            t.rt.block_on(stream_last_sequence(&t.js, &t.cdc_stream))
                .map_err(|source| SnapshotFailure::CdcSequence {
                    stream: t.cdc_stream.clone(),
                    source,
                })?;
        Ok(vec![(fields::CDC_STREAM_SEQ, seq.into())])
    }

    fn max_payload(&self) -> usize {
        self.out.max
    }

    fn row_too_large(&self, table: String, row: u64, key: String, size: usize) -> SnapshotFailure {
        SnapshotFailure::RowTooLarge {
            table,
            row,
            key,
            size,
            max: self.out.max,
        }
    }

    fn send_chunk(&mut self, id: &str, chunk: u64, payload: Bytes) -> Result<(), SnapshotFailure> {
        let subject = format!("{INIT_SUBJECT_PREFIX}.snap.{}.{id}.{chunk}", self.token);
        let msg_id = format!("snap-{id}-{chunk}");
        let out = &self.out;
        self.in_flight.send(
            payload.len(),
            |pending, timeout| out.wait_ack(pending, timeout),
            || out.send(subject, msg_id, payload),
        )
    }

    fn send_meta(
        &mut self,
        id: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), SnapshotFailure> {
        // The meta says the snapshot is complete: only once every chunk is stored.
        let out = &self.out;
        self.in_flight
            .drain(|pending, timeout| out.wait_ack(pending, timeout))?;
        let pending = out.send(
            format!("{INIT_SUBJECT_PREFIX}.meta.{}", self.token),
            format!("meta-{id}"),
            Bytes::from(payload),
        )?;
        out.wait_ack(pending, timeout)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_refused_request_waits_for_the_meta_message() {
        assert_eq!(
            super::awaited_meta("INIT", "sales", "invoices"),
            "its meta message init.meta.sales.invoices in stream 'INIT'"
        );
    }
}
