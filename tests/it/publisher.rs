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
    expected_ids_of(TXNS)
}

/// [`expected_ids`] of `txns` transactions.
fn expected_ids_of(txns: u64) -> Vec<String> {
    (0..txns)
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
    start_publisher_of(url, TXNS, (max_in_flight, 8 << 20), false, pad)
}

/// As [`start_publisher_with`], with `txns` transactions, a window of `(messages, bytes)` and,
/// with `batch_publish`, backlogs sent as fast-ingest batches.
fn start_publisher_of(
    url: &str,
    txns: u64,
    (max_in_flight, max_in_flight_bytes): (usize, u64),
    batch_publish: bool,
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
        ring::channel((txns * (u64::from(PER_TXN) + 1) + 1) as usize, u64::MAX);
    for txn in 0..txns {
        for seq in 0..PER_TXN {
            assert!(producer
                .push(RingItem::change(change_sized(
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
        max_in_flight_bytes,
        subject_prefix: "cdc".into(),
        id_namespace: NAMESPACE.into(),
        on_oversize: Default::default(),
        batch_publish,
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

/// Publishes `txns` transactions into a stream made from `config` with `max_msg_size` 2 048,
/// change 1 of transaction `refused_txn` being 4 096 bytes: nothing behind it may be stored
/// before it, the position stops before its transaction, and once the limit is lifted
/// everything is stored once, in order. Returns the batches committed before the refusal.
fn run_with_one_refused(
    config: Config,
    txns: u64,
    window: usize,
    batch_publish: bool,
    refused_txn: u64,
) -> u64 {
    let nats = NatsServer::start();
    let url = nats.url();
    create_stream(
        &url,
        Config {
            max_message_size: 2048,
            ..config.clone()
        },
    );
    let running = start_publisher_of(&url, txns, (window, 8 << 20), batch_publish, |txn, seq| {
        if (txn, seq) == (refused_txn, 1) {
            4096
        } else {
            0
        }
    });
    running.wait_until("the refusal", |r| {
        r.stats.publish_errors.load(Ordering::Relaxed) > 0
            && r.stats.stalled.load(Ordering::Relaxed)
    });
    std::thread::sleep(Duration::from_millis(500));
    // Only the changes before the refused one are stored, however many were sent behind it.
    let stored = read_stream(&url, "CDC");
    assert_eq!(
        stored.len() as u64,
        refused_txn * u64::from(PER_TXN) + 1,
        "changes stored past the refused one"
    );
    assert_eq!(running.durable.get(), end_lsn(refused_txn - 1));
    let batches = running.stats.batches.load(Ordering::Relaxed);

    update_stream(&url, config);
    let (durable, stats) = (running.durable.clone(), Arc::clone(&running.stats));
    running.join().expect("publisher");
    assert_eq!(durable.get(), end_lsn(txns - 1));
    assert_eq!(
        stats.published.load(Ordering::Relaxed) + stats.duplicates.load(Ordering::Relaxed),
        txns * u64::from(PER_TXN)
    );
    assert_all_stored_in_order(&url, txns);
    batches
}

/// A message refused in the middle of the window while the ones behind it would be accepted
/// (here: one larger than the stream's `max_msg_size`, as a stream limit or a leader change can
/// refuse one message and not the next) must not let them be stored ahead of it: the server
/// refuses them too, because each expects its predecessor to be the stream's last message.
#[test]
fn a_message_refused_mid_window_is_not_overtaken_by_the_ones_behind_it() {
    // Change 1 of transaction 5 is too large for the stream; everything else is small.
    run_with_one_refused(cdc_config(), TXNS, 64, false, 5);
}

/// Runs a publisher over `txns` transactions with `batch_publish` while another writer stores
/// into the same stream, one message per `pause`, and checks that ours are all stored once, in
/// order, and the position reached the end. Returns the other writer's count and the stats.
fn run_beside_another_writer(
    config: Config,
    txns: u64,
    window: usize,
    batch_publish: bool,
    pause: Duration,
) -> (u64, Arc<PublisherStats>) {
    let nats = NatsServer::start();
    let url = nats.url();
    create_stream(&url, config);
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
                    tokio::time::sleep(pause).await;
                }
                n
            })
        })
    };
    let running = start_publisher_of(&url, txns, (window, 8 << 20), batch_publish, |_, _| 0);
    let (durable, stats) = (running.durable.clone(), Arc::clone(&running.stats));
    let result = running.join();
    stop.store(true, Ordering::Relaxed);
    let others = other.join().expect("other writer");
    result.expect("publisher");
    assert!(others > 0);
    assert_eq!(durable.get(), end_lsn(txns - 1));
    assert_eq!(
        stats.published.load(Ordering::Relaxed) + stats.duplicates.load(Ordering::Relaxed),
        txns * u64::from(PER_TXN)
    );
    assert_all_stored_in_order(&url, txns);
    (others, stats)
}

/// Another writer storing into the same stream breaks the chain of expected ids now and then;
/// the publisher sends the refused message again at once and keeps its own messages in order.
#[test]
fn another_writer_in_the_stream_does_not_reorder_or_stall() {
    let (_, stats) = run_beside_another_writer(cdc_config(), TXNS, 64, false, Duration::ZERO);
    // Nothing of ours was stored before: no duplicates.
    assert_eq!(
        stats.published.load(Ordering::Relaxed),
        TXNS * u64::from(PER_TXN)
    );
}

/// Transactions of the fast-ingest batch tests: a backlog long enough for several batches.
const BATCH_TXNS: u64 = 1_000;
/// Their window.
const BATCH_WINDOW: usize = 256;

/// The CDC stream, taking fast-ingest batches.
fn batch_config() -> Config {
    Config {
        allow_batch_publish: true,
        ..cdc_config()
    }
}

/// The stream holds every change of `txns` transactions once, in commit order.
fn assert_all_stored_in_order(url: &str, txns: u64) {
    let ids: Vec<String> = read_stream(url, "CDC")
        .into_iter()
        .filter(|m| m.subject != "cdc.other.insert")
        .map(|m| m.msg_id.expect("Nats-Msg-Id"))
        .collect();
    assert_eq!(ids.len() as u64, txns * u64::from(PER_TXN));
    assert!(ids == expected_ids_of(txns), "stored out of order");
}

/// A backlog goes in fast-ingest batches, acknowledged by flow acknowledgements and commits,
/// and every change is stored once, in order, with the position at the last commit.
#[test]
fn a_backlog_goes_in_batches_stored_once_in_order() {
    let nats = NatsServer::start();
    let url = nats.url();
    create_stream(&url, batch_config());
    let running = start_publisher_of(&url, BATCH_TXNS, (BATCH_WINDOW, 8 << 20), true, |_, _| 0);
    let (durable, stats) = (running.durable.clone(), Arc::clone(&running.stats));
    running.join().expect("publisher");
    assert_eq!(durable.get(), end_lsn(BATCH_TXNS - 1));
    assert_eq!(
        stats.published.load(Ordering::Relaxed),
        BATCH_TXNS * u64::from(PER_TXN)
    );
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0);
    assert_eq!(stats.publish_errors.load(Ordering::Relaxed), 0);
    let batches = stats.batches.load(Ordering::Relaxed);
    assert!(batches > 0, "no batch was committed");
    assert_all_stored_in_order(&url, BATCH_TXNS);
    eprintln!("{batches} batches");
}

/// A message refused inside a batch ends the batch there: nothing behind it is stored, the
/// position stops before it, and once the stream takes it everything follows in order.
#[test]
fn a_refusal_inside_a_batch_is_not_overtaken_and_is_resent_in_order() {
    // Deep in the backlog, well inside a batch.
    let batches = run_with_one_refused(batch_config(), BATCH_TXNS, BATCH_WINDOW, true, 600);
    assert!(batches > 0, "no batch before the refusal");
}

/// Another writer's messages between ours break a batch's chain of expected ids: the batch
/// ends at the refused message, which is sent again plainly, and our order holds.
#[test]
fn another_writer_inside_batches_does_not_reorder_or_stall() {
    let (others, stats) = run_beside_another_writer(
        batch_config(),
        BATCH_TXNS,
        BATCH_WINDOW,
        true,
        Duration::from_millis(2),
    );
    eprintln!(
        "{others} foreign messages; {} batches, {} publish errors",
        stats.batches.load(Ordering::Relaxed),
        stats.publish_errors.load(Ordering::Relaxed)
    );
}

/// A window filled by its byte budget before the server's next flow acknowledgement is due
/// (large changes): the batch is ended so its messages are acknowledged at once, instead of
/// waiting in vain until the ack timeout and being sent again.
#[test]
fn a_batch_is_ended_when_the_byte_budget_fills_the_window() {
    let nats = NatsServer::start();
    let url = nats.url();
    create_stream(&url, batch_config());
    // Small changes fill a batch (it starts at 64 in flight; the server acknowledges every 64
    // at most), then a run of 6 000-byte ones: five fill the 32 KB budget, with fewer than 64
    // of the batch's messages beyond its last flow acknowledgement.
    let txns = 400;
    let running = start_publisher_of(&url, txns, (BATCH_WINDOW, 32 << 10), true, |txn, _| {
        if (200..260).contains(&txn) {
            6_000
        } else {
            0
        }
    });
    let (durable, stats) = (running.durable.clone(), Arc::clone(&running.stats));
    let started = Instant::now();
    running.join().expect("publisher");
    assert_eq!(durable.get(), end_lsn(txns - 1));
    assert_eq!(
        stats.published.load(Ordering::Relaxed),
        txns * u64::from(PER_TXN)
    );
    assert!(stats.batches.load(Ordering::Relaxed) > 0);
    assert_eq!(
        stats.publish_errors.load(Ordering::Relaxed),
        0,
        "a batch waited for acknowledgements until the ack timeout ({:?})",
        started.elapsed()
    );
    assert_all_stored_in_order(&url, txns);
}

/// A stream that stopped allowing batches refuses the first batch message: the publisher sends
/// everything plainly from then on, stored once, in order.
#[test]
fn a_stream_refusing_batches_gets_plain_publishes() {
    let nats = NatsServer::start();
    let url = nats.url();
    create_stream(&url, cdc_config());
    let running = start_publisher_of(&url, BATCH_TXNS, (BATCH_WINDOW, 8 << 20), true, |_, _| 0);
    let (durable, stats) = (running.durable.clone(), Arc::clone(&running.stats));
    running.join().expect("publisher");
    assert_eq!(durable.get(), end_lsn(BATCH_TXNS - 1));
    assert_eq!(stats.batches.load(Ordering::Relaxed), 0);
    assert!(stats.publish_errors.load(Ordering::Relaxed) > 0);
    assert_eq!(
        stats.published.load(Ordering::Relaxed) + stats.duplicates.load(Ordering::Relaxed),
        BATCH_TXNS * u64::from(PER_TXN)
    );
    assert_all_stored_in_order(&url, BATCH_TXNS);
}
