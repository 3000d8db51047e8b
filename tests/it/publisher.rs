//! The publisher against a real nats-server, without PostgreSQL: PubAcks are matched to their
//! messages, a missing stream (no responders) and refusals in the middle of the window are
//! retried in order, and the durable position never passes a message JetStream has not stored.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
use pgbridge::config::Format;
use pgbridge::pg::value::Value;
use pgbridge::pg::Lsn;
use pgbridge::shutdown::Shutdown;
use pgbridge::sink::nats::publisher::{PublishError, Publisher, PublisherSettings};
use pgbridge::sink::ring::{self, RingItem};
use pgbridge::telemetry::counters::{DurableLsn, PublisherStats};
use pgbridge::wire::event::{ChangeEvent, ColumnValue, Operation, TableRef};

use testkit::{read_stream, with_nats, NatsServer};

/// Transactions fed to the publisher, each of [`PER_TXN`] changes.
const TXNS: u64 = 40;
const PER_TXN: u32 = 3;
/// Bound of every wait.
const WAIT: Duration = Duration::from_secs(30);

fn commit_lsn(txn: u64) -> Lsn {
    Lsn(0x1_0000 + txn * 0x100)
}

fn end_lsn(txn: u64) -> Lsn {
    Lsn(commit_lsn(txn).0 + 0x30)
}

/// A change with a text column of `pad` bytes besides its id.
fn change_sized(table: &Arc<TableRef>, txn: u64, seq: u32, pad: usize) -> Box<ChangeEvent> {
    let mut ev = Box::new(ChangeEvent {
        table: Arc::clone(table),
        operation: Operation::Insert,
        lsn: Lsn(commit_lsn(txn).0 - 0x10),
        commit_lsn: commit_lsn(txn),
        timeline: TIMELINE,
        xid: 1000 + txn as u32,
        commit_time: 0,
        seq,
        last_in_tx: seq + 1 == PER_TXN,
        columns: vec![ColumnValue {
            name: Arc::from("id"),
            value: Value::Int((txn * u64::from(PER_TXN) + u64::from(seq)) as i64),
        }],
        old_columns: None,
        unchanged_toast: Vec::new(),
    });
    if pad > 0 {
        ev.columns.push(ColumnValue {
            name: Arc::from("pad"),
            value: Value::Text("x".repeat(pad)),
        });
    }
    ev
}

/// The namespace and timeline of the message ids.
const NAMESPACE: &str = "pub-test_1";
const TIMELINE: u32 = 2;

/// Every message id (`{namespace}:{timeline}:{commit_lsn}-{seq}`), in commit order.
fn expected_ids() -> Vec<String> {
    (0..TXNS)
        .flat_map(|t| {
            (0..PER_TXN).map(move |s| format!("{NAMESPACE}:{TIMELINE}:{}-{s}", commit_lsn(t)))
        })
        .collect()
}

struct Running {
    thread: JoinHandle<Result<(), PublishError>>,
    durable: DurableLsn,
    stats: Arc<PublisherStats>,
}

impl Running {
    fn wait_until(&self, what: &str, check: impl Fn(&Running) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !check(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn join(self) -> Result<(), PublishError> {
        let deadline = Instant::now() + WAIT;
        while !self.thread.is_finished() {
            assert!(Instant::now() < deadline, "the publisher did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.thread.join().expect("publisher thread panicked")
    }
}

/// Puts all transactions and the end marker on the ring, then runs a publisher over it on its
/// own thread and runtime, as the bridge does.
fn start_publisher(url: &str, max_in_flight: usize) -> Running {
    start_publisher_with(url, max_in_flight, |_, _| 0)
}

/// As [`start_publisher`], with the change `seq` of transaction `txn` padded by `pad(txn, seq)`
/// bytes.
fn start_publisher_with(
    url: &str,
    max_in_flight: usize,
    pad: impl Fn(u64, u32) -> usize,
) -> Running {
    let table = Arc::new(TableRef {
        columns: Vec::new(),
        schema: Arc::from("public"),
        table: Arc::from("t"),
        relation_id: 16384,
        key_columns: Vec::new(),
    });
    let (mut producer, consumer) =
        ring::channel((TXNS * (u64::from(PER_TXN) + 1) + 1) as usize, u64::MAX);
    for txn in 0..TXNS {
        for seq in 0..PER_TXN {
            assert!(producer
                .push(RingItem::Change(change_sized(
                    &table,
                    txn,
                    seq,
                    pad(txn, seq)
                )))
                .is_ok());
        }
        assert!(producer
            .push(RingItem::Commit {
                end_lsn: end_lsn(txn)
            })
            .is_ok());
    }
    assert!(producer.push(RingItem::End).is_ok());
    let durable = DurableLsn::new(Lsn(0));
    let stats = Arc::new(PublisherStats::default());
    let settings = PublisherSettings {
        format: Format::Json,
        debezium: None,
        max_in_flight,
        max_in_flight_bytes: 8 << 20,
        subject_prefix: "cdc".into(),
        id_namespace: NAMESPACE.into(),
        on_oversize: Default::default(),
    };
    let url = url.to_owned();
    let (d, s) = (durable.clone(), Arc::clone(&stats));
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = async_nats::connect(url).await.expect("connect to NATS");
            Publisher::new(client, settings, s, Shutdown::new())
                .deliver(consumer, d)
                .await
        })
    });
    Running {
        thread,
        durable,
        stats,
    }
}

fn cdc_config() -> Config {
    Config {
        name: "CDC".into(),
        subjects: vec!["cdc.>".into()],
        storage: StorageType::File,
        ..Default::default()
    }
}

fn create_stream(url: &str, config: Config) {
    with_nats(url, |client| async move {
        async_nats::jetstream::new(client)
            .create_stream(config)
            .await
            .expect("create stream");
    });
}

fn update_stream(url: &str, config: Config) {
    with_nats(url, |client| async move {
        async_nats::jetstream::new(client)
            .update_stream(config)
            .await
            .expect("update stream");
    });
}

/// The stream holds every change once, in commit order.
fn assert_stored_in_order(url: &str) {
    let ids: Vec<String> = read_stream(url, "CDC")
        .into_iter()
        .map(|m| m.msg_id.expect("Nats-Msg-Id"))
        .collect();
    assert_eq!(ids, expected_ids());
}

#[test]
fn without_a_stream_nothing_is_confirmed_until_the_stream_exists() {
    let nats = NatsServer::start();
    let url = nats.url();
    let running = start_publisher(&url, 16);
    // Every publish comes back as "no responders": nothing may count as stored.
    running.wait_until("refusals", |r| {
        r.stats.publish_errors.load(Ordering::Relaxed) >= 16
            && r.stats.stalled.load(Ordering::Relaxed)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(running.durable.get(), Lsn(0));
    assert_eq!(running.stats.published.load(Ordering::Relaxed), 0);
    assert!(running.stats.in_flight.load(Ordering::Relaxed) <= 16);

    create_stream(&url, cdc_config());
    let (durable, stats) = (running.durable.clone(), Arc::clone(&running.stats));
    running.join().expect("publisher");
    assert_eq!(durable.get(), end_lsn(TXNS - 1));
    assert!(!stats.stalled.load(Ordering::Relaxed));
    assert_eq!(
        stats.published.load(Ordering::Relaxed) + stats.duplicates.load(Ordering::Relaxed),
        TXNS * u64::from(PER_TXN)
    );
    assert_stored_in_order(&url);
}

#[test]
fn a_refusal_inside_the_window_holds_the_position_and_is_resent_in_order() {
    let nats = NatsServer::start();
    let url = nats.url();
    // A full stream that discards new messages refuses them with a JetStream error.
    let limited = Config {
        max_messages: 10,
        discard: DiscardPolicy::New,
        ..cdc_config()
    };
    create_stream(&url, limited);
    let running = start_publisher(&url, 16);
    running.wait_until("a refusal", |r| {
        r.stats.published.load(Ordering::Relaxed) == 10
            && r.stats.publish_errors.load(Ordering::Relaxed) > 0
            && r.stats.stalled.load(Ordering::Relaxed)
    });
    std::thread::sleep(Duration::from_millis(500));
    // Changes 0..10 are stored: transactions 0, 1 and 2 (changes 0..9) are complete, the
    // fourth is not.
    assert_eq!(running.durable.get(), end_lsn(2));
    assert_eq!(read_stream(&url, "CDC").len(), 10);
    // The window stopped taking changes at the refusal (changes taken before the refusal
    // arrived stay in it, refused in turn).
    let in_flight = running.stats.in_flight.load(Ordering::Relaxed);
    assert!((6..=16).contains(&in_flight), "{in_flight} in flight");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(running.stats.in_flight.load(Ordering::Relaxed), in_flight);

    update_stream(&url, cdc_config());
    let (durable, stats) = (running.durable.clone(), Arc::clone(&running.stats));
    running.join().expect("publisher");
    assert_eq!(durable.get(), end_lsn(TXNS - 1));
    assert_eq!(
        stats.published.load(Ordering::Relaxed),
        TXNS * u64::from(PER_TXN)
    );
    assert_stored_in_order(&url);
}

/// A message refused in the middle of the window while the ones behind it would be accepted
/// (here: one larger than the stream's `max_msg_size`, as a stream limit or a leader change can
/// refuse one message and not the next) must not let them be stored ahead of it: the server
/// refuses them too, because each expects its predecessor to be the stream's last message.
#[test]
fn a_message_refused_mid_window_is_not_overtaken_by_the_ones_behind_it() {
    let nats = NatsServer::start();
    let url = nats.url();
    let limited = Config {
        max_message_size: 2048,
        ..cdc_config()
    };
    create_stream(&url, limited);
    // Change 1 of transaction 5 is too large for the stream; everything else is small.
    let running = start_publisher_with(
        &url,
        64,
        |txn, seq| {
            if (txn, seq) == (5, 1) {
                4096
            } else {
                0
            }
        },
    );
    running.wait_until("the refusal", |r| {
        r.stats.publish_errors.load(Ordering::Relaxed) > 0
            && r.stats.stalled.load(Ordering::Relaxed)
    });
    std::thread::sleep(Duration::from_millis(500));
    // Only the changes before the refused one are stored, however many were sent behind it.
    let stored = read_stream(&url, "CDC");
    assert_eq!(
        stored.len(),
        5 * PER_TXN as usize + 1,
        "changes stored past the refused one"
    );
    assert_eq!(running.durable.get(), end_lsn(4));

    update_stream(&url, cdc_config());
    let (durable, stats) = (running.durable.clone(), Arc::clone(&running.stats));
    running.join().expect("publisher");
    assert_eq!(durable.get(), end_lsn(TXNS - 1));
    assert_eq!(
        stats.published.load(Ordering::Relaxed) + stats.duplicates.load(Ordering::Relaxed),
        TXNS * u64::from(PER_TXN)
    );
    assert_stored_in_order(&url);
}

/// Another writer storing into the same stream breaks the chain of expected ids now and then;
/// the publisher sends the refused message again at once and keeps its own messages in order.
#[test]
fn another_writer_in_the_stream_does_not_reorder_or_stall() {
    let nats = NatsServer::start();
    let url = nats.url();
    create_stream(&url, cdc_config());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (url, stop) = (url.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            with_nats(&url, |client| async move {
                let js = async_nats::jetstream::new(client);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 5_000 {
                    js.publish("cdc.other.insert", "x".into())
                        .await
                        .expect("publish")
                        .await
                        .expect("other writer's PubAck");
                    n += 1;
                }
                n
            })
        })
    };
    let running = start_publisher(&url, 64);
    let stats = Arc::clone(&running.stats);
    let durable = running.durable.clone();
    let result = running.join();
    stop.store(true, Ordering::Relaxed);
    let others = other.join().expect("other writer");
    result.expect("publisher");
    assert!(others > 0);
    assert_eq!(durable.get(), end_lsn(TXNS - 1));
    assert_eq!(
        stats.published.load(Ordering::Relaxed),
        TXNS * u64::from(PER_TXN)
    );
    let ours: Vec<String> = read_stream(&url, "CDC")
        .into_iter()
        .filter(|m| m.subject != "cdc.other.insert")
        .map(|m| m.msg_id.expect("Nats-Msg-Id"))
        .collect();
    assert_eq!(ours, expected_ids());
}
