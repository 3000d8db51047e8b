//! Chaos: a continuous mixed workload through many faults, proven exact.
//!
//! The mirror oracle's random workload (four tables, one outside `public`, TOAST values, key
//! changes, multi-row inserts, deletes, savepoint and transaction rollbacks, transactions large
//! enough that PostgreSQL streams them before their commit, one TRUNCATE) runs without pause,
//! together with bulk `INSERT ... SELECT` statements of thousands of rows in one statement
//! (hundreds of kB, far beyond the test servers' 64 kB `logical_decoding_work_mem`, so they
//! are streamed too). Meanwhile, at random moments drawn from the seed: kill -9 of the bridge
//! (restarted at once), nats-server restarts on the same port and store, PostgreSQL restarts
//! (fast and immediate, i.e. a crash), and kill -9 of `bridge mirror` (restarted at once).
//! The writer survives PostgreSQL going away: it reconnects and carries on, and a transaction
//! whose outcome it could not see (the server went away during it, possibly during COMMIT)
//! is resolved by asking PostgreSQL (`txid_status` of its transaction id), never guessed; an
//! id PostgreSQL calls "in the future" after a crash never reached the WAL, so that
//! transaction did not commit (and the id is handed out again). Half of the writer's pacing
//! pauses fall inside an open transaction, so faults meet such transactions.
//!
//! Then, with the workload stopped and everything caught up:
//! (a) exactly once: the oracle is a second logical replication slot (`oracle`, pgoutput),
//!     created right after the bridge's own slot and before any write, and read at the end
//!     with `pg_logical_slot_get_binary_changes` (protocol 1: whole committed transactions
//!     only, decoded by the project's own `pgbridge::pg::pgoutput`). PostgreSQL's decoding is
//!     the ground truth of what committed in the publication: each Insert, Update, Delete
//!     and each table of a Truncate is one change, numbered from 0 in its transaction as the
//!     bridge numbers them, and keyed by its transaction's commit LSN. The `(commit_lsn, seq)`
//!     in the message id of every message in `CDC` must form exactly that set, each once;
//!     the payload's `commit_lsn`/`seq` agree with the id, and `last_in_tx` is set on each
//!     transaction's last change only. The writer's transaction ids cross-check the oracle:
//!     every transaction in it is one the writer saw (or resolved) as committed, none that
//!     it rolled back or resolved as aborted, and every committed one that changed rows.
//! (b) commit order: `(commit_lsn, seq)` strictly increases along the stream.
//! (c) the mirror, run all along, restarted when killed and finally caught up, equals the
//!     source row for row through the oracle's canonical comparison.
//!
//! Knobs (environment): `CHAOS_SEED`, `CHAOS_BRIDGE_KILLS` (5), `CHAOS_NATS_RESTARTS` (1),
//! `CHAOS_PG_RESTARTS` (1; the first fast, the second immediate, then alternating; a single
//! one is either, by the seed), `CHAOS_MIRROR_KILLS` (2), `CHAOS_SECS` (workload duration,
//! 60), `CHAOS_RATE` (row changes per second at most, 1000). `scripts/chaos.sh` runs the full
//! form. One summary line `chaos: seed=… …` is printed at the end.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{Read, Write as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pgbridge::pg::conn::{ConnectionKind, PgConnection, PgError};
use pgbridge::pg::pgoutput::LogicalMessage;
use pgbridge::pg::Lsn;
use testkit::oracle::*;
use testkit::{
    bridge_command, free_port, setup_app_db, wait_for, BridgeProcess, PgServer, StopMode, TempDir,
    TestEnv,
};

/// The oracle's own slot.
const ORACLE_SLOT: &str = "oracle";
/// How long the writer keeps trying to reach PostgreSQL before it gives up.
const RECONNECT_LIMIT: Duration = Duration::from_secs(120);
/// Rows of one bulk `INSERT ... SELECT`.
const BULK_ROWS: i64 = 3_000;
/// First event id of the bulk inserts (clear of the workload's own fresh ids).
const BULK_EVENT: i64 = 50_000_000;

fn knob(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillBridge,
    RestartNats,
    RestartPg(StopMode),
    KillMirror,
}

/// Outcome counts of the writer, and the transaction ids it knows the fate of.
#[derive(Default)]
struct ChaosReport {
    transactions: u64,
    changes: u64,
    rolled_back: u64,
    failed: u64,
    resolved_committed: u64,
    resolved_aborted: u64,
    reconnects: u64,
    bulk: u64,
    truncated: bool,
    /// Committed transactions: xid (low 32 bits, as pgoutput sends it) → changed rows
    /// (`None` when unknown).
    committed: HashMap<u32, Option<u64>>,
    /// Transactions that did not commit (rolled back, or resolved as aborted).
    aborted: HashSet<u32>,
}

/// Whether a failed statement is PostgreSQL going away (the writer then resolves the
/// transaction and reconnects) rather than a defect of the workload.
fn gone(e: &PgError) -> bool {
    e.is_connection_problem()
}

fn connect(params: &[(&'static str, String)], report: &mut ChaosReport) -> PgConnection {
    let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let started = Instant::now();
    loop {
        match PgConnection::connect(&refs, ConnectionKind::Normal) {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    started.elapsed() < RECONNECT_LIMIT,
                    "the writer could not reach PostgreSQL for {RECONNECT_LIMIT:?}: {e}"
                );
                report.reconnects += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// What PostgreSQL says became of a transaction cut off by a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Committed,
    Aborted,
    /// Its id never reached the WAL before a crash, as a commit record would have: it did not
    /// commit, and PostgreSQL hands the same id out again.
    Forgotten,
}

/// What PostgreSQL says became of transaction `xid` (`txid_status`).
fn resolve(params: &[(&'static str, String)], xid: u64, report: &mut ChaosReport) -> Outcome {
    let started = Instant::now();
    loop {
        let mut conn = connect(params, report);
        match conn.query(&format!("SELECT txid_status({xid})")) {
            Ok(r) => match r.rows[0][0].as_deref() {
                Some("committed") => return Outcome::Committed,
                Some("aborted") => return Outcome::Aborted,
                other => {
                    // Still "in progress" while its backend ends.
                    assert!(
                        started.elapsed() < RECONNECT_LIMIT,
                        "transaction {xid} stays {other:?}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            },
            Err(e) if gone(&e) => std::thread::sleep(Duration::from_millis(200)),
            // After a crash: "transaction ID … is in the future".
            Err(e) if e.sqlstate() == Some("22023") && e.to_string().contains("in the future") => {
                return Outcome::Forgotten
            }
            Err(e) => panic!("txid_status({xid}): {e}"),
        }
    }
}

/// Runs one transaction; `Ok(Some(n))`: committed with n row changes, `Ok(None)`: rolled
/// back; `Err((xid, e))`: PostgreSQL went away (xid when one was assigned).
fn try_transaction(
    conn: &mut PgConnection,
    statements: &[String],
    xid: &mut Option<u64>,
    pause: Duration,
) -> Result<Option<u64>, PgError> {
    conn.execute("BEGIN")?;
    let r = conn.query("SELECT txid_current()")?;
    *xid = r.rows[0][0].as_deref().and_then(|s| s.parse().ok());
    let mut n = 0;
    let mut at_savepoint = 0;
    for sql in statements {
        match sql.as_str() {
            ROLLBACK => {
                conn.execute(ROLLBACK)?;
                return Ok(None);
            }
            SAVEPOINT => {
                conn.execute(SAVEPOINT)?;
                at_savepoint = n;
            }
            ROLLBACK_TO_SAVEPOINT => {
                conn.execute(ROLLBACK_TO_SAVEPOINT)?;
                n = at_savepoint;
            }
            _ if sql.starts_with("TRUNCATE") => {
                conn.execute(sql)?;
                n += 1;
            }
            _ => n += conn.query(sql)?.rows.len() as u64,
        }
    }
    // The writer's pacing pause, here while the transaction is open, so a fault often
    // meets a transaction that has a transaction id and changes but no COMMIT yet.
    std::thread::sleep(pause);
    conn.execute("COMMIT")?;
    Ok(Some(n))
}

/// The chaos writer: the oracle's workload plus bulk inserts, without pause, through
/// PostgreSQL restarts.
struct ChaosWriter {
    handle: JoinHandle<ChaosReport>,
    stop: Arc<AtomicBool>,
    changes: Arc<AtomicU64>,
}

impl ChaosWriter {
    fn start(pg: &PgServer, seed: u64, duration: Duration, rate: u64) -> Self {
        let params = pg.params("app");
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, changes) = (Arc::clone(&stop), Arc::clone(&changes));
            std::thread::spawn(move || {
                let mut report = ChaosReport::default();
                let mut w = Workload::new(seed);
                let mut bulk_rng = Rng::new(seed ^ 0x5eed_b01c);
                let mut next_bulk = BULK_EVENT;
                let mut conn = Some(connect(&params, &mut report));
                let started = Instant::now();
                let limit = duration + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                    let statements = if !w.truncated && started.elapsed() >= duration / 2 {
                        w.truncated = true;
                        w.truncate()
                    } else if bulk_rng.chance(1) {
                        report.bulk += 1;
                        let lo = next_bulk;
                        next_bulk += BULK_ROWS;
                        let mut v = vec![format!(
                            "INSERT INTO events SELECT g, (g % 32000)::smallint, g / 7.0::real, \
                               date '2001-01-01' + (g % 9000)::int, 'bulk ' || g || repeat('.', 20), \
                               ARRAY[g % 2 = 0, NULL], ARRAY[g / 8.0, -g]::float8[] \
                             FROM generate_series({lo}, {}) g RETURNING 1",
                            lo + BULK_ROWS - 1
                        )];
                        v.push(w.statement());
                        if bulk_rng.chance(20) {
                            v.push(ROLLBACK.into());
                        }
                        v
                    } else {
                        w.transaction()
                    };
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => conn.insert(connect(&params, &mut report)),
                    };
                    // Pace: at most `rate` changes per second; half the pauses are taken
                    // inside the transaction.
                    let due = Duration::from_millis(changes.load(Ordering::Relaxed) * 1000 / rate);
                    let pause = due
                        .saturating_sub(started.elapsed())
                        .min(Duration::from_secs(1));
                    let inside = bulk_rng.chance(50);
                    if !inside {
                        std::thread::sleep(pause);
                    }
                    let pause = if inside { pause } else { Duration::ZERO };
                    let mut xid = None;
                    match try_transaction(c, &statements, &mut xid, pause) {
                        Ok(Some(n)) => {
                            report.transactions += 1;
                            report.changes += n;
                            if statements.iter().any(|s| s.starts_with("TRUNCATE")) {
                                report.truncated = true;
                            }
                            let xid = xid.unwrap() as u32;
                            report.committed.insert(xid, Some(n));
                            // An id forgotten in a crash comes again.
                            report.aborted.remove(&xid);
                            changes.fetch_add(n, Ordering::Relaxed);
                        }
                        Ok(None) => {
                            report.rolled_back += 1;
                            report.aborted.insert(xid.unwrap() as u32);
                        }
                        Err(e) if gone(&e) => {
                            conn = None;
                            report.failed += 1;
                            // Not assigned: the transaction never got as far as a change.
                            if let Some(xid) = xid {
                                match resolve(&params, xid, &mut report) {
                                    Outcome::Committed => {
                                        report.resolved_committed += 1;
                                        report.transactions += 1;
                                        report.committed.insert(xid as u32, None);
                                    }
                                    Outcome::Aborted => {
                                        report.resolved_aborted += 1;
                                        report.aborted.insert(xid as u32);
                                    }
                                    Outcome::Forgotten => report.resolved_aborted += 1,
                                }
                            }
                        }
                        Err(e) => {
                            panic!("writer statement failed: {e}\n{statements:?}\n(seed {seed})")
                        }
                    }
                }
                report
            })
        };
        ChaosWriter {
            handle,
            stop,
            changes,
        }
    }

    fn finish(self) -> ChaosReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("the chaos writer panicked")
    }
}

/// The bridge for the chaos run: its HTTP port is known, for the duplicate counter.
fn chaos_bridge(env: &TestEnv, dir: &Path, port: u16) -> BridgeProcess {
    BridgeProcess::spawn(
        bridge_command(&env.pg, &env.nats.url(), dir)
            .env("BRIDGE_PORT", port.to_string())
            .args(["--snapshot-chunk-rows", "64"]),
    )
}

fn chaos_mirror(url: &str, db: &Path, dir: &Path) -> BridgeProcess {
    BridgeProcess::spawn(&mut mirror_command(
        url,
        db,
        dir,
        Some(TABLES),
        &["--snapshot-stall-secs", "10"],
    ))
}

/// `bridge_cdc_events_duplicate_total` of the bridge listening on `port`, if it answers.
fn duplicates(port: u16) -> Option<u64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("bridge_cdc_events_duplicate_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Every committed change in the publication, from the oracle slot: (commit_lsn, seq) →
/// whether it is its transaction's last change; and the transaction ids.
fn oracle_changes(pg: &PgServer) -> (BTreeMap<(Lsn, u32), bool>, HashMap<u32, Lsn>) {
    let mut changes = BTreeMap::new();
    let mut xids = HashMap::new();
    let mut conn = pg.connect("app");
    let mut current: Option<(Lsn, u32)> = None;
    let mut last: Option<(Lsn, u32)> = None;
    for _ in 0..100_000 {
        let r = conn
            .query(&format!(
                "SELECT data FROM pg_logical_slot_get_binary_changes('{ORACLE_SLOT}', NULL, 2000, \
                 'proto_version', '1', 'publication_names', 'cdc_pub')"
            ))
            .expect("read the oracle slot");
        if r.rows.is_empty() {
            return (changes, xids);
        }
        for row in &r.rows {
            let hex = row[0].as_deref().expect("data");
            let bytes = decode_hex(hex.strip_prefix("\\x").expect("bytea hex"));
            let msg = LogicalMessage::parse(&bytes, false)
                .unwrap_or_else(|e| panic!("the oracle slot sent undecodable pgoutput: {e}"));
            match msg {
                LogicalMessage::Begin(b) => {
                    current = Some((b.final_lsn, 0));
                    xids.insert(b.xid, b.final_lsn);
                }
                LogicalMessage::Commit(_) => {
                    if let Some(k) = last.take() {
                        changes.insert(k, true);
                    }
                    current = None;
                }
                LogicalMessage::Insert(_)
                | LogicalMessage::Update(_)
                | LogicalMessage::Delete(_)
                | LogicalMessage::Truncate(_) => {
                    let n = match &msg {
                        LogicalMessage::Truncate(t) => t.relids.len(),
                        _ => 1,
                    };
                    let (lsn, seq) = current.as_mut().expect("a change outside a transaction");
                    for _ in 0..n {
                        assert!(
                            changes.insert((*lsn, *seq), false).is_none(),
                            "the oracle numbered a change twice"
                        );
                        last = Some((*lsn, *seq));
                        *seq += 1;
                    }
                }
                _ => {}
            }
        }
    }
    panic!("the oracle slot did not run dry");
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// `commit_lsn`, `seq` and `last_in_tx` of a MessagePack or JSON change payload.
fn payload_fields(payload: &[u8]) -> (String, u64, bool) {
    if payload.first() == Some(&b'{') {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("a JSON payload");
        return (
            v["commit_lsn"].as_str().expect("commit_lsn").to_string(),
            v["seq"].as_u64().expect("seq"),
            v["last_in_tx"].as_bool().expect("last_in_tx"),
        );
    }
    let v = rmpv::decode::read_value(&mut &payload[..]).expect("a MessagePack payload");
    let field = |name: &str| -> &rmpv::Value {
        v.as_map()
            .expect("a MessagePack map")
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("payload without {name}"))
    };
    (
        field("commit_lsn")
            .as_str()
            .expect("commit_lsn")
            .to_string(),
        field("seq").as_u64().expect("seq"),
        field("last_in_tx").as_bool().expect("last_in_tx"),
    )
}

/// Prints the seed when the test fails, whatever fails.
struct SeedOnFailure(u64);

impl Drop for SeedOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "chaos: FAILED with seed {0} (rerun with CHAOS_SEED={0})",
                self.0
            );
        }
    }
}

#[test]
fn chaos_changes_are_stored_exactly_once_in_commit_order_and_mirrored() {
    let _heavy = testkit::heavy();
    let started = Instant::now();
    let seed = knob(
        "CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    let bridge_kills = knob("CHAOS_BRIDGE_KILLS", 5);
    let nats_restarts = knob("CHAOS_NATS_RESTARTS", 1);
    let pg_restarts = knob("CHAOS_PG_RESTARTS", 1);
    let mirror_kills = knob("CHAOS_MIRROR_KILLS", 2);
    let duration = Duration::from_secs(knob("CHAOS_SECS", 60));
    let rate = knob("CHAOS_RATE", 1_000).max(1);
    eprintln!(
        "chaos: seed {seed} (CHAOS_SEED={seed} repeats the run): {bridge_kills} bridge kills, \
         {nats_restarts} NATS restarts, {pg_restarts} PostgreSQL restarts, {mirror_kills} \
         mirror kills in {duration:?}"
    );
    let _report_seed = SeedOnFailure(seed);

    // The fault schedule: random moments in the middle 80% of the workload.
    let mut rng = Rng::new(seed ^ 0x00c4_a05c_4a05);
    let first_pg = if pg_restarts == 1 && rng.chance(50) {
        1
    } else {
        0
    };
    let mut faults: Vec<(Duration, Fault)> = Vec::new();
    let at = |rng: &mut Rng| {
        let ms = duration.as_millis() as i64;
        Duration::from_millis(rng.range(ms / 10, ms * 9 / 10) as u64)
    };
    for _ in 0..bridge_kills {
        faults.push((at(&mut rng), Fault::KillBridge));
    }
    for _ in 0..nats_restarts {
        faults.push((at(&mut rng), Fault::RestartNats));
    }
    for i in 0..pg_restarts {
        let mode = if (i + first_pg) % 2 == 0 {
            StopMode::Fast
        } else {
            StopMode::Immediate
        };
        faults.push((at(&mut rng), Fault::RestartPg(mode)));
    }
    for _ in 0..mirror_kills {
        faults.push((at(&mut rng), Fault::KillMirror));
    }
    faults.sort_by_key(|(t, _)| *t);

    let mut env = TestEnv::start();
    setup_app_db(&env.pg, &format!("{SCHEMA} {}", seed_sql()), "");
    grant_sales(&env.pg);
    let dir = TempDir::new("chaos");
    let url = env.nats.url();
    let db = dir.path().join("mirror.sqlite");
    let port = free_port();
    let mut bridge = chaos_bridge(&env, dir.path(), port);
    bridge.wait_for_line("snapshot requests served", Duration::from_secs(60));
    // The oracle's slot: made after the bridge's, before any write, so both see the same
    // committed transactions.
    env.pg.sql(
        "app",
        &format!("SELECT pg_create_logical_replication_slot('{ORACLE_SLOT}', 'pgoutput')"),
    );

    let writer = ChaosWriter::start(&env.pg, seed, duration, rate);
    wait_for(
        "the writer's first changes",
        Duration::from_secs(60),
        || (writer.changes.load(Ordering::Relaxed) >= 500).then_some(()),
    );
    let mut mirror = chaos_mirror(&url, &db, dir.path());
    let tokens: Vec<&str> = tables().iter().map(|t| t.token).collect();
    wait_for("the mirror to bootstrap", STEP_TIMEOUT, || {
        bootstrapped(&db, &tokens).then_some(())
    });
    eprintln!(
        "chaos: mirror bootstrapped after {} changes; faults begin",
        writer.changes.load(Ordering::Relaxed)
    );

    let mut logs = String::new();
    let (mut done_bridge, mut done_nats, mut done_pg, mut done_mirror) = (0, 0, 0, 0);
    let (mut bridge_exits, mut mirror_exits) = (0, 0);
    let mut dups = 0u64;
    let mut last_dups = 0u64;
    let clock = Instant::now();
    let mut pending = faults.into_iter().peekable();
    while clock.elapsed() < duration || pending.peek().is_some() {
        assert!(
            clock.elapsed() < duration + Duration::from_secs(300),
            "the fault schedule overran"
        );
        if let Some(d) = duplicates(port) {
            last_dups = d;
        }
        // A process that ends on its own is a finding: keep its log, restart it.
        if let Some(status) = bridge.child.try_wait().unwrap() {
            bridge_exits += 1;
            eprintln!(
                "chaos: the bridge exited on its own ({status}); log tail:\n{}",
                tail(&bridge.log(), 30)
            );
            logs.push_str(&bridge.log());
            dups += last_dups;
            last_dups = 0;
            bridge = chaos_bridge(&env, dir.path(), port);
        }
        if let Some(status) = mirror.child.try_wait().unwrap() {
            mirror_exits += 1;
            eprintln!(
                "chaos: the mirror exited on its own ({status}); log tail:\n{}",
                tail(&mirror.log(), 30)
            );
            mirror = chaos_mirror(&url, &db, dir.path());
        }
        let Some((when, _)) = pending.peek() else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        if clock.elapsed() < *when {
            std::thread::sleep((*when - clock.elapsed()).min(Duration::from_millis(200)));
            continue;
        }
        let (_, fault) = pending.next().unwrap();
        let t = clock.elapsed().as_secs_f64();
        match fault {
            Fault::KillBridge => {
                if let Some(d) = duplicates(port) {
                    last_dups = d;
                }
                kill_9(&mut bridge);
                logs.push_str(&bridge.log());
                dups += last_dups;
                last_dups = 0;
                bridge = chaos_bridge(&env, dir.path(), port);
                done_bridge += 1;
                eprintln!("chaos: {t:.1}s kill -9 of the bridge #{done_bridge}");
            }
            Fault::RestartNats => {
                env.nats.stop();
                let pause = rng.range(500, 4000) as u64;
                std::thread::sleep(Duration::from_millis(pause));
                env.nats.start_again();
                done_nats += 1;
                eprintln!("chaos: {t:.1}s nats-server restart #{done_nats} ({pause} ms down)");
            }
            Fault::RestartPg(mode) => {
                env.pg.stop(mode);
                let pause = rng.range(500, 3000) as u64;
                std::thread::sleep(Duration::from_millis(pause));
                env.pg.start_again();
                done_pg += 1;
                eprintln!(
                    "chaos: {t:.1}s PostgreSQL restart #{done_pg} ({mode:?}, {pause} ms down)"
                );
            }
            Fault::KillMirror => {
                kill_9(&mut mirror);
                mirror = chaos_mirror(&url, &db, dir.path());
                done_mirror += 1;
                eprintln!("chaos: {t:.1}s kill -9 of the mirror #{done_mirror}");
            }
        }
    }
    let mut report = writer.finish();
    eprintln!(
        "chaos: writer: {} committed transactions ({} changes, {} bulk), {} rolled back, {} cut \
         off by a fault (resolved: {} committed, {} aborted), {} reconnect attempts",
        report.transactions,
        report.changes,
        report.bulk,
        report.rolled_back,
        report.failed,
        report.resolved_committed,
        report.resolved_aborted,
        report.reconnects
    );
    assert!(report.truncated, "the workload truncated a table");
    // A last transaction of a mirrored table, so the stream ends with a change the mirror
    // receives (its catch-up check compares stream sequences).
    let last = env.pg.sql(
        "app",
        &format!(
            "INSERT INTO events (id, label) VALUES ({}, 'last'); SELECT txid_current()",
            BULK_EVENT - 1
        ),
    );
    let last_xid: u64 = last.rows[0][0].as_deref().unwrap().parse().unwrap();
    report.committed.insert(last_xid as u32, Some(1));

    // Catch up: the bridge confirms everything, the mirror has applied everything.
    wait_mirror_caught_up(&env.pg, &url, &durable(&db));
    if let Some(d) = duplicates(port) {
        last_dups = d;
    }
    dups += last_dups;
    logs.push_str(&bridge.log());

    // (a) and (b): the stream against the oracle slot.
    let (expected, oracle_xids) = oracle_changes(&env.pg);
    let stored = testkit::read_stream(&url, "CDC");
    let mut seen: BTreeSet<(Lsn, u32)> = BTreeSet::new();
    let mut prev: Option<(Lsn, u32)> = None;
    let mut stream_dups = Vec::new();
    for m in &stored {
        let id = m.msg_id.as_deref().expect("a message id");
        let (_, _, lsn, seq) = testkit::split_msg_id(id);
        let key = (lsn, seq);
        if let Some(p) = prev {
            assert!(
                key > p,
                "stream order is not commit order: #{} {id} after {p:?} (seed {seed})",
                m.seq
            );
        }
        prev = Some(key);
        if !seen.insert(key) {
            stream_dups.push(id.to_string());
        }
        let (commit_lsn, pseq, last) = payload_fields(&m.payload);
        assert_eq!(
            (commit_lsn.as_str(), pseq),
            (lsn.to_string().as_str(), u64::from(seq)),
            "message #{} {id}: payload disagrees with its id",
            m.seq
        );
        if let Some(&want) = expected.get(&key) {
            assert_eq!(
                last, want,
                "message #{} {id}: last_in_tx is {last}, the oracle says {want}",
                m.seq
            );
        }
    }
    assert!(
        stream_dups.is_empty(),
        "changes stored more than once (seed {seed}): {:?}",
        &stream_dups[..stream_dups.len().min(10)]
    );
    let want: BTreeSet<(Lsn, u32)> = expected.keys().copied().collect();
    if seen != want {
        let missing: Vec<_> = want.difference(&seen).take(10).collect();
        let extra: Vec<_> = seen.difference(&want).take(10).collect();
        panic!(
            "the stream's changes differ from the committed ones (seed {seed}): {} stored, {} \
             committed; first missing {missing:?}; first extra {extra:?}\nbridge logs (tail):\n{}",
            seen.len(),
            want.len(),
            tail(&logs, 60)
        );
    }
    // The writer's view of its transactions agrees with the oracle's.
    for (xid, lsn) in &oracle_xids {
        assert!(
            report.committed.contains_key(xid),
            "transaction {xid} (commit {lsn}) is in the oracle, the writer did not see it commit"
        );
        assert!(
            !report.aborted.contains(xid),
            "transaction {xid} rolled back but is in the oracle"
        );
    }
    for (xid, n) in &report.committed {
        if n.is_some_and(|n| n > 0) {
            assert!(
                oracle_xids.contains_key(xid),
                "committed transaction {xid} with {n:?} changes is not in the oracle"
            );
        }
    }

    // When the writer knows the row count of every committed transaction, it is the
    // oracle's change count.
    if report.committed.values().all(Option::is_some) {
        let written: u64 = report.committed.values().map(|n| n.unwrap_or(0)).sum();
        assert_eq!(
            written,
            expected.len() as u64,
            "the writer changed {written} rows in committed transactions, the oracle has {} \
             changes (seed {seed})",
            expected.len()
        );
    }

    // (c) the mirror.
    let counts = compare_all(&env.pg, &db, &tables()).unwrap_or_else(|r| {
        panic!(
            "the mirror differs from the source (seed {seed}):\n{r}\nmirror log (tail):\n{}",
            tail(&mirror.log(), 60)
        )
    });
    assert!(
        counts.iter().all(|(_, n)| *n > 0),
        "empty tables: {counts:?}"
    );
    let rows: usize = counts.iter().map(|(_, n)| n).sum();
    assert_eq!(mirror.terminate(Duration::from_secs(30)), Some(0));
    assert_eq!(bridge_exits, 0, "the bridge exited on its own");
    assert_eq!(mirror_exits, 0, "the mirror exited on its own");
    drop(bridge);

    println!(
        "chaos: seed={seed} changes={} transactions={} bridge_kills={done_bridge} \
         nats_restarts={done_nats} pg_restarts={done_pg} mirror_kills={done_mirror} stored={} \
         duplicates_dropped={dups} order=ok exactly_once=ok mirror=equal ({} tables, {rows} rows) \
         in {:.0}s",
        expected.len(),
        oracle_xids.len(),
        stored.len(),
        counts.len(),
        started.elapsed().as_secs_f64()
    );
}
