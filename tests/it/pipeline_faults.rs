//! Fault tests (docs/protocol.md, "Ordering and exactly-once") with real servers: under continuous load the bridge is killed
//! with SIGKILL again and again, nats-server is stopped for 10 s, PostgreSQL is restarted, the
//! bridge is frozen until nats-server forgets its fast-ingest batch, and the bridge is stopped
//! with SIGTERM and started again. Each time the CDC stream is compared
//! with what PostgreSQL committed: every committed change is there, none is stored twice.
//!
//! Fault timing is random (xorshift seeded from the clock); the seed is printed, and
//! `FAULT_SEED=<seed>` repeats a run's timing.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgbridge::pg::conn::{ConnectionKind, PgConnection};
use pgbridge::pg::Lsn;
use rmpv::Value as Mp;
use testkit::{
    bridge_command, read_stream, setup_app_db, stream_len, wait_for, with_nats, BridgeProcess,
    NatsServer, PgServer, StopMode, StoredMessage, TempDir, TestEnv,
};

const SCHEMA: &str = "CREATE TABLE load (id bigint PRIMARY KEY, txn int, payload text)";

/// Most rows one load transaction inserts; it may also update one earlier row.
const MAX_INSERTS_PER_TXN: u64 = 5;
/// Most changes of one load transaction.
const MAX_CHANGES_PER_TXN: u64 = MAX_INSERTS_PER_TXN + 1;
/// The load generator stops by itself after this long or this many transactions.
const LOAD_MAX_TIME: Duration = Duration::from_secs(180);
const LOAD_MAX_TXNS: i64 = 200_000;
/// Bound of every wait for the bridge or the servers.
const WAIT: Duration = Duration::from_secs(60);
/// Log line of a publish that JetStream did not acknowledge (and that is retried).
const PUBLISH_RETRY: &str = "not acknowledged";
/// Warning of a fast-ingest batch that nats-server dropped before the bridge ended it.
const BATCH_FORGOTTEN: &str = "no longer knows this bridge's fast-ingest batch";
/// Start-up warning of a slot confirmed beyond the state file's durable position.
const SLOT_AHEAD: &str = "without being stored";

// ---------------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------------

/// xorshift64: enough to spread faults over random moments, no dependency needed.
struct Rng(u64);

impl Rng {
    /// Seeded from `FAULT_SEED`, else from the clock; the seed is printed.
    fn seeded(test: &str) -> Self {
        let seed = std::env::var("FAULT_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_else(|| {
                let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
                (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
            });
        eprintln!("{test}: FAULT_SEED={seed}");
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`, to the millisecond.
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

// ---------------------------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------------------------

/// What the load generator did.
#[derive(Debug, Default)]
struct LoadReport {
    /// Transactions sent.
    attempted: u64,
    /// Transactions whose COMMIT was answered.
    committed: u64,
    /// Transactions whose outcome is unknown (the connection broke); the table tells.
    unknown: u64,
    /// Connections opened.
    connects: u64,
}

/// A thread running short transactions on `load` until stopped (or its own bounds): each
/// inserts 1–5 rows with increasing ids (`payload = 'i{txn}'`), and one in three also updates
/// an earlier row (`txn = {txn}`, `payload || ';u{txn}'`), so each row's payload lists every
/// committed change of it. It reconnects, with a short pause, while PostgreSQL is down.
struct Load {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    handle: Option<JoinHandle<LoadReport>>,
}

impl Load {
    fn start(pg: &PgServer, seed: u64) -> Load {
        let params = pg.params("app");
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let (stop_flag, counter) = (Arc::clone(&stop), Arc::clone(&committed));
        let handle = std::thread::Builder::new()
            .name("load".into())
            .spawn(move || {
                let refs: Vec<(&str, &str)> =
                    params.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let mut rng = Rng(seed.max(1));
                let started = Instant::now();
                let mut report = LoadReport::default();
                let mut conn: Option<PgConnection> = None;
                let mut next_id: i64 = 1;
                let mut txn: i64 = 0;
                let mut inserted: Vec<i64> = Vec::new();
                while !stop_flag.load(Ordering::Relaxed)
                    && started.elapsed() < LOAD_MAX_TIME
                    && txn < LOAD_MAX_TXNS
                {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match PgConnection::connect(&refs, ConnectionKind::Normal) {
                            Ok(c) => {
                                report.connects += 1;
                                conn.insert(c)
                            }
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(100));
                                continue;
                            }
                        },
                    };
                    txn += 1;
                    let first = next_id;
                    let last = first + rng.below(MAX_INSERTS_PER_TXN) as i64;
                    next_id = last + 1;
                    let mut sql = format!(
                        "BEGIN; INSERT INTO load (id, txn, payload) \
                         SELECT g, {txn}, 'i{txn}' FROM generate_series({first}, {last}) g;"
                    );
                    if !inserted.is_empty() && rng.below(3) == 0 {
                        let back = rng.below(inserted.len().min(500) as u64) as usize;
                        let id = inserted[inserted.len() - 1 - back];
                        sql.push_str(&format!(
                            " UPDATE load SET txn = {txn}, payload = payload || ';u{txn}' \
                             WHERE id = {id};"
                        ));
                    }
                    sql.push_str(" COMMIT;");
                    report.attempted += 1;
                    match c.execute(&sql) {
                        Ok(()) => {
                            report.committed += 1;
                            counter.fetch_add(1, Ordering::Relaxed);
                            inserted.extend(first..=last);
                        }
                        Err(e) if e.is_connection_problem() => {
                            report.unknown += 1;
                            conn = None;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => panic!("load transaction {txn} failed: {e}"),
                    }
                    std::thread::sleep(Duration::from_millis(1 + rng.below(4)));
                }
                report
            })
            .expect("start the load thread");
        Load {
            stop,
            committed,
            handle: Some(handle),
        }
    }

    /// Waits (bounded) until `n` more transactions have committed.
    fn wait_commits(&self, n: u64) {
        let target = self.committed.load(Ordering::Relaxed) + n;
        wait_for(&format!("{n} more load transactions"), WAIT, || {
            (self.committed.load(Ordering::Relaxed) >= target).then_some(())
        });
    }

    /// Stops the thread and returns what it did.
    fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("load thread");
        handle.join().expect("load thread panicked")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ground truth and the stream
// ---------------------------------------------------------------------------------------------

/// One change: (row id, operation, transaction number of the load generator).
type ChangeKey = (i64, String, i64);

/// Every change PostgreSQL committed, with the payload the row had after it, from the table
/// itself: a transaction whose COMMIT outcome the load generator did not learn is there or not.
fn committed_changes(pg: &PgServer) -> HashMap<ChangeKey, String> {
    let rows = pg
        .sql("app", "SELECT id, txn, payload FROM load ORDER BY id")
        .rows;
    let mut out = HashMap::new();
    for r in rows {
        let field = |i: usize| r[i].as_deref().expect("no NULLs in load");
        let id: i64 = field(0).parse().unwrap();
        let txn: i64 = field(1).parse().unwrap();
        let payload = field(2);
        let mut last_txn = None;
        let mut end = 0;
        for (n, part) in payload.split(';').enumerate() {
            end += part.len() + usize::from(n > 0);
            let (op, t) = match part.split_at(1) {
                ("i", t) if n == 0 => ("INSERT", t),
                ("u", t) if n > 0 => ("UPDATE", t),
                _ => panic!("row {id}: unexpected payload {payload:?}"),
            };
            let t: i64 = t.parse().unwrap();
            out.insert((id, op.to_string(), t), payload[..end].to_string());
            last_txn = Some(t);
        }
        assert_eq!(
            last_txn,
            Some(txn),
            "row {id}: txn column and payload differ"
        );
    }
    out
}

/// A decoded change message of the CDC stream.
#[derive(Debug)]
struct Event {
    stream_seq: u64,
    msg_id: String,
    key: ChangeKey,
    payload: String,
    commit_lsn: Lsn,
    seq: u64,
    stored_at: SystemTime,
}

fn decode(m: &StoredMessage) -> Event {
    let v = rmpv::decode::read_value(&mut m.payload.as_slice()).expect("valid MessagePack");
    let map = v.as_map().expect("a map");
    let field = |k: &str| -> &Mp {
        &map.iter()
            .find(|(name, _)| name.as_str() == Some(k))
            .unwrap_or_else(|| panic!("message {} has no {k}", m.seq))
            .1
    };
    let mut columns: HashMap<&str, &Mp> = HashMap::new();
    for c in field("columns").as_array().expect("columns is an array") {
        let c = c.as_map().expect("column is a map");
        columns.insert(c[0].1.as_str().expect("column name"), &c[1].1);
    }
    let operation = field("operation").as_str().expect("operation").to_string();
    assert_eq!(
        m.subject,
        format!("cdc.load.{}", operation.to_lowercase()),
        "message {}",
        m.seq
    );
    Event {
        stream_seq: m.seq,
        msg_id: m.msg_id.clone().expect("Nats-Msg-Id header"),
        key: (
            columns["id"].as_i64().expect("id"),
            operation,
            columns["txn"].as_i64().expect("txn"),
        ),
        payload: columns["payload"].as_str().expect("payload").to_string(),
        commit_lsn: field("commit_lsn")
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("commit_lsn"),
        seq: field("seq").as_u64().expect("seq"),
        stored_at: m.stored_at,
    }
}

fn read_events(nats_url: &str) -> Vec<Event> {
    read_stream(nats_url, "CDC").iter().map(decode).collect()
}

/// Every committed change is in the stream, with the right values, and none is there twice
/// (by content and by `Nats-Msg-Id`).
fn assert_exactly_once(events: &[Event], committed: &HashMap<ChangeKey, String>) {
    let mut ids = HashSet::new();
    let mut seen: HashMap<&ChangeKey, Vec<u64>> = HashMap::new();
    for e in events {
        let (_, timeline, commit_lsn, seq) = testkit::split_msg_id(&e.msg_id);
        assert_eq!(
            (timeline, commit_lsn, u64::from(seq)),
            (1, e.commit_lsn, e.seq),
            "message {} {}",
            e.stream_seq,
            e.msg_id
        );
        assert!(
            ids.insert(e.msg_id.as_str()),
            "Nats-Msg-Id {} stored twice (again at {})",
            e.msg_id,
            e.stream_seq
        );
        match committed.get(&e.key) {
            Some(p) => assert_eq!(&e.payload, p, "message {} {:?}", e.stream_seq, e.key),
            None => panic!(
                "message {} {:?} is no committed change",
                e.stream_seq, e.key
            ),
        }
        seen.entry(&e.key).or_default().push(e.stream_seq);
    }
    let twice: Vec<_> = seen.iter().filter(|(_, s)| s.len() > 1).take(10).collect();
    assert!(twice.is_empty(), "changes stored twice: {twice:?}");
    let mut missing: Vec<&ChangeKey> = committed.keys().filter(|k| !seen.contains_key(k)).collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{} committed changes missing from the stream, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(events.len(), committed.len());
}

/// The stream is in commit order: (commit_lsn, seq) increases message by message.
fn assert_commit_order(events: &[Event]) {
    for w in events.windows(2) {
        assert!(
            (w[0].commit_lsn, w[0].seq) < (w[1].commit_lsn, w[1].seq),
            "out of commit order: message {} ({}) then {} ({})",
            w[0].stream_seq,
            w[0].msg_id,
            w[1].stream_seq,
            w[1].msg_id
        );
    }
}

/// The CDC stream holds every committed change once, in commit order; its events.
fn assert_stored_once_in_order(
    nats_url: &str,
    committed: &HashMap<ChangeKey, String>,
) -> Vec<Event> {
    let events = read_events(nats_url);
    assert_exactly_once(&events, committed);
    assert_commit_order(&events);
    events
}

fn lsn_query(pg: &PgServer, sql: &str) -> Option<Lsn> {
    pg.sql("app", sql).rows.first().and_then(|r| {
        r[0].as_deref()
            .map(|s| s.parse().expect("an LSN from PostgreSQL"))
    })
}

fn confirmed_flush(pg: &PgServer) -> Option<Lsn> {
    lsn_query(
        pg,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cdc_slot'",
    )
}

/// Waits until the slot confirms everything written so far: then every committed change is
/// stored in JetStream and the bridge has nothing left to publish.
fn wait_caught_up(pg: &PgServer, bridge: &BridgeProcess) -> Lsn {
    let target = lsn_query(pg, "SELECT pg_current_wal_lsn()::text").expect("current WAL");
    let deadline = Instant::now() + WAIT;
    loop {
        match confirmed_flush(pg) {
            Some(c) if c >= target => return c,
            c => assert!(
                Instant::now() < deadline,
                "the bridge did not catch up with {target} (slot at {c:?}):\n{}",
                bridge.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The durable position the next start resumes from: the later of the state file and the
/// slot (the bridge is not running).
fn resume_position(pg: &PgServer, state_dir: &Path) -> Lsn {
    let file = testkit::state_file_lsn(&state_dir.join("bridge.lsn"));
    let slot = confirmed_flush(pg).expect("the slot exists");
    file.unwrap_or(Lsn::INVALID).max(slot)
}

/// Stored messages of transactions committed at or after `from`: the next start sends them
/// again. The stream is in commit order, so they are at its end: read backwards from there.
fn stored_from(nats_url: &str, from: Lsn) -> u64 {
    with_nats(nats_url, |client| async move {
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("CDC").await.expect("stream CDC");
        let state = stream.info().await.expect("stream info").state.clone();
        let mut count = 0;
        for seq in (state.first_sequence..=state.last_sequence).rev() {
            if state.messages == 0 {
                break;
            }
            let m = stream.get_raw_message(seq).await.expect("stored message");
            let e = decode(&StoredMessage {
                seq: m.sequence,
                subject: m.subject.to_string(),
                msg_id: m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string()),
                last_in_tx_header: None,
                headers: Vec::new(),
                payload: m.payload.to_vec(),
                stored_at: SystemTime::now(),
            });
            if e.commit_lsn < from {
                break;
            }
            count += 1;
        }
        count
    })
}

/// A count (`name=`) of the summary line of a stopped bridge.
fn summary_count(bridge: &BridgeProcess, name: &str) -> u64 {
    let line = bridge.wait_for_line("stopped:", Duration::from_secs(5));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// `published` and `duplicates` of the summary line of a stopped bridge.
fn summary_counts(bridge: &BridgeProcess) -> (u64, u64) {
    (
        summary_count(bridge, "published="),
        summary_count(bridge, "duplicates="),
    )
}

/// The fast-ingest batches of the summary line of a stopped bridge.
fn summary_batches(bridge: &BridgeProcess) -> u64 {
    summary_count(bridge, "batches=")
}

fn assert_running(bridge: &mut BridgeProcess) {
    assert!(
        bridge.child.try_wait().unwrap().is_none(),
        "the bridge exited:\n{}",
        bridge.log()
    );
}

/// Stops the bridge with SIGTERM: exit 0 and a summary line.
fn stop_gracefully(bridge: &mut BridgeProcess) -> (u64, u64) {
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
    summary_counts(bridge)
}

fn wait_stream_len(nats_url: &str, at_least: u64) {
    wait_for(&format!("{at_least} messages in CDC"), WAIT, || {
        (stream_len(nats_url, "CDC") >= at_least).then_some(())
    });
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn kill_9_under_load_loses_nothing_and_stores_nothing_twice() {
    let started = Instant::now();
    let mut rng = Rng::seeded("kill_9");
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let spawn = || BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));

    let mut bridge = spawn();
    bridge.wait_for_line("streaming started", WAIT);
    let load = Load::start(&env.pg, rng.next());
    load.wait_commits(20);

    // At least five times while streaming (and once more in the middle of a start-up); more
    // while no kill has yet left stored messages behind the durable position (bounded), so
    // that the last start provably republishes some.
    let kill = |bridge: &mut BridgeProcess, what: &str| -> u64 {
        bridge.child.signal(libc::SIGKILL);
        assert_eq!(bridge.wait_exit(WAIT), None, "killed by SIGKILL");
        // The state file is written before the slot is confirmed: never behind it.
        assert!(!bridge.log().contains(SLOT_AHEAD), "{}", bridge.log());
        let resume = resume_position(&env.pg, dir.path());
        let replayed = stored_from(&url, resume);
        eprintln!(
            "kill_9: killed {what} at {:?}: resume from {resume}, {replayed} stored messages to \
             send again, {} in CDC",
            started.elapsed(),
            stream_len(&url, "CDC")
        );
        replayed
    };
    let mut kills = 0;
    let replayed = loop {
        std::thread::sleep(rng.between(Duration::from_millis(200), Duration::from_millis(2000)));
        assert_running(&mut bridge);
        kills += 1;
        let replayed = kill(&mut bridge, &format!("streaming ({kills})"));
        if (kills >= 5 && replayed > 0) || kills >= 15 {
            break replayed;
        }
        bridge = spawn();
        if kills == 1 {
            std::thread::sleep(rng.between(Duration::ZERO, Duration::from_millis(150)));
            kill(&mut bridge, "starting");
            bridge = spawn();
        }
        bridge.wait_for_line("streaming started", WAIT);
    };
    let report = load.stop();
    assert!(
        replayed > 0,
        "no kill left stored messages behind the durable position"
    );

    // The last start: everything arrives, and what was stored is acknowledged as duplicate.
    let mut bridge = spawn();
    bridge.wait_for_line("streaming started", WAIT);
    let committed = committed_changes(&env.pg);
    wait_caught_up(&env.pg, &bridge);
    let (published, duplicates) = stop_gracefully(&mut bridge);
    assert!(!bridge.log().contains(SLOT_AHEAD), "{}", bridge.log());
    if bridge.log().contains(PUBLISH_RETRY) {
        assert!(duplicates >= replayed, "{}", bridge.log());
    } else {
        assert_eq!(duplicates, replayed, "{}", bridge.log());
    }
    assert_stored_once_in_order(&url, &committed);
    eprintln!(
        "kill_9: {kills} kills while streaming, 1 in start-up; {report:?}; {} changes; last run published={published} duplicates={duplicates}; {:?}",
        committed.len(),
        started.elapsed()
    );
}

#[test]
fn nats_down_for_10s_under_load_loses_nothing_and_holds_the_slot() {
    let started = Instant::now();
    let mut rng = Rng::seeded("nats_down");
    // A short walsender timeout and a small ring: the ring fills soon after NATS goes, and a
    // wal thread that stopped talking to PostgreSQL while it waits would lose its connection.
    let nats = std::thread::spawn(NatsServer::start);
    let pg = PgServer::start_with(&[("wal_sender_timeout", "3s")]);
    let mut env = TestEnv {
        pg,
        nats: nats.join().expect("nats-server start failed"),
    };
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let mut bridge = BridgeProcess::spawn(bridge_command(&env.pg, &url, dir.path()).args([
        "--ring-capacity",
        "1024",
        "--standby-status-interval-secs",
        "1",
    ]));
    bridge.wait_for_line("streaming started", WAIT);
    let load = Load::start(&env.pg, rng.next());
    wait_stream_len(&url, 200);

    let port = env.nats.port();
    env.nats.stop();
    let outage = Instant::now();
    // The slot while nothing can be acknowledged: sampled from the start of the outage.
    let mut samples: Vec<(Duration, Lsn)> = Vec::new();
    while outage.elapsed() < Duration::from_secs(10) {
        samples.push((outage.elapsed(), confirmed_flush(&env.pg).expect("slot")));
        assert_running(&mut bridge);
        std::thread::sleep(Duration::from_millis(400));
    }
    let back = SystemTime::now();
    env.nats.start_again();
    assert_eq!(
        env.nats.port(),
        port,
        "nats-server restarted on another port"
    );
    bridge.wait_for_line("NATS connection re-established", WAIT);
    let after_outage = stream_len(&url, "CDC");
    wait_stream_len(&url, after_outage + 200);
    let report = load.stop();

    let committed = committed_changes(&env.pg);
    wait_caught_up(&env.pg, &bridge);
    assert_running(&mut bridge);
    let (published, duplicates) = stop_gracefully(&mut bridge);
    let log = bridge.log();
    // The backlog of the outage (more than a ring) went as fast-ingest batches, checked above
    // to be stored once, in order, with the slot held.
    let batches = summary_batches(&bridge);
    assert!(batches > 0, "no fast-ingest batch after the outage:\n{log}");
    assert_eq!(
        log.matches("streaming started").count(),
        1,
        "one start, no restart:\n{log}"
    );
    assert!(
        !log.contains("PostgreSQL unavailable"),
        "the replication connection broke while NATS was down:\n{log}\nPostgreSQL log:\n{}",
        env.pg.log()
    );
    let events = assert_stored_once_in_order(&url, &committed);

    // After a second without NATS the slot stands still ...
    let settled: Vec<&(Duration, Lsn)> = samples
        .iter()
        .filter(|(t, _)| *t >= Duration::from_secs(1))
        .collect();
    assert!(settled.len() >= 5, "{samples:?}");
    assert!(
        settled.iter().all(|(_, l)| *l == settled[0].1),
        "the slot advanced while NATS was down: {samples:?}"
    );
    // ... and never confirmed a transaction JetStream had not stored before the outage.
    let stored_before: Vec<&Event> = events.iter().filter(|e| e.stored_at < back).collect();
    let last_stored = stored_before
        .iter()
        .map(|e| e.commit_lsn)
        .max()
        .expect("messages stored before the outage");
    let first_unstored = events
        .iter()
        .filter(|e| e.stored_at >= back)
        .map(|e| e.commit_lsn)
        .min()
        .expect("messages stored after the outage");
    for (t, l) in &samples {
        assert!(
            *l <= first_unstored,
            "at {t:?} of the outage the slot confirmed {l}, past the commit at {first_unstored} \
             that JetStream stored only after the outage (last stored before: {last_stored})"
        );
    }
    eprintln!(
        "nats_down: slot held at {} (last commit stored before the outage at {last_stored}, first after at {first_unstored}); {report:?}; {} changes; published={published} duplicates={duplicates} batches={batches}; {:?}",
        settled[0].1,
        committed.len(),
        started.elapsed()
    );
}

/// Writes `txns` transactions of `rows` inserts each into `load`, as the load generator writes
/// them (`payload = 'i{txn}'`), a few hundred transactions per round trip.
fn write_backlog(pg: &PgServer, txns: i64, rows: i64) {
    let mut txn = 0;
    while txn < txns {
        let mut sql = String::new();
        for _ in 0..500.min(txns - txn) {
            txn += 1;
            let first = (txn - 1) * rows + 1;
            let last = txn * rows;
            sql.push_str(&format!(
                "BEGIN; INSERT INTO load (id, txn, payload) \
                 SELECT g, {txn}, 'i{txn}' FROM generate_series({first}, {last}) g; COMMIT; "
            ));
        }
        pg.sql("app", &sql);
    }
}

/// nats-server forgets a fast-ingest batch that gets no message for its batch timeout (10 s by
/// default, 1 s here). A bridge frozen (SIGSTOP) for longer than that while it drains a backlog
/// in batches wakes up sending into a batch the server no longer knows: JetStream refuses those
/// messages (`batch publish ID unknown`), and of the batch's messages stored before the freeze
/// some are never acknowledged. Nothing may be lost, stored twice or stored out of order, and
/// the bridge goes on without a restart.
#[test]
fn a_batch_nats_forgot_while_the_bridge_was_frozen_loses_nothing() {
    let started = Instant::now();
    let conf = TempDir::new("nats-conf");
    let conf_file = conf.path().join("batch-timeout.conf");
    std::fs::write(
        &conf_file,
        "jetstream {\n  limits {\n    batch {\n      timeout: \"1s\"\n    }\n  }\n}\n",
    )
    .expect("write the nats-server config");
    let env = TestEnv {
        pg: PgServer::start(),
        nats: NatsServer::start_with_args(&["-c", conf_file.to_str().expect("UTF-8 path")]),
    };
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    // The first run creates the slot; 100 000 changes in 5 000 transactions are written while
    // the bridge is stopped, and the second run drains them in batches.
    let mut first = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    first.wait_for_line("streaming started", WAIT);
    stop_gracefully(&mut first);
    write_backlog(&env.pg, 5_000, 20);
    let mut bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    wait_stream_len(&url, 10_000);
    // Frozen for three times the server's batch timeout while a batch is open. A backlog goes
    // in one batch after another, so a freeze lands in one unless it hits the moment between
    // two; then it is tried again.
    let mut frozen_at = Vec::new();
    while !bridge.log().contains(BATCH_FORGOTTEN) {
        let at = stream_len(&url, "CDC");
        assert!(
            frozen_at.len() < 3 && at < 90_000,
            "no freeze (at {frozen_at:?} of 100 000 changes) made the server forget a batch:\n{}",
            bridge.log()
        );
        frozen_at.push(at);
        bridge.child.signal(libc::SIGSTOP);
        std::thread::sleep(Duration::from_secs(3));
        bridge.child.signal(libc::SIGCONT);
        // The refusal of its next message comes within moments of waking.
        let woke = Instant::now();
        while !bridge.log().contains(BATCH_FORGOTTEN) && woke.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let committed = committed_changes(&env.pg);
    assert_eq!(committed.len(), 100_000);
    wait_caught_up(&env.pg, &bridge);
    assert_running(&mut bridge);
    let (published, duplicates) = stop_gracefully(&mut bridge);
    let log = bridge.log();
    assert_eq!(
        log.matches("streaming started").count(),
        1,
        "one start, no restart:\n{log}"
    );
    let batches = summary_batches(&bridge);
    assert_stored_once_in_order(&url, &committed);
    eprintln!(
        "forgotten batch: frozen at {frozen_at:?} of {} changes; published={published} duplicates={duplicates} batches={batches}; {:?}",
        committed.len(),
        started.elapsed()
    );
}

#[test]
fn postgres_fast_restart_under_load_loses_nothing() {
    let started = Instant::now();
    let mut rng = Rng::seeded("pg_restart");
    let mut env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let mut bridge = BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    bridge.wait_for_line("streaming started", WAIT);
    let load = Load::start(&env.pg, rng.next());
    wait_stream_len(&url, 1000);

    let port = env.pg.port();
    let stopping = Instant::now();
    env.pg.stop(StopMode::Fast);
    let stop_took = stopping.elapsed();
    std::thread::sleep(rng.between(Duration::from_millis(500), Duration::from_millis(2000)));
    env.pg.start_again();
    assert_eq!(
        env.pg.port(),
        port,
        "PostgreSQL restarted on another port: the bridge could not reconnect"
    );
    bridge.wait_for_line("PostgreSQL unavailable", WAIT);
    load.wait_commits(300);
    let report = load.stop();
    assert!(report.connects >= 2, "{report:?}");

    let committed = committed_changes(&env.pg);
    wait_caught_up(&env.pg, &bridge);
    assert_running(&mut bridge);
    let (published, duplicates) = stop_gracefully(&mut bridge);
    assert_stored_once_in_order(&url, &committed);
    eprintln!(
        "pg_restart: fast shutdown took {stop_took:?}; {report:?}; {} changes; published={published} duplicates={duplicates}; {:?}",
        committed.len(),
        started.elapsed()
    );
}

#[test]
fn sigterm_under_load_then_restart_republishes_only_the_unfinished_transaction() {
    let started = Instant::now();
    let mut rng = Rng::seeded("sigterm");
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let spawn = || BridgeProcess::spawn(&mut bridge_command(&env.pg, &url, dir.path()));
    let mut bridge = spawn();
    bridge.wait_for_line("streaming started", WAIT);
    let load = Load::start(&env.pg, rng.next());
    wait_stream_len(&url, 200);
    std::thread::sleep(rng.between(Duration::from_millis(200), Duration::from_millis(2000)));

    let (published_first, duplicates_first) = stop_gracefully(&mut bridge);
    // The final flush went out: the slot is where the state file is.
    let state: Lsn = testkit::state_file_lsn(&dir.path().join("bridge.lsn")).expect("a state file");
    assert_eq!(confirmed_flush(&env.pg), Some(state));
    // Stored but not durable: at most the changes of the transaction that was being read.
    let unfinished = stored_from(&url, state);
    assert!(
        unfinished <= MAX_CHANGES_PER_TXN,
        "{unfinished} stored messages beyond the final flush position {state}"
    );

    let mut bridge = spawn();
    bridge.wait_for_line("streaming started", WAIT);
    load.wait_commits(100);
    let report = load.stop();
    let committed = committed_changes(&env.pg);
    wait_caught_up(&env.pg, &bridge);
    let (published, duplicates) = stop_gracefully(&mut bridge);
    if bridge.log().contains(PUBLISH_RETRY) {
        assert!(duplicates >= unfinished, "{}", bridge.log());
    } else {
        assert_eq!(
            duplicates,
            unfinished,
            "the restart republished what was already acknowledged:\n{}",
            bridge.log()
        );
    }
    assert_stored_once_in_order(&url, &committed);
    eprintln!(
        "sigterm: first run published={published_first} duplicates={duplicates_first}, {unfinished} unfinished; restart published={published} duplicates={duplicates}; {report:?}; {} changes; {:?}",
        committed.len(),
        started.elapsed()
    );
}
