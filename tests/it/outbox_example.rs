//! The outbox example (`consumer-example/outbox/`) against real servers: the order service
//! writes orders with their `OrderPlaced` events, the bridge is killed with SIGKILL and
//! restarted in between, and the shipping consumer processes every event exactly once by its
//! id, also when the whole stream is read again.
//!
//! Needs the project venv with the example's requirements: `scripts/install-deps.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::{bridge_command, setup_app_db, BridgeProcess, KillOnDrop, TempDir, TestEnv};

/// How long one run of a script may take before the test fails.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(60);

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("consumer-example/outbox")
        .join(file)
}

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev/venv/bin/python");
    assert!(
        p.is_file(),
        "{} missing: run scripts/install-deps.sh (it installs consumer-example/outbox/requirements.txt)",
        p.display()
    );
    p
}

/// Runs an example script to its end (bounded); the JSON summary it prints last.
fn run(script: &str, args: &[&str], logs: &Path) -> Value {
    let log = logs.join(format!("{script}.log"));
    let mut child = KillOnDrop(
        Command::new(python())
            .arg(example(script))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .spawn()
            .expect("spawn the example"),
    );
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).map(|_| out)
    });
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "{script} did not finish in time");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "{script} {args:?} failed: {status}\n{}",
        {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        }
    );
    let out = reader.join().unwrap().expect("read the output");
    let last = out.lines().last().expect("a summary line");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"))
}

#[test]
fn the_shipping_consumer_processes_every_order_event_once() {
    let _ = python();
    let env = TestEnv::start();
    let schema = std::fs::read_to_string(example("schema.sql")).unwrap();
    setup_app_db(&env.pg, &schema, "");
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let spawn = || {
        let mut cmd = bridge_command(&env.pg, &url, dir.path());
        cmd.args(["--outbox-table", "outbox"]);
        let b = BridgeProcess::spawn(&mut cmd);
        b.wait_for_line("streaming started", WAIT);
        b
    };
    let pg_url = env.pg.url("app");
    let db = dir.path().join("shipping.sqlite");
    let db = db.to_str().unwrap();
    let consume = |extra: &[&str]| {
        let mut args = vec!["--nats", &url, "--db", db, "--until-idle", "3"];
        args.extend_from_slice(extra);
        run("consumer.py", &args, dir.path())
    };

    let mut bridge = spawn();
    assert_eq!(
        run(
            "order_service.py",
            &["--pg", &pg_url, "--orders", "30"],
            dir.path()
        )["placed"],
        30
    );
    let first = consume(&[]);
    assert_eq!(
        (first["applied"].as_u64(), first["shipments"].as_u64()),
        (Some(30), Some(30))
    );

    // The bridge is killed and restarted: what it sends again is stored once by its id.
    bridge.child.signal(libc::SIGKILL);
    assert_eq!(bridge.wait_exit(WAIT), None);
    let mut bridge = spawn();
    run(
        "order_service.py",
        &["--pg", &pg_url, "--orders", "20"],
        dir.path(),
    );
    let second = consume(&[]);
    assert_eq!(
        (second["applied"].as_u64(), second["shipments"].as_u64()),
        (Some(20), Some(50)),
        "{second}"
    );

    // Every event delivered again: each is recognised by its id and skipped.
    let replay = consume(&["--replay"]);
    assert_eq!(
        (replay["applied"].as_u64(), replay["skipped"].as_u64()),
        (Some(0), Some(50)),
        "{replay}"
    );

    // One shipment per order, for exactly the orders in the database.
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut shipped: Vec<String> = conn
        .prepare("SELECT order_id FROM shipments ORDER BY order_id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    shipped.sort();
    let mut orders: Vec<String> = env
        .pg
        .sql("app", "SELECT id::text FROM shop_orders")
        .rows
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    orders.sort();
    assert_eq!(shipped, orders);
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
}
