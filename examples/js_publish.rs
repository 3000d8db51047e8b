//! The JetStream ceiling of the benchmark: the least a publisher must do to store the bridge's
//! messages, with the bridge's own client settings and PubAck window.
//!
//! It first reads every message of a source stream (the CDC stream the bridge just filled;
//! not timed), then publishes the same payloads, with the same subjects (prefix replaced) and
//! the same `Nats-Msg-Id`s, to a new stream with the source's settings, keeping at most
//! `--window` PubAcks in flight and awaiting them in order, as the bridge's publisher does.
//! Prints one JSON line with the timed part and the CPU time it took.
//!
//! `--mode core` publishes the same messages as plain NATS publishes with a reply subject
//! under one inbox subscription, and counts the PubAcks that arrive there, instead of the
//! client's JetStream publish (a request per message, with its own inbox, oneshot channel
//! and JSON decoding of the ack). JetStream stores and acknowledges them just the same;
//! the difference is the client's cost per message.
//!
//! `--mode fast` publishes them as one JetStream fast-ingest batch (nats-server 2.14 and
//! later; the target stream allows batches): plain publishes whose reply subject carries the
//! batch id and the message's place in it, the server answering with a flow ack every N
//! messages (N its choice, at most `--flow`) instead of a PubAck each. `--fill N` first fills
//! the source stream with N synthetic change-sized messages, for a run without the bridge.
//!
//! ```text
//! js_publish --url nats://127.0.0.1:4222 --source CDC --target CEIL --window 1024 [--mode core|fast] [--flow 256] [--fill N] [--server-pid PID] [--chain]
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures_util::StreamExt;
use pgbridge::sink::nats::publisher::server_has_fast_batches;
use testkit::proc::cpu_of;

/// The bridge's PubAck timeout (`ACK_TIMEOUT`).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

struct Args {
    url: String,
    source: String,
    target: String,
    window: usize,
    mode: Mode,
    /// Fast batch: the most messages per flow ack the publisher asks for.
    flow: u16,
    /// Fill the source stream with this many synthetic messages first (standalone runs).
    fill: usize,
    /// nats-server's process, whose CPU time while publishing is reported too.
    server_pid: Option<u32>,
    /// Core and fast modes: every message but the first also expects the one before it
    /// (`Nats-Expected-Last-Msg-Id`), as the bridge's do.
    chain: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// async-nats' JetStream publish, a PubAck per message.
    Api,
    /// Plain publishes under one inbox, a PubAck per message.
    Core,
    /// JetStream fast-ingest batch (nats-server 2.14+): one flow ack every N messages.
    Fast,
}

fn args() -> Args {
    let mut a = Args {
        url: "nats://127.0.0.1:4222".into(),
        source: "CDC".into(),
        target: "CEIL".into(),
        window: 1024,
        mode: Mode::Api,
        flow: 256,
        fill: 0,
        server_pid: None,
        chain: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value(),
            "--source" => a.source = value(),
            "--target" => a.target = value(),
            "--window" => a.window = value().parse().expect("--window N"),
            "--mode" => {
                a.mode = match value().as_str() {
                    "core" => Mode::Core,
                    "fast" => Mode::Fast,
                    _ => Mode::Api,
                }
            }
            "--flow" => a.flow = value().parse().expect("--flow N"),
            "--fill" => a.fill = value().parse().expect("--fill N"),
            "--server-pid" => a.server_pid = Some(value().parse().expect("--server-pid PID")),
            "--chain" => a.chain = true,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

struct Msg {
    subject: String,
    id: String,
    payload: Bytes,
}

fn main() {
    let args = args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let client = async_nats::connect(&args.url).await.expect("connect");
    if args.mode == Mode::Fast && !server_has_fast_batches(&client.server_info().version) {
        println!(
            "{{\"skipped\":\"nats-server {} has no fast-ingest batches (2.14 or later)\"}}",
            client.server_info().version
        );
        return;
    }
    let js = async_nats::jetstream::new(client.clone());

    if args.fill > 0 {
        fill_source(&client, &js, &args.source, args.fill).await;
    }
    // Read the source (not timed).
    let read_started = Instant::now();
    let mut source = js.get_stream(&args.source).await.expect("source stream");
    let info = source.info().await.expect("stream info").clone();
    let total = info.state.messages as usize;
    let consumer = source
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("consume");
    let prefix = format!("{}.", info.config.subjects[0].trim_end_matches(".>"));
    let target_prefix = args.target.to_lowercase();
    let mut msgs = Vec::with_capacity(total);
    while msgs.len() < total {
        let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("reading the source stream timed out")
            .expect("source stream ended")
            .expect("message");
        let subject = m.subject.as_str();
        let tail = subject.strip_prefix(&prefix).unwrap_or(subject);
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        msgs.push(Msg {
            subject: format!("{target_prefix}.{tail}"),
            id,
            payload: m.payload.clone(),
        });
    }
    drop(messages);
    let read_secs = read_started.elapsed().as_secs_f64();

    // A target stream with the source's settings.
    let mut config = info.config.clone();
    config.name = args.target.clone();
    config.subjects = vec![format!("{target_prefix}.>")];
    config.description = Some("pgbridge benchmark: JetStream ceiling".into());
    config.allow_batch_publish = args.mode == Mode::Fast;
    let _ = js.delete_stream(&args.target).await;
    js.create_stream(config)
        .await
        .expect("create target stream");

    // Publish with the bridge's client settings and window (timed).
    let js = async_nats::jetstream::context::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .max_ack_inflight(args.window.max(1))
        .build(client.clone());
    let bytes: usize = msgs.iter().map(|m| m.payload.len()).sum();
    let cpu_before = cpu_time();
    let server_before = args.server_pid.and_then(cpu_of);
    let started = Instant::now();
    if args.mode == Mode::Core {
        publish_core(&client, &msgs, args.window, args.chain).await;
    } else if args.mode == Mode::Fast {
        publish_fast(&client, &msgs, args.window, args.flow, args.chain).await;
    } else {
        let mut window = VecDeque::with_capacity(args.window);
        for m in &msgs {
            if window.len() >= args.window {
                let ack: async_nats::jetstream::context::PublishAckFuture =
                    window.pop_front().expect("non-empty window");
                ack.await.expect("PubAck");
            }
            let publish = PublishMessage::build()
                .payload(m.payload.clone())
                .message_id(&m.id);
            let ack = js
                .send_publish(m.subject.clone(), publish)
                .await
                .expect("publish");
            window.push_back(ack);
        }
        while let Some(ack) = window.pop_front() {
            ack.await.expect("PubAck");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_time() - cpu_before;
    let server_cpu = match (server_before, args.server_pid.and_then(cpu_of)) {
        (Some(before), Some(after)) => {
            format!("{:.2}", (after.total() - before.total()).as_secs_f64())
        }
        _ => "null".into(),
    };
    let stored = js
        .get_stream(&args.target)
        .await
        .expect("target stream")
        .info()
        .await
        .expect("info")
        .state
        .messages;
    assert_eq!(stored as usize, msgs.len(), "every message stored once");
    println!(
        "{{\"messages\":{},\"payload_bytes\":{},\"seconds\":{:.6},\"rate\":{:.1},\"cpu_seconds\":{:.6},\"server_cpu_seconds\":{},\"read_seconds\":{:.3}}}",
        msgs.len(),
        bytes,
        secs,
        msgs.len() as f64 / secs,
        cpu,
        server_cpu,
        read_secs
    );
    let _ = js.delete_stream(&args.target).await;
}

/// A source stream of `n` messages shaped like change events (~230 bytes, one id each).
async fn fill_source(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    name: &str,
    n: usize,
) {
    let prefix = name.to_lowercase();
    let _ = js.delete_stream(name).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{prefix}.>")],
        ..Default::default()
    })
    .await
    .expect("create source stream");
    let msgs: Vec<Msg> = (0..n)
        .map(|i| Msg {
            subject: format!("{prefix}.public.accounts.insert"),
            id: format!("pgbridge:1:{:X}-{}", 0x1000000 + i / 3, i % 3),
            payload: Bytes::from(format!(
                "{{\"op\":\"insert\",\"schema\":\"public\",\"table\":\"accounts\",\"lsn\":\"0/{:X}\",\"commit_lsn\":\"0/{:X}\",\"seq\":{},\"commit_time\":\"2026-12-02T15:00:00.000000Z\",\"xid\":{},\"new\":{{\"id\":{},\"balance\":{},\"name\":\"account {}\"}}}}",
                0x1000000 + i * 80, 0x1000000 + i / 3 * 240, i % 3, 1000 + i / 3, i, i * 7, i
            )),
        })
        .collect();
    publish_core(client, &msgs, 1024, false).await;
}

/// Publishes `m` with its `Nats-Msg-Id` as a plain message answered on `reply`.
/// Publishes `m` with its id, expecting `expect` as the stream's last message id if given.
async fn publish_with_id(
    client: &async_nats::Client,
    m: &Msg,
    reply: String,
    expect: Option<&Msg>,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", m.id.as_str());
    if let Some(before) = expect {
        headers.insert("Nats-Expected-Last-Msg-Id", before.id.as_str());
    }
    client
        .publish_with_reply_and_headers(m.subject.clone(), reply, headers, m.payload.clone())
        .await
        .expect("publish");
}

/// Plain publishes with a reply subject `{inbox}.{n}`, at most `window` without a PubAck.
async fn publish_core(client: &async_nats::Client, msgs: &[Msg], window: usize, chain: bool) {
    let inbox = client.new_inbox();
    let mut acks = client
        .subscribe(format!("{inbox}.*"))
        .await
        .expect("ack subscription");
    let mut in_flight = 0;
    let mut next_ack = async || {
        let ack = tokio::time::timeout(ACK_TIMEOUT, acks.next())
            .await
            .expect("PubAck timed out")
            .expect("ack subscription ended");
        assert!(
            !ack.payload.windows(8).any(|w| w == b"\"error\"") && ack.status.is_none(),
            "JetStream refused a message: {:?}",
            ack
        );
    };
    for (n, m) in msgs.iter().enumerate() {
        if in_flight >= window {
            next_ack().await;
            in_flight -= 1;
        }
        let before = n.checked_sub(1).filter(|_| chain).map(|b| &msgs[b]);
        publish_with_id(client, m, format!("{inbox}.{n}"), before).await;
        in_flight += 1;
    }
    while in_flight > 0 {
        next_ack().await;
        in_flight -= 1;
    }
}

/// One fast-ingest batch (gap mode `fail`) holding every message: reply subjects
/// `{inbox}.{batch}.{flow}.fail.{seq}.{op}.$FI`, the server acknowledging every `msgs`
/// messages (it picks `msgs`, at most `flow`), at most `window` messages beyond the last
/// flow ack, the last message committing the batch.
async fn publish_fast(
    client: &async_nats::Client,
    msgs: &[Msg],
    window: usize,
    flow: u16,
    chain: bool,
) {
    let inbox = client.new_inbox();
    let batch = client.new_inbox().rsplit('.').next().unwrap().to_string();
    let mut acks = client
        .subscribe(format!("{inbox}.>"))
        .await
        .expect("ack subscription");
    let mut acked = 0u64;
    let mut every = 1u64;
    let mut next = async |acked: &mut u64, every: &mut u64| -> bool {
        let ack = tokio::time::timeout(ACK_TIMEOUT, acks.next())
            .await
            .expect("flow ack timed out")
            .expect("ack subscription ended");
        let v: serde_json::Value = serde_json::from_slice(&ack.payload).expect("ack json");
        match v["type"].as_str() {
            Some("ack") => {
                *acked = (*acked).max(v["seq"].as_u64().unwrap());
                *every = v["msgs"].as_u64().unwrap().max(1);
                false
            }
            Some(other) => panic!("fast batch: {other}: {v}"),
            None => {
                assert!(v.get("error").is_none(), "fast batch refused: {v}");
                true
            }
        }
    };
    let last = msgs.len() as u64;
    for (n, m) in msgs.iter().enumerate() {
        let seq = n as u64 + 1;
        let op = if seq == 1 {
            0
        } else if seq == last {
            2
        } else {
            1
        };
        let before = n.checked_sub(1).filter(|_| chain).map(|b| &msgs[b]);
        publish_with_id(
            client,
            m,
            format!("{inbox}.{batch}.{flow}.fail.{seq}.{op}.$FI"),
            before,
        )
        .await;
        if seq == last {
            while !next(&mut acked, &mut every).await {}
            return;
        }
        // The first reply tells the ack frequency; then at most `window` beyond the last ack.
        if seq == 1 {
            next(&mut acked, &mut every).await;
        }
        while seq >= acked + window.max(every as usize) as u64 {
            next(&mut acked, &mut every).await;
        }
    }
}

/// User + system CPU time of this process so far, in seconds.
fn cpu_time() -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
