//! JetStream's share of the latency: a change-sized message with a `Nats-Msg-Id` every 5 ms
//! into a file-stored stream of its own with the CDC stream's settings, timed from publish
//! to PubAck, one at a time. It runs beside the bridge in the latency run, on the same busy
//! machine and the same nats-server, so a tail that shows here too is nats-server storing
//! and acknowledging at that moment, not the bridge. The core NATS ping beside it never
//! touches JetStream's store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use tokio::task::JoinHandle;

/// The probe's stream and its one subject, outside `cdc.>` and every other stream's subjects.
pub const STREAM: &str = "JSPROBE";
pub const SUBJECT: &str = "bench.jsprobe";
/// About a change event of the benchmark's workload as the bridge encodes it: the JetStream
/// ceiling's messages, the bridge's own, average about 410 bytes.
pub const PAYLOAD_BYTES: usize = 400;
/// Time between two pings, as the core NATS ping's.
pub const EVERY: Duration = Duration::from_millis(5);

/// Publish -> PubAck round trips in ms, in the order sent, and the pings that failed.
pub struct Pings {
    pub ms: Vec<f64>,
    pub errors: u64,
}

pub struct JsPing {
    js: jetstream::Context,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Pings>,
}

impl JsPing {
    /// Creates [`STREAM`] with the settings of the stream `like` (the CDC stream the bridge
    /// made) and pings it in a task of the current runtime, so only while the runtime runs.
    pub async fn start(js: &jetstream::Context, like: &str) -> JsPing {
        let mut config = js
            .get_stream(like)
            .await
            .unwrap_or_else(|e| panic!("stream {like}: {e}"))
            .info()
            .await
            .unwrap_or_else(|e| panic!("stream {like} info: {e}"))
            .config
            .clone();
        config.name = STREAM.into();
        config.subjects = vec![SUBJECT.into()];
        config.description = Some("pgbridge benchmark: JetStream ping".into());
        let _ = js.delete_stream(STREAM).await;
        js.create_stream(config)
            .await
            .unwrap_or_else(|e| panic!("create stream {STREAM}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(ping(js.clone(), Arc::clone(&stop)));
        JsPing {
            js: js.clone(),
            stop,
            task,
        }
    }

    /// No ping after the one under way.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops, waits for the ping under way, deletes [`STREAM`]; the round trips.
    pub async fn finish(self) -> Pings {
        self.stop();
        let pings = self.task.await.expect("JetStream ping task");
        self.js
            .delete_stream(STREAM)
            .await
            .unwrap_or_else(|e| panic!("delete stream {STREAM}: {e}"));
        pings
    }
}

async fn ping(js: jetstream::Context, stop: Arc<AtomicBool>) -> Pings {
    let payload = Bytes::from(vec![b'x'; PAYLOAD_BYTES]);
    let mut pings = Pings {
        ms: Vec::new(),
        errors: 0,
    };
    let mut tick = tokio::time::interval(EVERY);
    // One at a time on a 5 ms grid: a slow PubAck skips the ticks it overran rather than
    // sending the missed pings back to back.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        if stop.load(Ordering::Relaxed) {
            return pings;
        }
        n += 1;
        // Shaped like the bridge's ids (namespace, timeline, LSN, seq), never one of them.
        let id = format!("jsprobe:1:0/{:X}-0", 0x1000000 + n);
        let message = PublishMessage::build()
            .payload(payload.clone())
            .message_id(id);
        let sent = Instant::now();
        let acked = match js.send_publish(SUBJECT, message).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if acked {
            pings.ms.push(sent.elapsed().as_secs_f64() * 1e3);
        } else {
            pings.errors += 1;
        }
    }
}
