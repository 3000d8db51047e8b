//! Failover against real servers (PostgreSQL 17+, `PG_BIN_18`): a primary with a physical
//! standby, the bridge given both hosts with `target_session_attrs=read-write`. The primary is
//! stopped like a crash and the standby promoted under load. With a failover slot the standby
//! keeps in step, the bridge follows the promotion on its own, and the stream holds every
//! committed change once; without slot synchronization the bridge stops with exit code 2 and
//! one line instead of creating a new slot past the changes it has not streamed. One test runs
//! on the default server (`PG_BIN`): several hosts from the environment, the first one down.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgbridge::pg::conn::{ConnectionKind, PgConnection, PgError};
use testkit::oracle::{
    bootstrapped, compare_all, durable, grant_sales, mirror_command, seed_sql, table_tokens,
    tables, tail, wait_mirror_caught_up, Workload, ROLLBACK, SCHEMA as ORACLE_SCHEMA, STEP_TIMEOUT,
    TABLES,
};
use testkit::standby::{
    failover_pg_bin, promote, protect_standby, start_primary, start_standby, wait_slot_synced,
};
use testkit::{
    assert_once_in_order, bridge_command, free_port, heavy, json_row_ids, read_stream,
    setup_app_db, stream_len, wait_for, BridgeProcess, NatsServer, PgServer, StopMode, TempDir,
    TestEnv, PG_SUPERUSER,
};

const SCHEMA: &str = "CREATE TABLE t (id bigint PRIMARY KEY)";
/// The writer gives up after this long whatever happens.
const WRITER_LIMIT: Duration = Duration::from_secs(300);
const STANDBY_SLOT: &str = "standby1";
const WAIT: Duration = Duration::from_secs(90);
/// Rows written before the crash, and after the promotion.
const ROWS_BEFORE: u64 = 1500;
const ROWS_AFTER: u64 = 1500;
/// Seed of the oracle's workload.
const SEED: u64 = 0xFA11_0E12;

/// The bridge for database `app` of both servers: `PG_URL` names both hosts, each with its
/// port, and asks for the read-write one.
fn bridge_for(
    primary: &PgServer,
    standby: &PgServer,
    nats_url: &str,
    dir: &TempDir,
) -> BridgeProcess {
    let url = format!(
        "postgres://bridge_reader@{}:{},{}:{}/app?target_session_attrs=read-write",
        primary.host(),
        primary.port(),
        standby.host(),
        standby.port()
    );
    BridgeProcess::spawn(
        bridge_command(primary, nats_url, dir.path())
            .env_remove("PG_HOST")
            .env_remove("PG_PORT")
            .env("PG_URL", url)
            .args(["--format", "json"]),
    )
}

/// One writer that follows the primary: a connection to both hosts (read-write). Each round
/// commits a few inserts into `t` with increasing ids and, with a workload, one of the
/// oracle's random transactions (updates, deletes, key changes, TOAST, transactions large
/// enough to be streamed before their commit). After a failure it reconnects (bounded) and
/// goes on after the highest id of `t` the server has, so those ids stay 1..=n whatever a
/// crash kept; the oracle's statements cannot fail whichever of its transactions were kept.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    /// Ids of `t` whose COMMIT the server acknowledged.
    acknowledged: Arc<Mutex<Vec<u64>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(primary: &PgServer, standby: &PgServer, mut workload: Option<Workload>) -> Self {
        let params: Vec<(&'static str, String)> = vec![
            ("host", format!("{},{}", primary.host(), standby.host())),
            ("port", format!("{},{}", primary.port(), standby.port())),
            ("user", PG_SUPERUSER.to_string()),
            ("password", primary.password().to_string()),
            ("dbname", "app".to_string()),
            ("connect_timeout", "5".to_string()),
            ("target_session_attrs", "read-write".to_string()),
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let (stop_flag, counter, acks) = (stop.clone(), written.clone(), acknowledged.clone());
        let handle = std::thread::spawn(move || {
            let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let started = Instant::now();
            let mut conn: Option<PgConnection> = None;
            let mut next = 1u64;
            let mut round = 0u64;
            while !stop_flag.load(Ordering::Relaxed) && started.elapsed() < WRITER_LIMIT {
                let Some(c) = conn.as_mut() else {
                    match PgConnection::connect(&refs, ConnectionKind::Normal) {
                        Ok(mut c) => {
                            let max = c
                                .query("SELECT coalesce(max(id), 0) AS m FROM t")
                                .ok()
                                .and_then(|r| r.get(0, "m").and_then(|m| m.parse().ok()));
                            if let Some(max) = max {
                                next = max + 1;
                                counter.store(max, Ordering::Relaxed);
                                conn = Some(c);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                    continue;
                };
                let last = next + round % 3;
                let inserts: String = (next..=last)
                    .map(|id| format!(" INSERT INTO t (id) VALUES ({id});"))
                    .collect();
                let result = c
                    .execute(&format!("BEGIN;{inserts} COMMIT;"))
                    .and_then(|()| {
                        acks.lock().unwrap().extend(next..=last);
                        counter.store(last, Ordering::Relaxed);
                        next = last + 1;
                        match workload.as_mut() {
                            Some(w) => run_workload_transaction(c, &w.transaction()),
                            None => Ok(()),
                        }
                    });
                match result {
                    Ok(()) => round += 1,
                    // The server went away: whether the last one committed shows after
                    // reconnecting. Any other failure is a defect of the test.
                    Err(e) if e.is_connection_problem() => conn = None,
                    Err(e) => panic!("writer transaction failed: {e}"),
                }
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        Writer {
            stop,
            written,
            acknowledged,
            handle: Some(handle),
        }
    }

    fn rows(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    fn wait_rows(&self, n: u64) {
        wait_for(&format!("{n} rows written"), WAIT, || {
            (self.rows() >= n).then_some(())
        });
    }

    /// Stops the writer; the ids whose commit was acknowledged.
    fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("writer thread panicked");
        }
        std::mem::take(&mut *self.acknowledged.lock().unwrap())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Runs one of the oracle's transactions (its control statements included) and commits it
/// unless it ends in a ROLLBACK.
fn run_workload_transaction(conn: &mut PgConnection, statements: &[String]) -> Result<(), PgError> {
    conn.execute("BEGIN")?;
    for sql in statements {
        conn.execute(sql)?;
        if sql == ROLLBACK {
            return Ok(());
        }
    }
    conn.execute("COMMIT")
}

/// The ids of table `t` on `pg`, in order.
fn table_ids(pg: &PgServer) -> Vec<i64> {
    pg.sql("app", "SELECT id FROM t ORDER BY id")
        .rows
        .iter()
        .map(|r| r[0].as_deref().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn the_bridge_follows_a_promotion_under_load_and_loses_nothing() {
    let bin = failover_pg_bin();
    let _heavy = heavy();
    let nats = std::thread::spawn(NatsServer::start);
    let primary = start_primary(&bin, STANDBY_SLOT);
    setup_app_db(
        &primary,
        &format!("{SCHEMA}; {ORACLE_SCHEMA} {}", seed_sql()),
        &format!("t,{TABLES}"),
    );
    grant_sales(&primary);
    let standby = start_standby(&primary, STANDBY_SLOT, true);
    // Every acknowledged commit is on the standby, and the bridge never sees a change before
    // the standby has it.
    protect_standby(&primary, STANDBY_SLOT, true);
    let nats = nats.join().expect("nats-server");
    let url = nats.url();
    let dir = TempDir::new("failover");

    let mut bridge = bridge_for(&primary, &standby, &url, &dir);
    bridge.wait_for_line("streaming started", WAIT);
    let created = bridge.wait_for_line("created replication slot 'cdc_slot'", WAIT);
    assert!(created.contains("(a failover slot)"), "{}", bridge.log());
    assert!(
        !bridge.log().contains("synchronized_standby_slots"),
        "{}",
        bridge.log()
    );
    wait_slot_synced(&standby, "cdc_slot");

    // The tables rebuilt from the stream: the mirror, bootstrapped from snapshots.
    let db = dir.path().join("mirror.db");
    let mut mirror = BridgeProcess::spawn(&mut mirror_command(
        &url,
        &db,
        dir.path(),
        Some(TABLES),
        &[],
    ));
    let writer = Writer::start(&primary, &standby, Some(Workload::new(SEED)));
    let tokens = table_tokens();
    wait_for("the mirror to bootstrap", STEP_TIMEOUT, || {
        if let Some(status) = mirror.child.try_wait().unwrap() {
            panic!("the mirror exited ({status}):\n{}", tail(&mirror.log(), 60));
        }
        bootstrapped(&db, &tokens).then_some(())
    });
    writer.wait_rows(ROWS_BEFORE);

    // A crash of the primary, then the operator's promotion.
    let mut primary = primary;
    primary.stop(StopMode::Immediate);
    let at_crash = writer.rows();
    promote(&standby);
    writer.wait_rows(at_crash + ROWS_AFTER);
    let acknowledged = writer.stop();

    let promotion = bridge.wait_for_line("a promotion", WAIT);
    assert!(
        promotion.contains("from timeline 1 to 2 (switch point"),
        "{promotion}"
    );
    let ids = table_ids(&standby);
    let n = ids.len() as u64;
    assert!(
        ids.iter().copied().eq(1..=n as i64),
        "the new primary's ids are not 1..={n}"
    );
    for id in &acknowledged {
        assert!(*id <= n, "acknowledged row {id} is not on the new primary");
    }
    wait_mirror_caught_up(&standby, &url, &durable(&db));
    // No restart: the same process streamed before and after.
    assert_eq!(bridge.child.try_wait().unwrap(), None, "{}", bridge.log());

    let messages = read_stream(&url, "CDC");
    let msg_ids: HashSet<&String> = messages.iter().filter_map(|m| m.msg_id.as_ref()).collect();
    assert_eq!(msg_ids.len(), messages.len(), "a change is stored twice");
    let inserts: Vec<_> = messages
        .into_iter()
        .filter(|m| m.subject == "cdc.t.insert")
        .collect();
    let rows = json_row_ids(&inserts);
    // Commit order, each once, and exactly the new primary's rows.
    assert_once_in_order(&rows, n);
    match compare_all(&standby, &db, &tables()) {
        Ok(counts) => {
            eprintln!("failover: {n} rows of t, equal tables (rows): {counts:?}");
            assert!(counts.iter().all(|(_, n)| *n > 0), "{counts:?}");
        }
        Err(report) => panic!(
            "the tables rebuilt from the stream differ from the new primary's (seed {SEED}):\n{report}\nmirror log:\n{}",
            tail(&mirror.log(), 40)
        ),
    }
    assert_eq!(mirror.terminate(WAIT), Some(0), "{}", mirror.log());
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}

#[test]
fn a_promoted_standby_without_the_slot_stops_the_bridge_with_exit_2() {
    let bin = failover_pg_bin();
    let _heavy = heavy();
    let nats = std::thread::spawn(NatsServer::start);
    let primary = start_primary(&bin, STANDBY_SLOT);
    setup_app_db(&primary, SCHEMA, "t");
    // No slot synchronization, no synchronized_standby_slots.
    let standby = start_standby(&primary, STANDBY_SLOT, false);
    let nats = nats.join().expect("nats-server");
    let dir = TempDir::new("failover");

    let mut bridge = bridge_for(&primary, &standby, &nats.url(), &dir);
    bridge.wait_for_line("streaming started", WAIT);
    // A failover slot on a primary that does not wait for its standby: said at start.
    bridge.wait_for_line("no synchronized_standby_slots", WAIT);
    for id in 1..=50 {
        primary.sql("app", &format!("INSERT INTO t VALUES ({id})"));
    }
    wait_for("the rows in the stream", WAIT, || {
        (stream_len(&nats.url(), "CDC") >= 50).then_some(())
    });
    let mut primary = primary;
    primary.stop(StopMode::Immediate);
    promote(&standby);
    standby.sql("app", "INSERT INTO t VALUES (51)");

    let code = bridge.wait_exit(WAIT);
    let log = bridge.log();
    assert_eq!(code, Some(2), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("does not exist on the server"))
        .unwrap_or_else(|| panic!("no line about the missing slot:\n{log}"));
    for part in [
        "'cdc_slot'",
        "promoted from timeline 1 to 2",
        "sync_replication_slots",
        "--accept-position-gap",
    ] {
        assert!(line.contains(part), "{part}: {line}");
    }
    // Nothing silently: no new slot on the new primary, and a restart refuses too.
    let slots = standby.value(
        "postgres",
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cdc_slot'",
    );
    assert_eq!(slots, "0");
    let mut again = bridge_for(&primary, &standby, &nats.url(), &dir);
    assert_eq!(again.wait_exit(WAIT), Some(2), "{}", again.log());
    assert!(
        again.log().contains("does not exist on the server"),
        "{}",
        again.log()
    );
    assert_eq!(stream_len(&nats.url(), "CDC"), 50);
}

#[test]
fn an_existing_slot_is_made_a_failover_slot_at_start() {
    let bin = failover_pg_bin();
    let nats = std::thread::spawn(NatsServer::start);
    let pg = start_primary(&bin, STANDBY_SLOT);
    setup_app_db(&pg, SCHEMA, "t");
    pg.sql(
        "app",
        "SELECT pg_create_logical_replication_slot('cdc_slot', 'pgoutput')",
    );
    let failover = || {
        pg.value(
            "postgres",
            "SELECT failover::text FROM pg_replication_slots WHERE slot_name = 'cdc_slot'",
        )
    };
    assert_eq!(failover(), "false");
    let nats = nats.join().expect("nats-server");
    let dir = TempDir::new("failover");

    // Off: the slot stays as it is.
    let mut bridge = BridgeProcess::spawn(
        bridge_command(&pg, &nats.url(), dir.path()).arg("--failover-slot=false"),
    );
    bridge.wait_for_line("streaming started", WAIT);
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
    assert_eq!(failover(), "false");
    assert!(!bridge.log().contains("failover slot"), "{}", bridge.log());

    // On (the default): made a failover slot, and the missing synchronized_standby_slots said.
    let mut bridge = BridgeProcess::spawn(&mut bridge_command(&pg, &nats.url(), dir.path()));
    bridge.wait_for_line("was not a failover slot: made it one", WAIT);
    bridge.wait_for_line("no synchronized_standby_slots", WAIT);
    bridge.wait_for_line("streaming started", WAIT);
    assert_eq!(failover(), "true");
    pg.sql("app", "INSERT INTO t VALUES (1)");
    wait_for("the row in the stream", WAIT, || {
        (stream_len(&nats.url(), "CDC") == 1).then_some(())
    });
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}

/// `PG_HOST` and `PG_PORT` lists, the first host down: the bridge streams from the second
/// (read-write by default with several hosts). On a server without failover slots (the
/// default test server, PostgreSQL 15) it warns that it cannot follow a promotion.
#[test]
fn several_hosts_from_the_environment_skip_a_host_that_is_down() {
    let env = TestEnv::start();
    setup_app_db(&env.pg, SCHEMA, "t");
    let dir = TempDir::new("failover");
    let down = free_port();
    let mut bridge = BridgeProcess::spawn(
        bridge_command(&env.pg, &env.nats.url(), dir.path())
            .env("PG_HOST", format!("{0},{0}", env.pg.host()))
            .env("PG_PORT", format!("{down},{}", env.pg.port())),
    );
    let started = bridge.wait_for_line("starting: postgres=", WAIT);
    assert!(
        started.contains(&format!(
            "127.0.0.1:{down},127.0.0.1:{}/app target_session_attrs=read-write",
            env.pg.port()
        )),
        "{started}"
    );
    bridge.wait_for_line("streaming started", WAIT);
    env.pg.sql("app", "INSERT INTO t VALUES (1)");
    wait_for("the row in the stream", WAIT, || {
        (stream_len(&env.nats.url(), "CDC") == 1).then_some(())
    });
    let version: i32 = env
        .pg
        .value("postgres", "SHOW server_version_num")
        .parse()
        .unwrap();
    if version < 170000 {
        assert!(
            bridge.log().contains("has no failover slots"),
            "{}",
            bridge.log()
        );
    }
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}
