//! The pgbridge benchmark (run it through `scripts/bench`).
//!
//! Sets up a throw-away PostgreSQL (wal_level=logical) and nats-server -js on random loopback
//! ports, runs the workloads of DESIGN §7 and measures each figure together with its ceiling
//! in the same run:
//!
//! 1. streaming throughput: a pgbench backlog of small transactions (2 inserts + 1 update),
//!    drained by the bridge vs `pg_recvlogical` to /dev/null; then one large transaction;
//! 2. the JetStream ceiling: the same messages published by a minimal async-nats publisher
//!    (`examples/js_publish.rs`) with the same window and message ids;
//! 3. bridge CPU per change and peak RSS, from /proc;
//! 4. commit → PubAck latency at a steady rate, from the bridge's histogram on /metrics
//!    (scraped before and after the run), cross-checked by a consumer of `cdc.>`;
//! 5. snapshot: request → meta stored for a table in the INIT stream, with the bridge's CPU
//!    and peak RSS, vs `COPY ... TO STDOUT` of the same table to /dev/null;
//! 6. start-up: from spawn to the first change in the stream.
//!
//! Prints a table and writes the figures as JSON.

mod nats;
mod probe;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value as Json};

use testkit::pg::init_script;
use testkit::proc::{cpu_by_thread, cpu_of, run, status_kb, Proc, Rusage};
use testkit::{free_port, NatsServer, PgServer};

/// The benchmark's database, and the role the bridge connects as (made by `deploy/init.sh`).
const DB: &str = "app";
const READER: &str = "bridge_reader";
const READER_PASSWORD: &str = "bench-reader";

const SLOT: &str = "cdc_slot";
const CEILING_SLOT: &str = "ceiling_slot";
const PROBE_SLOT: &str = "probe_slot";
const PUBLICATION: &str = "cdc_pub";
/// The bridge's default PubAck window (`--max-in-flight`).
const WINDOW: usize = 1024;
/// Changes per pgbench transaction.
const CHANGES_PER_TXN: u64 = 3;
/// The histogram the bridge's telemetry exports, when it has one.
const LATENCY_HISTOGRAM: &str = "bridge_commit_to_puback_seconds";

/// Each transaction: two inserts and an update of the second row.
const WORKLOAD: &str = r"\set n random(1, 1000000000)
\set m :n + 1
BEGIN;
INSERT INTO users (name, email, score, active) VALUES ('user ' || :n, 'user' || :n || '@example.com', :n % 1000, true);
INSERT INTO users (name, email, score, active) VALUES ('user ' || :m, 'user' || :m || '@example.com', :m % 1000, false) RETURNING id \gset
UPDATE users SET score = score + 1, updated_at = now() WHERE id = :id;
END;
";

const SCHEMA: &str = "CREATE TABLE users (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    score integer NOT NULL DEFAULT 0,
    active boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz)";

struct Opts {
    dir: PathBuf,
    out: PathBuf,
    bridge: PathBuf,
    js_publish: PathBuf,
    txns: u64,
    clients: u32,
    big_rows: u64,
    latency_secs: u64,
    latency_rate: u64,
    snapshot_rows: u64,
    startup_runs: u32,
    /// Phases to run (all when empty): streaming, jetstream, large, latency, startup, snapshot.
    only: Vec<String>,
    /// Command line to run the bridge under (e.g. a profiler); figures are then not comparable.
    wrapper: Vec<String>,
}

impl Opts {
    fn runs(&self, phase: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == phase)
    }
}

fn opts() -> Opts {
    let exe = std::env::current_exe().expect("current exe");
    // target/release/examples/bench -> target/release
    let release = exe.parent().and_then(Path::parent).expect("target dir");
    let mut o = Opts {
        dir: std::env::temp_dir().join(format!("pgbridge-bench-{}", std::process::id())),
        out: PathBuf::from("target/bench/results.json"),
        bridge: release.join("bridge"),
        js_publish: release.join("examples/js_publish"),
        txns: 200_000,
        clients: 4,
        big_rows: 1_000_000,
        latency_secs: 30,
        latency_rate: 5_000,
        snapshot_rows: 1_000_000,
        startup_runs: 5,
        only: Vec::new(),
        wrapper: std::env::var("BENCH_BRIDGE_WRAPPER")
            .map(|w| w.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        let num = |v: String| {
            v.parse::<u64>()
                .unwrap_or_else(|_| usage("expected a number"))
        };
        match flag.as_str() {
            "--dir" => o.dir = PathBuf::from(value()),
            "--out" => o.out = PathBuf::from(value()),
            "--bridge" => o.bridge = PathBuf::from(value()),
            "--txns" => o.txns = num(value()),
            "--clients" => o.clients = num(value()) as u32,
            "--big-rows" => o.big_rows = num(value()),
            "--latency-secs" => o.latency_secs = num(value()),
            "--latency-rate" => o.latency_rate = num(value()),
            "--snapshot-rows" => o.snapshot_rows = num(value()),
            "--startup-runs" => o.startup_runs = num(value()) as u32,
            "--only" => o.only = value().split(',').map(str::to_string).collect(),
            "--quick" => {
                o.txns = 20_000;
                o.big_rows = 100_000;
                o.latency_secs = 10;
                o.snapshot_rows = 100_000;
                o.startup_runs = 3;
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    o.txns = o.txns.max(u64::from(o.clients)) / u64::from(o.clients) * u64::from(o.clients);
    o
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("bench: {problem}");
    }
    eprintln!(
        "usage: bench [--dir DIR] [--out FILE] [--bridge PATH] [--txns N] [--clients N] \
         [--big-rows N] [--latency-secs N] [--latency-rate CHANGES_PER_S] [--snapshot-rows N] \
         [--startup-runs N] [--only PHASE,...] [--quick]\n\
         phases: streaming jetstream large latency startup snapshot\n\
         BENCH_BRIDGE_WRAPPER='valgrind --tool=callgrind' runs the bridge under a profiler"
    );
    std::process::exit(if problem.is_empty() { 0 } else { 2 })
}

struct Bench {
    o: Opts,
    started: Instant,
    pg: PgServer,
    nats: NatsServer,
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    bridge_runs: u32,
    http_port: u16,
    loadavg_at_start: String,
}

/// `/proc/loadavg`: other work on the machine shows in every figure.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn say(b: &Bench, what: &str) {
    eprintln!("bench [{:6.1}s] {what}", b.started.elapsed().as_secs_f64());
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e6
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn main() {
    let o = opts();
    let started = Instant::now();
    let loadavg_at_start = loadavg();
    fs::create_dir_all(&o.dir).expect("bench dir");
    // Every run has a new cluster: a state file left in a reused --dir belongs to an old one,
    // and the bridge would refuse to start from it.
    let _ = fs::remove_file(o.dir.join("bridge.lsn"));
    // PostgreSQL runs as another user and must reach its directory below this one.
    let _ = fs::set_permissions(&o.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    for bin in [&o.bridge, &o.js_publish] {
        assert!(bin.is_file(), "{} missing: build it first", bin.display());
    }

    let dir = o.dir.clone();
    let nats = std::thread::spawn(move || NatsServer::start_in(&dir));
    let pg = PgServer::start_in(
        &o.dir,
        &[
            ("wal_level", "logical"),
            ("max_wal_senders", "10"),
            ("max_replication_slots", "10"),
            ("listen_addresses", "127.0.0.1"),
            ("shared_buffers", "256MB"),
            ("max_wal_size", "8GB"),
            ("checkpoint_timeout", "30min"),
            ("fsync", "off"),
            // On (the default): with it off, commits wait for the WAL writer (up to 200 ms)
            // before the walsender may send them, which the latency run would measure.
            ("synchronous_commit", "on"),
            ("full_page_writes", "off"),
            ("wal_sender_timeout", "5min"),
            ("timezone", "UTC"),
            ("log_min_messages", "warning"),
        ],
    );
    let nats = nats.join().expect("nats-server start");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let client = rt
        .block_on(async_nats::connect(nats.url()))
        .expect("connect to NATS");
    // The JetStream context spawns a task: build it inside the runtime.
    let js = {
        let _runtime = rt.enter();
        async_nats::jetstream::new(client.clone())
    };
    let mut b = Bench {
        o,
        started,
        pg,
        nats,
        rt,
        client,
        js,
        bridge_runs: 0,
        http_port: free_port(),
        loadavg_at_start,
    };
    say(&b, "servers up");
    b.setup();

    let standard = if b.o.runs("streaming") {
        b.standard()
    } else {
        Json::Null
    };
    let js_ceiling = if b.o.runs("jetstream") && !standard.is_null() {
        b.jetstream_ceiling(&standard)
    } else {
        Json::Null
    };
    let large = if b.o.runs("large") {
        b.large()
    } else {
        Json::Null
    };
    let latency = if b.o.runs("latency") {
        b.latency()
    } else {
        Json::Null
    };
    let startup = if b.o.runs("startup") {
        b.startup()
    } else {
        Json::Null
    };
    let snapshot = if b.o.runs("snapshot") {
        b.snapshot()
    } else {
        Json::Null
    };

    let mut results = json!({
        "machine": machine(&b),
        "settings": {
            "transactions": b.o.txns,
            "pgbench_clients": b.o.clients,
            "large_transaction_rows": b.o.big_rows,
            "latency_seconds": b.o.latency_secs,
            "latency_changes_per_s": b.o.latency_rate,
            "snapshot_rows": b.o.snapshot_rows,
            "window": WINDOW,
        },
        "streaming": standard,
        "jetstream_ceiling": js_ceiling,
        "large_transaction": large,
        "latency": latency,
        "snapshot": snapshot,
        "startup": startup,
    });
    // (Assigning into a null would turn a phase left out with --only into an object.)
    if let (Some(bridge_rate), Some(js_rate)) = (
        results["streaming"]["bridge"]["changes_per_s"].as_f64(),
        results["jetstream_ceiling"]["messages_per_s"].as_f64(),
    ) {
        results["streaming"]["ratio_to_jetstream"] = json!(round(bridge_rate / js_rate, 3));
    }
    results["targets"] = targets(&results);
    results["duration_seconds"] = json!(round(b.started.elapsed().as_secs_f64(), 1));

    if let Some(parent) = b.o.out.parent() {
        fs::create_dir_all(parent).expect("output dir");
    }
    fs::write(
        &b.o.out,
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    )
    .expect("write results");
    print_table(&results);
    say(&b, &format!("results written to {}", b.o.out.display()));
}

impl Bench {
    fn setup(&mut self) {
        self.pg.sql("postgres", &format!("CREATE DATABASE {DB}"));
        self.pg.sql(DB, SCHEMA);
        // The project's own set-up script: role bridge_reader and publication cdc_pub.
        let mut init = Command::new("bash");
        init.arg(init_script())
            .env("PATH", path_with(self.pg.bin_dir()))
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.pg.port().to_string())
            .env("PGUSER", testkit::PG_SUPERUSER)
            .env("PGPASSWORD", self.pg.password())
            .env("PGDATABASE", DB)
            .env("BRIDGE_PG_PASSWORD", READER_PASSWORD)
            .env("BRIDGE_TABLES", "users")
            .env("BRIDGE_PUBLICATION", PUBLICATION);
        run(&mut init, "init.sh");
        fs::write(self.o.dir.join("workload.sql"), WORKLOAD).unwrap();
        // Both slots at the same point, before the workload, so both retain the backlog.
        self.pg.sql(
            DB,
            &format!(
                "SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput'), \
                 pg_create_logical_replication_slot('{CEILING_SLOT}', 'pgoutput')"
            ),
        );
    }

    fn pgbench(&self, extra: &[String]) -> (Duration, String) {
        let clients = self.o.clients.to_string();
        let threads = self.o.clients.min(2).to_string();
        let mut cmd = self.pg.tool("pgbench", DB);
        cmd.args(["-n", "-M", "prepared", "-c", &clients, "-j", &threads, "-f"])
            .arg(self.o.dir.join("workload.sql"))
            .args(extra)
            .arg(DB);
        let t = Instant::now();
        let out = run(&mut cmd, "pgbench");
        (t.elapsed(), out)
    }

    fn wal_lsn(&self) -> String {
        self.pg.value(DB, "SELECT pg_current_wal_lsn()")
    }

    /// pid of the walsender serving `slot`, once it is active.
    fn walsender(&self, slot: &str) -> Option<u32> {
        self.pg
            .value(
                DB,
                &format!(
                    "SELECT coalesce(active_pid, 0) FROM pg_replication_slots WHERE slot_name = '{slot}'"
                ),
            )
            .parse()
            .ok()
            .filter(|p| *p != 0)
    }

    /// `pg_recvlogical` from `slot` to /dev/null until `endpos`.
    fn recvlogical(&self, slot: &str, endpos: &str, options: &[&str], changes: u64) -> Json {
        let mut cmd = self.pg.tool("pg_recvlogical", DB);
        cmd.arg("-d")
            .arg(self.pg.conninfo_as(DB, READER, READER_PASSWORD))
            .args([
                "-S",
                slot,
                "--start",
                "--no-loop",
                "-f",
                "/dev/null",
                "-E",
                endpos,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::File::create(self.o.dir.join(format!("pg_recvlogical-{slot}.log"))).unwrap(),
            );
        for o in options {
            cmd.arg("-o").arg(o);
        }
        let t0 = Instant::now();
        let mut p = Proc::spawn(&self.o.dir, "pg_recvlogical", &mut cmd, libc::SIGTERM);
        let mut sender = None;
        let mut sender_cpu = Rusage::default();
        let (code, ru) = loop {
            if let Some(done) = p.wait_timeout(Duration::from_millis(20)) {
                break done;
            }
            if sender.is_none() {
                sender = self.walsender(slot);
            }
            if let Some(cpu) = sender.and_then(cpu_of) {
                sender_cpu = cpu;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "pg_recvlogical hangs"
            );
        };
        let elapsed = t0.elapsed();
        assert_eq!(code, 0, "pg_recvlogical failed, see its log");
        json!({
            "tool": "pg_recvlogical",
            "options": options,
            "seconds": secs(elapsed),
            "changes_per_s": round(changes as f64 / elapsed.as_secs_f64(), 0),
            "client_cpu_s": secs(ru.total()),
            "walsender_cpu_s": secs(sender_cpu.total()),
        })
    }

    /// Starts the bridge on `tables` (comma-separated, as `--table`).
    fn spawn_bridge(&mut self, tag: &str, tables: &str) -> (Proc, PathBuf) {
        self.bridge_runs += 1;
        let log_path = self
            .o
            .dir
            .join(format!("bridge-{}-{tag}.log", self.bridge_runs));
        let log = fs::File::create(&log_path).unwrap();
        let mut cmd = match self.o.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.o.bridge);
                c
            }
            None => Command::new(&self.o.bridge),
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("PG_HOST", "127.0.0.1")
            .env("PG_PORT", self.pg.port().to_string())
            .env("PG_USER", READER)
            .env("PG_PASSWORD", READER_PASSWORD)
            .env("PG_DB", DB)
            .env("NATS_URL", self.nats.url())
            .env("RUST_LOG", "info")
            .env("TMPDIR", &self.o.dir)
            .args([
                "--slot",
                SLOT,
                "--publication",
                PUBLICATION,
                "--table",
                tables,
            ])
            .args(["--http-bind", "127.0.0.1", "--port"])
            .arg(self.http_port.to_string())
            .arg("--state-file")
            .arg(self.o.dir.join("bridge.lsn"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        (
            Proc::spawn(&self.o.dir, "bridge", &mut cmd, libc::SIGTERM),
            log_path,
        )
    }

    /// Waits until the bridge's slot has confirmed `end` and its log has a line containing
    /// `ready`; the time it took. The walsender first re-reads the WAL from the slot's
    /// restart_lsn (after a large transaction, all of it), work that is no part of what the
    /// phase measures.
    fn wait_caught_up(&self, bridge: &mut Proc, log: &Path, end: &str, ready: &str) -> Duration {
        let t0 = Instant::now();
        loop {
            let caught_up = self.pg.value(
                DB,
                &format!(
                    "SELECT confirmed_flush_lsn >= '{end}'::pg_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
                ),
            ) == "t";
            if caught_up && fs::read_to_string(log).unwrap_or_default().contains(ready) {
                return t0.elapsed();
            }
            self.check_alive(bridge, log);
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the bridge did not catch up with its slot (or log {ready:?}) in 2 minutes"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Bytes of WAL the walsender re-reads before anything new: restart_lsn -> confirmed.
    fn slot_reread_bytes(&self) -> u64 {
        self.pg
            .value(
                DB,
                &format!(
                    "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, restart_lsn)::bigint \
                     FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
                ),
            )
            .parse()
            .unwrap_or(0)
    }

    /// The bridge's /metrics text, retried for a second while its HTTP server comes up.
    fn scrape_metrics(&self) -> Option<String> {
        for _ in 0..20 {
            if let Some(text) = nats::http_get(self.http_port, "/metrics") {
                return Some(text);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn stop_bridge(&self, mut bridge: Proc, log: &Path) -> Rusage {
        match bridge.stop(libc::SIGTERM, Duration::from_secs(60)) {
            Some((0, ru)) => ru,
            other => panic!(
                "the bridge did not stop cleanly ({other:?}); log:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            ),
        }
    }

    fn check_alive(&self, bridge: &mut Proc, log: &Path) {
        if let Some((code, _)) = bridge.wait_timeout(Duration::ZERO) {
            panic!(
                "the bridge exited with {code}; log:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
    }

    /// Starts the bridge on the backlog and waits until the CDC stream holds `expected`
    /// messages and the slot has confirmed the last transaction.
    fn drain(&mut self, expected: u64, tag: &str) -> Json {
        let nats_pid = self.nats.pid().expect("nats-server runs");
        let nats_cpu0 = cpu_of(nats_pid).unwrap_or_default();
        let t0 = Instant::now();
        let (mut bridge, log) = self.spawn_bridge(tag, "users");
        let mut stream = None;
        let mut sender = None;
        let stored = loop {
            let n = self
                .rt
                .block_on(nats::stream_messages(&self.js, &mut stream, "CDC"));
            if n >= expected {
                break t0.elapsed();
            }
            if sender.is_none() {
                sender = self.walsender(SLOT);
            }
            self.check_alive(&mut bridge, &log);
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "the bridge stored {n} of {expected} messages in 10 minutes"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let pid = bridge.pid();
        let cpu = cpu_of(pid).unwrap_or_default();
        let threads: serde_json::Map<String, Json> = cpu_by_thread(pid)
            .into_iter()
            .filter(|(_, r)| r.total() > Duration::ZERO)
            .map(|(name, r)| {
                (
                    name,
                    json!({"user_s": secs(r.user), "sys_s": secs(r.sys),
                           "us_per_change": round(r.total().as_secs_f64() * 1e6 / expected as f64, 3)}),
                )
            })
            .collect();
        let hwm = status_kb(pid, "VmHWM").unwrap_or(0);
        let sender_cpu = sender.and_then(cpu_of).unwrap_or_default();
        let nats_cpu = cpu_of(nats_pid).unwrap_or_default().total() - nats_cpu0.total();

        // The slot: confirmed past the last transaction's commit.
        let last_commit = self.rt.block_on(async {
            let mut s = self.js.get_stream("CDC").await.expect("CDC stream");
            let last = s.info().await.expect("info").state.last_sequence;
            let m = s.get_raw_message(last).await.expect("last message");
            nats::field(&m.payload, "commit_lsn").expect("commit_lsn")
        });
        let confirmed = loop {
            let done = self.pg.value(
                DB,
                &format!(
                    "SELECT confirmed_flush_lsn > '{last_commit}'::pg_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
                ),
            );
            if done == "t" {
                break t0.elapsed();
            }
            self.check_alive(&mut bridge, &log);
            assert!(
                t0.elapsed() < Duration::from_secs(660),
                "slot not confirmed"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let total = self.stop_bridge(bridge, &log);
        let started_ms = streaming_started_ms(&log);
        json!({
            "changes": expected,
            "seconds_to_stored": secs(stored),
            "seconds_to_confirmed": secs(confirmed),
            "changes_per_s": round(expected as f64 / stored.as_secs_f64(), 0),
            "startup_ms_logged": started_ms,
            "cpu_user_s": secs(cpu.user),
            "cpu_sys_s": secs(cpu.sys),
            "cpu_us_per_change": round(cpu.total().as_secs_f64() * 1e6 / expected as f64, 3),
            "cpu_s_including_shutdown": secs(total.total()),
            "threads": threads,
            "peak_rss_kb": hwm,
            "walsender_cpu_s": secs(sender_cpu.total()),
            "nats_server_cpu_s": secs(nats_cpu),
        })
    }

    fn standard(&mut self) -> Json {
        let txns = self.o.txns;
        let changes = txns * CHANGES_PER_TXN;
        say(self, &format!("workload: {txns} transactions with pgbench"));
        let per_client = (txns / u64::from(self.o.clients)).to_string();
        let (gen, _) = self.pgbench(&["-t".into(), per_client]);
        let rows: u64 = self
            .pg
            .value(DB, "SELECT count(*) FROM users")
            .parse()
            .unwrap();
        assert_eq!(rows, txns * 2, "pgbench wrote every transaction");
        let endpos = self.wal_lsn();
        let wal_bytes: u64 = self
            .pg
            .value(
                DB,
                &format!(
                    "SELECT pg_wal_lsn_diff('{endpos}', restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
                ),
            )
            .parse()
            .unwrap_or(0);
        say(self, "ceiling: pg_recvlogical drains the backlog");
        let options = ["proto_version=1", "publication_names=cdc_pub"];
        let ceiling = self.recvlogical(CEILING_SLOT, &endpos, &options, changes);
        say(self, "bridge drains the backlog");
        let bridge = self.drain(changes, "standard");
        let ratio =
            bridge["changes_per_s"].as_f64().unwrap() / ceiling["changes_per_s"].as_f64().unwrap();
        json!({
            "transactions": txns,
            "changes": changes,
            "wal_bytes": wal_bytes,
            "pgbench_seconds": secs(gen),
            "ceiling": ceiling,
            "bridge": bridge,
            "ratio_to_pg_recvlogical": round(ratio, 3),
        })
    }

    fn jetstream_ceiling(&mut self, standard: &Json) -> Json {
        say(
            self,
            "ceiling: the same messages through a minimal async-nats publisher",
        );
        let expected = standard["changes"].as_u64().unwrap();
        let api = self.js_publish("jetstream", expected);
        say(
            self,
            "reference: the same messages as plain publishes with one ack inbox",
        );
        let core = self.js_publish("core", expected);
        let mut r = api.clone();
        r["core_publish_reference"] = core;
        r
    }

    fn js_publish(&mut self, mode: &str, expected: u64) -> Json {
        let mut cmd = Command::new(&self.o.js_publish);
        cmd.args([
            "--url",
            &self.nats.url(),
            "--source",
            "CDC",
            "--target",
            "CEIL",
        ])
        .args(["--window", &WINDOW.to_string(), "--mode", mode])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let mut p = Proc::spawn(&self.o.dir, "js_publish", &mut cmd, libc::SIGTERM);
        let mut out = String::new();
        std::io::Read::read_to_string(p.child.stdout.as_mut().unwrap(), &mut out).unwrap();
        let (code, _) = p
            .wait_timeout(Duration::from_secs(600))
            .expect("js_publish");
        assert_eq!(code, 0, "js_publish failed");
        let r: Json = serde_json::from_str(out.trim()).expect("js_publish output");
        assert_eq!(r["messages"].as_u64(), Some(expected));
        let n = expected as f64;
        json!({
            "client": if mode == "core" {
                "async-nats Client::publish_with_reply_and_headers, one ack inbox subscription"
            } else {
                "async-nats jetstream::Context::send_publish (as the bridge)"
            },
            "messages": r["messages"],
            "payload_bytes": r["payload_bytes"],
            "mean_payload_bytes": round(r["payload_bytes"].as_f64().unwrap() / n, 1),
            "seconds": r["seconds"],
            "messages_per_s": round(r["rate"].as_f64().unwrap(), 0),
            "window": WINDOW,
            "publisher_cpu_s": r["cpu_seconds"],
            "publisher_cpu_us_per_message": round(r["cpu_seconds"].as_f64().unwrap() * 1e6 / n, 3),
        })
    }

    fn large(&mut self) -> Json {
        let rows = self.o.big_rows;
        say(
            self,
            &format!("large transaction: one INSERT ... SELECT of {rows} rows"),
        );
        self.rt.block_on(async {
            if let Ok(s) = self.js.get_stream("CDC").await {
                s.purge().await.expect("purge CDC");
            }
        });
        self.pg.sql(
            DB,
            &format!(
                "SELECT pg_drop_replication_slot('{CEILING_SLOT}'); \
                 SELECT pg_create_logical_replication_slot('{CEILING_SLOT}', 'pgoutput')"
            ),
        );
        let t = Instant::now();
        self.pg.sql(
            DB,
            &format!(
                "INSERT INTO users (name, email, score, active) \
                 SELECT 'bulk ' || g, 'bulk' || g || '@example.com', g % 1000, g % 2 = 0 \
                 FROM generate_series(1, {rows}) g"
            ),
        );
        let insert = t.elapsed();
        let endpos = self.wal_lsn();
        say(self, "ceiling: pg_recvlogical drains it");
        // The bridge's own options (PostgreSQL 14+): the server streams the transaction while
        // it is in progress instead of spilling it to disk and sending it at commit.
        let options = [
            "proto_version=2",
            "publication_names=cdc_pub",
            "messages=true",
            "streaming=on",
        ];
        let ceiling = self.recvlogical(CEILING_SLOT, &endpos, &options, rows);
        say(self, "bridge drains it");
        let bridge = self.drain(rows, "large");
        let ratio =
            bridge["changes_per_s"].as_f64().unwrap() / ceiling["changes_per_s"].as_f64().unwrap();
        json!({
            "rows": rows,
            "insert_seconds": secs(insert),
            "ceiling": ceiling,
            "bridge": bridge,
            "ratio_to_pg_recvlogical": round(ratio, 3),
        })
    }

    fn latency(&mut self) -> Json {
        let rate = self.o.latency_rate;
        let duration = self.o.latency_secs;
        let tps = rate.div_ceil(CHANGES_PER_TXN);
        say(
            self,
            &format!("latency: {rate} changes/s ({tps} tps) for {duration} s"),
        );
        // Steady state: the run starts once the walsender is past the WAL it re-reads.
        let reread = self.slot_reread_bytes();
        let end = self.wal_lsn();
        let (mut bridge, log) = self.spawn_bridge("latency", "users");
        let catch_up = self.wait_caught_up(&mut bridge, &log, &end, "streaming started");
        let t0 = Instant::now();
        let cpu0 = cpu_of(bridge.pid()).unwrap_or_default();
        // The bridge's histogram counts from its start: the phase's own observations are the
        // difference between a scrape now and one after the run.
        let metrics_before = self.scrape_metrics();
        let mut sub = self
            .rt
            .block_on(async {
                let s = self.client.subscribe("cdc.>").await;
                self.client.flush().await.map(|_| s)
            })
            .expect("subscribe")
            .expect("subscribe");
        self.pg.sql(
            DB,
            &format!("SELECT pg_create_logical_replication_slot('{PROBE_SLOT}', 'pgoutput')"),
        );
        let probe = probe::Probe::start(
            self.pg.params_as(DB, READER, READER_PASSWORD),
            PROBE_SLOT,
            PUBLICATION,
        );
        let clients = self.o.clients.to_string();
        let threads = self.o.clients.min(2).to_string();
        let mut cmd = self.pg.tool("pgbench", DB);
        cmd.args(["-n", "-M", "prepared", "-c", &clients, "-j", &threads, "-f"])
            .arg(self.o.dir.join("workload.sql"))
            .args(["--rate", &tps.to_string(), "-T", &duration.to_string(), DB])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut pgbench = Proc::spawn(&self.o.dir, "pgbench", &mut cmd, libc::SIGTERM);
        let mut latencies_ms: Vec<f64> = Vec::with_capacity((rate * duration) as usize + 1024);
        let mut by_xid: Vec<(u32, f64)> = Vec::with_capacity(latencies_ms.capacity());
        let mut received = Vec::with_capacity(latencies_ms.capacity());
        let mut pgbench_exit = None;
        let mut quiet_since = Instant::now();
        // NATS's (and this consumer's) share: a ping every 5 ms from this process through
        // nats-server back to it, on the same connection as the CDC subscription.
        let mut pings = self
            .rt
            .block_on(async {
                let s = self.client.subscribe("bench.ping").await;
                self.client.flush().await.map(|_| s)
            })
            .expect("subscribe")
            .expect("subscribe");
        let mut ping_ms: Vec<f64> = Vec::new();
        self.rt.block_on(async {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tokio::select! {
                    m = sub.next() => match m {
                        Some(m) => {
                            // Only note the time here; decoding later keeps this loop from
                            // falling behind (and adding its own delay) on a busy machine.
                            received.push((nats::now_unix_micros(), m.payload));
                            quiet_since = Instant::now();
                        }
                        None => break,
                    },
                    Some(p) = pings.next() => {
                        let now = nats::now_unix_micros();
                        if let Some(sent) = std::str::from_utf8(&p.payload).ok().and_then(|t| t.parse::<i64>().ok()) {
                            ping_ms.push((now - sent) as f64 / 1000.0);
                        }
                    }
                    _ = tick.tick() => {
                        if pgbench_exit.is_none() {
                            let sent = nats::now_unix_micros().to_string();
                            let _ = self.client.publish("bench.ping", sent.into()).await;
                        }
                    }
                }
                if pgbench_exit.is_none() {
                    pgbench_exit = pgbench.wait_timeout(Duration::ZERO);
                } else if quiet_since.elapsed() > Duration::from_secs(2) {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(duration + 120),
                    "latency run does not end"
                );
            }
        });
        ping_ms.sort_by(f64::total_cmp);
        for (now, payload) in &received {
            if let Some(ct) =
                nats::field(payload, "commit_time").and_then(|t| nats::parse_commit_time(&t))
            {
                let ms = (now - ct) as f64 / 1000.0;
                latencies_ms.push(ms);
                if let Some(xid) = nats::uint_field(payload, "xid") {
                    by_xid.push((xid as u32, ms));
                }
            }
        }
        drop(received);
        let mut out = String::new();
        std::io::Read::read_to_string(pgbench.child.stdout.as_mut().unwrap(), &mut out).ok();
        let done_txns: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split(['/', ' ']).next()?.parse().ok())
            .unwrap_or(0);
        let pg_by_xid: std::collections::HashMap<u32, f64> = probe.finish().into_iter().collect();
        let mut pg_latencies_ms: Vec<f64> = pg_by_xid.values().copied().collect();
        pg_latencies_ms.sort_by(f64::total_cmp);
        // The bridge's own share: each message's latency minus PostgreSQL's for its transaction.
        let mut added_ms: Vec<f64> = by_xid
            .iter()
            .filter_map(|(xid, ms)| Some(ms - pg_by_xid.get(xid)?))
            .collect();
        added_ms.sort_by(f64::total_cmp);
        self.pg.sql(
            DB,
            &format!("SELECT pg_drop_replication_slot('{PROBE_SLOT}')"),
        );
        let metrics_after = self.scrape_metrics();
        let cpu = cpu_of(bridge.pid()).unwrap_or_default().total() - cpu0.total();
        let hwm = status_kb(bridge.pid(), "VmHWM").unwrap_or(0);
        self.stop_bridge(bridge, &log);

        let n = latencies_ms.len();
        latencies_ms.sort_by(f64::total_cmp);
        let histogram = histogram_figures(metrics_before.as_deref(), metrics_after.as_deref());
        json!({
            "target_changes_per_s": rate,
            "pgbench_tps": tps,
            "slot_wal_reread_bytes": reread,
            "seconds_to_catch_up_before_run": secs(catch_up),
            "seconds": duration,
            "transactions": done_txns,
            "messages": n,
            "messages_expected": done_txns * CHANGES_PER_TXN,
            "consumer": {
                "p50_ms": round(nats::percentile(&latencies_ms, 50.0), 3),
                "p99_ms": round(nats::percentile(&latencies_ms, 99.0), 3),
                "max_ms": round(latencies_ms.last().copied().unwrap_or(f64::NAN), 3),
                "mean_ms": round(latencies_ms.iter().sum::<f64>() / n.max(1) as f64, 3),
            },
            "bridge_histogram": histogram,
            "nats_ping": {
                "what": "a ping every 5 ms from the consumer through nats-server back to it, same connection, same time",
                "pings": ping_ms.len(),
                "p50_ms": round(nats::percentile(&ping_ms, 50.0), 3),
                "p99_ms": round(nats::percentile(&ping_ms, 99.0), 3),
                "max_ms": round(ping_ms.last().copied().unwrap_or(f64::NAN), 3),
            },
            "bridge_share": {
                "what": "per message: consumer latency minus the PostgreSQL-only latency of its transaction (bridge, nats-server and this consumer)",
                "messages": added_ms.len(),
                "p50_ms": round(nats::percentile(&added_ms, 50.0), 3),
                "p99_ms": round(nats::percentile(&added_ms, 99.0), 3),
                "max_ms": round(added_ms.last().copied().unwrap_or(f64::NAN), 3),
            },
            "postgresql_only": {
                "what": "commit -> Begin delivered to a bare replication client on a second slot, same time",
                "transactions": pg_latencies_ms.len(),
                "p50_ms": round(nats::percentile(&pg_latencies_ms, 50.0), 3),
                "p99_ms": round(nats::percentile(&pg_latencies_ms, 99.0), 3),
                "max_ms": round(pg_latencies_ms.last().copied().unwrap_or(f64::NAN), 3),
            },
            "bridge_cpu_us_per_change": round(cpu.as_secs_f64() * 1e6 / n.max(1) as f64, 3),
            "bridge_peak_rss_kb": hwm,
        })
    }

    fn startup(&mut self) -> Json {
        say(self, "start-up: spawn to the first change in the stream");
        let mut to_first = Vec::new();
        let mut logged = Vec::new();
        let mut pg_only = Vec::new();
        let mut reread = Vec::new();
        for i in 0..self.o.startup_runs {
            self.pg.sql(
                DB,
                &format!("INSERT INTO users (name, email) VALUES ('startup {i}', 'startup{i}@example.com')"),
            );
            // What the walsender re-reads before the first new change: restart_lsn -> confirmed.
            reread.push(
                self.pg
                    .value(
                        DB,
                        &format!(
                            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, restart_lsn)::bigint \
                             FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
                        ),
                    )
                    .parse::<u64>()
                    .unwrap_or(0),
            );
            pg_only.push(round(
                probe::first_change_ms(
                    &self.pg.params_as(DB, READER, READER_PASSWORD),
                    SLOT,
                    PUBLICATION,
                ),
                1,
            ));
            let mut sub = self
                .rt
                .block_on(async {
                    let s = self.client.subscribe("cdc.>").await;
                    self.client.flush().await.map(|_| s)
                })
                .expect("subscribe")
                .expect("subscribe");
            let t0 = Instant::now();
            let (bridge, log) = self.spawn_bridge("startup", "users");
            let got = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(60), sub.next()).await
            });
            let dt = t0.elapsed();
            assert!(
                matches!(got, Ok(Some(_))),
                "no change published in 60 s; log:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            to_first.push(dt.as_secs_f64() * 1e3);
            self.stop_bridge(bridge, &log);
            if let Some(ms) = streaming_started_ms(&log) {
                logged.push(ms as f64);
            }
        }
        let mut sorted = to_first.clone();
        sorted.sort_by(f64::total_cmp);
        json!({
            "runs": to_first.len(),
            "spawn_to_first_change_ms": to_first.iter().map(|v| round(*v, 1)).collect::<Vec<_>>(),
            "median_ms": round(nats::percentile(&sorted, 50.0), 1),
            "max_ms": round(sorted.last().copied().unwrap_or(f64::NAN), 1),
            "streaming_started_logged_ms": logged,
            "postgresql_only_first_change_ms": pg_only,
            "postgresql_only_median_ms": round(nats::percentile(&{
                let mut v = pg_only.clone();
                v.sort_by(f64::total_cmp);
                v
            }, 50.0), 1),
            "slot_wal_reread_bytes": reread,
        })
    }

    fn snapshot(&mut self) -> Json {
        let rows = self.o.snapshot_rows;
        say(
            self,
            &format!("snapshot ceiling: COPY of a {rows}-row table to /dev/null"),
        );
        self.pg.sql(
            DB,
            &format!(
                "CREATE TABLE snap_users AS SELECT g::bigint AS id, 'user ' || g AS name, \
                 'user' || g || '@example.com' AS email, g % 1000 AS score, g % 2 = 0 AS active, \
                 now() AS created_at, now() AS updated_at FROM generate_series(1, {rows}) g"
            ),
        );
        self.pg.sql(DB, "VACUUM ANALYZE snap_users");
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let mut cmd = self.pg.tool("psql", DB);
            cmd.args([
                "-X",
                "-q",
                "-c",
                "COPY (SELECT * FROM snap_users) TO STDOUT",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
            let t = Instant::now();
            let status = cmd.status().expect("psql");
            assert!(status.success(), "COPY failed");
            best = best.min(t.elapsed());
        }
        let ceiling_rate = rows as f64 / best.as_secs_f64();
        let bridge = self.bridge_snapshot(rows);
        let ratio = bridge["rows_per_s"]
            .as_f64()
            .map(|r| round(r / ceiling_rate, 3));
        json!({
            "rows": rows,
            "ceiling": {
                "tool": "psql COPY (SELECT * FROM snap_users) TO STDOUT > /dev/null, best of 3",
                "seconds": secs(best),
                "rows_per_s": round(ceiling_rate, 0),
            },
            "bridge": bridge,
            "ratio": ratio,
        })
    }

    /// The bridge's snapshot of `snap_users`: from the request on `snapshot.request.snap_users`
    /// until `init.meta.snap_users` arrives, with the bridge's CPU (per thread, sampled) and
    /// memory meanwhile.
    fn bridge_snapshot(&mut self, rows: u64) -> Json {
        const TABLE: &str = "snap_users";
        say(
            self,
            "snapshot: the bridge's snapshot of the same table into the INIT stream",
        );
        // The bridge snapshots only tables it streams, and streams only its publication's.
        self.pg.sql(
            DB,
            &format!("ALTER PUBLICATION {PUBLICATION} ADD TABLE {TABLE}"),
        );
        let end = self.wal_lsn();
        let (mut bridge, log) = self.spawn_bridge("snapshot", &format!("users,{TABLE}"));
        // Before the request: the table's creation is in the WAL the walsender re-reads.
        let catch_up = self.wait_caught_up(&mut bridge, &log, &end, "snapshot requests served");
        let pid = bridge.pid();
        let rss_before = status_kb(pid, "VmRSS").unwrap_or(0);
        let hwm_before = status_kb(pid, "VmHWM").unwrap_or(0);
        let mut meta_sub = self
            .rt
            .block_on(async {
                let s = self.client.subscribe(format!("init.meta.{TABLE}")).await;
                self.client.flush().await.map(|_| s)
            })
            .expect("subscribe")
            .expect("subscribe");
        let threads_before: std::collections::HashMap<String, Rusage> =
            cpu_by_thread(pid).into_iter().collect();
        let cpu0 = cpu_of(pid).unwrap_or_default();
        let nats_pid = self.nats.pid().expect("nats-server runs");
        let nats_cpu0 = cpu_of(nats_pid).unwrap_or_default();

        let t0 = Instant::now();
        let reply = self
            .rt
            .block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    self.client
                        .request(format!("snapshot.request.{TABLE}"), "".into()),
                )
                .await
            })
            .expect("a snapshot reply within 10 s")
            .expect("a snapshot reply");
        let reply: Json = serde_json::from_slice(&reply.payload).expect("JSON reply");
        assert_eq!(reply["status"], "accepted", "snapshot request: {reply}");
        let id = reply["snapshot_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // Meanwhile: the bridge's memory, and each thread's CPU time (the snapshot's own
        // thread ends with it, so its last sample stands for it).
        let mut rss_peak = rss_before;
        let mut threads = threads_before.clone();
        let meta = loop {
            let got = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(20), meta_sub.next()).await
            });
            if let Ok(m) = got {
                break m.expect("meta subscription open");
            }
            rss_peak = rss_peak.max(status_kb(pid, "VmRSS").unwrap_or(0));
            for (name, cpu) in cpu_by_thread(pid) {
                threads.insert(name, cpu);
            }
            self.check_alive(&mut bridge, &log);
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "no snapshot meta after 10 minutes"
            );
        };
        let elapsed = t0.elapsed();
        let cpu = cpu_of(pid).unwrap_or_default();
        for (name, c) in cpu_by_thread(pid) {
            threads.insert(name, c);
        }
        let nats_cpu = cpu_of(nats_pid).unwrap_or_default().total() - nats_cpu0.total();
        let hwm = status_kb(pid, "VmHWM").unwrap_or(0);
        // The meta is on its subject as nats-server routes it, as it stores it; check it is
        // stored, and that it is this snapshot's and complete.
        let (stored, init_messages, init_bytes) = self.rt.block_on(async {
            let mut s = self.js.get_stream("INIT").await.expect("INIT stream");
            let m = s
                .get_last_raw_message_by_subject(&format!("init.meta.{TABLE}"))
                .await
                .expect("stored meta");
            let state = s.info().await.expect("INIT info").state.clone();
            (m.payload, state.messages, state.bytes)
        });
        assert_eq!(stored, meta.payload, "the stored meta is the one received");
        let meta_doc = rmpv::decode::read_value(&mut &meta.payload[..]).expect("MessagePack meta");
        let meta_field = |k: &str| {
            meta_doc
                .as_map()
                .and_then(|m| m.iter().find(|(key, _)| key.as_str() == Some(k)))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            meta_field("snapshot_id").and_then(|v| v.as_str().map(str::to_string)),
            Some(id.clone()),
            "meta of another snapshot"
        );
        assert_eq!(
            meta_field("row_count").and_then(|v| v.as_u64()),
            Some(rows),
            "snapshot row count"
        );
        let chunks = meta_field("batch_count")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        self.stop_bridge(bridge, &log);

        let n = rows as f64;
        let total_cpu = cpu.total().saturating_sub(cpu0.total());
        let mut by_thread: Vec<(String, Duration)> = threads
            .iter()
            .map(|(name, c)| {
                let before = threads_before
                    .get(name)
                    .map_or(Duration::ZERO, Rusage::total);
                (name.clone(), c.total().saturating_sub(before))
            })
            .filter(|(_, d)| *d > Duration::ZERO)
            .collect();
        by_thread.sort_by_key(|t| std::cmp::Reverse(t.1));
        json!({
            "snapshot_id": id,
            "what": "request on snapshot.request.snap_users -> init.meta.snap_users received (and then found stored in INIT), one bridge run",
            "seconds": secs(elapsed),
            "rows_per_s": round(n / elapsed.as_secs_f64(), 0),
            "chunks": chunks,
            "init_stream_messages": init_messages,
            "init_stream_bytes": init_bytes,
            "cpu_user_s": secs(cpu.user.saturating_sub(cpu0.user)),
            "cpu_sys_s": secs(cpu.sys.saturating_sub(cpu0.sys)),
            "cpu_us_per_row": round(total_cpu.as_secs_f64() * 1e6 / n, 3),
            "cpu_share_of_one_core": round(total_cpu.as_secs_f64() / elapsed.as_secs_f64(), 3),
            "threads_cpu_s": by_thread.iter().map(|(name, d)| (name.clone(), json!(secs(*d)))).collect::<serde_json::Map<_, _>>(),
            "nats_server_cpu_s": secs(nats_cpu),
            "rss_before_kb": rss_before,
            // VmHWM can trail a VmRSS sample by a few pages (the kernel syncs its RSS
            // counters lazily): the peak is the larger of the two.
            "peak_rss_kb": hwm.max(rss_peak),
            "vm_hwm_kb": hwm,
            "vm_hwm_before_kb": hwm_before,
            "rss_sampled_max_kb": rss_peak,
            "seconds_to_catch_up_before_request": secs(catch_up),
        })
    }
}

/// The commit -> PubAck histogram's observations between two scrapes of /metrics: count,
/// mean (exact, from the sum) and quantiles estimated from the buckets; `null` when the bridge
/// exports no such histogram.
fn histogram_figures(before: Option<&str>, after: Option<&str>) -> Json {
    let Some(after) = after.and_then(|t| nats::Histogram::parse(t, LATENCY_HISTOGRAM)) else {
        return Json::Null;
    };
    let before = before
        .and_then(|t| nats::Histogram::parse(t, LATENCY_HISTOGRAM))
        .unwrap_or_default();
    let h = after.since(&before);
    let ms = |s: f64| {
        if s.is_finite() {
            json!(round(s * 1e3, 3))
        } else {
            Json::Null
        }
    };
    json!({
        "name": LATENCY_HISTOGRAM,
        "what": "commit -> PubAck per change event, as the bridge observes it: the difference of two scrapes of /metrics around the run; p50/p99 estimated from the buckets (linear within a bucket), p99_bucket_ms are the bounds of the bucket the p99 falls in, max is the upper bound of the highest non-empty bucket, mean is exact",
        "count": h.count(),
        "p50_ms": ms(h.quantile(0.5)),
        "p99_ms": ms(h.quantile(0.99)),
        "p99_bucket_ms": h.bucket_of(0.99).map(|(lo, hi)| [ms(lo), ms(hi)]),
        "max_at_most_ms": ms(h.max_bound()),
        "mean_ms": ms(h.mean()),
        "share_within_10ms": h.share_within(0.01).map(|v| round(v, 5)),
        "cumulative_buckets_ms": h.buckets.iter().map(|(b, c)| json!([if b.is_finite() { json!(round(b * 1e3, 3)) } else { json!("+Inf") }, *c as u64])).collect::<Vec<_>>(),
    })
}

/// `streaming started in N ms` from a bridge log.
fn streaming_started_ms(log: &Path) -> Option<u64> {
    let text = fs::read_to_string(log).ok()?;
    text.lines().find_map(|l| {
        let rest = &l[l.find("streaming started in ")? + "streaming started in ".len()..];
        rest.split(' ').next()?.parse().ok()
    })
}

fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    )
}

fn machine(b: &Bench) -> Json {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_default();
    let mem_kb: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let version = |cmd: &mut Command| {
        cmd.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "memory_mb": mem_kb / 1024,
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "postgresql": b.pg.value("postgres", "SHOW server_version"),
        "nats_server": version(Command::new(
            std::env::var_os("NATS_SERVER_BIN").unwrap_or_else(|| "nats-server".into())
        ).arg("--version")),
        "bridge_commit": std::env::var("BENCH_COMMIT").unwrap_or_default(),
        "loadavg_at_start": b.loadavg_at_start,
        "loadavg_at_end": loadavg(),
    })
}

fn target(name: &str, target: &str, value: Json, met: Option<bool>) -> Json {
    json!({"name": name, "target": target, "value": value, "met": met})
}

fn targets(r: &Json) -> Json {
    let f = |v: &Json| v.as_f64();
    let tput = f(&r["streaming"]["ratio_to_pg_recvlogical"]);
    let cpu = f(&r["streaming"]["bridge"]["cpu_us_per_change"]);
    let rss_mb = f(&r["streaming"]["bridge"]["peak_rss_kb"]).map(|kb| kb / 1024.0);
    // The PubAck figure is the bridge's histogram; the consumer's stands in without one.
    let p99 = f(&r["latency"]["bridge_histogram"]["p99_ms"])
        .or_else(|| f(&r["latency"]["consumer"]["p99_ms"]));
    let snapshot = f(&r["snapshot"]["ratio"]);
    let start = f(&r["startup"]["median_ms"]);
    json!([
        target(
            "throughput vs pg_recvlogical",
            ">= 0.6",
            json!(tput),
            tput.map(|v| v >= 0.6)
        ),
        target(
            "bridge CPU per change (us)",
            "<= 2",
            json!(cpu),
            cpu.map(|v| v <= 2.0)
        ),
        target(
            "bridge peak RSS (MB)",
            "<= 16",
            json!(rss_mb.map(|v| round(v, 1))),
            rss_mb.map(|v| v <= 16.0)
        ),
        target(
            "commit -> PubAck p99 at 5000/s (ms)",
            "<= 10",
            json!(p99),
            p99.map(|v| v <= 10.0)
        ),
        target(
            "snapshot vs COPY",
            ">= 0.5",
            json!(snapshot),
            snapshot.map(|v| v >= 0.5)
        ),
        target(
            "start to streaming (ms, median)",
            "< 200",
            json!(start),
            start.map(|v| v < 200.0)
        ),
    ])
}

fn fmt_num(v: &Json, unit: &str) -> String {
    match v.as_f64() {
        Some(x) if x >= 1000.0 => format!("{} {unit}", group(x.round() as u64)),
        Some(x) => format!("{} {unit}", round(x, 3)),
        None => "n/a".into(),
    }
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn print_table(r: &Json) {
    let s = &r["streaming"];
    let l = &r["large_transaction"];
    let j = &r["jetstream_ceiling"];
    let lat = &r["latency"];
    let snap = &r["snapshot"];
    // (the phase a row belongs to, its cells); phases left out with --only print nothing.
    let rows: Vec<(&str, [String; 4])> = vec![
        (
            "streaming",
            [
                format!(
                    "streaming, {} small txns ({} changes)",
                    s["transactions"], s["changes"]
                ),
                fmt_num(&s["bridge"]["changes_per_s"], "ch/s"),
                format!(
                    "pg_recvlogical {}",
                    fmt_num(&s["ceiling"]["changes_per_s"], "ch/s")
                ),
                fmt_num(&s["ratio_to_pg_recvlogical"], ""),
            ],
        ),
        (
            "jetstream_ceiling",
            [
                "  same, vs JetStream publisher".into(),
                fmt_num(&s["bridge"]["changes_per_s"], "ch/s"),
                format!("async-nats {}", fmt_num(&j["messages_per_s"], "msg/s")),
                fmt_num(&s["ratio_to_jetstream"], ""),
            ],
        ),
        (
            "streaming",
            [
                "  bridge CPU per change".into(),
                fmt_num(&s["bridge"]["cpu_us_per_change"], "us"),
                format!(
                    "publisher alone {}",
                    fmt_num(&j["publisher_cpu_us_per_message"], "us")
                ),
                String::new(),
            ],
        ),
        (
            "streaming",
            [
                "  bridge peak RSS".into(),
                fmt_num(&s["bridge"]["peak_rss_kb"], "kB"),
                String::new(),
                String::new(),
            ],
        ),
        (
            "large_transaction",
            [
                format!("large txn ({} rows)", l["rows"]),
                fmt_num(&l["bridge"]["changes_per_s"], "ch/s"),
                format!(
                    "pg_recvlogical {}",
                    fmt_num(&l["ceiling"]["changes_per_s"], "ch/s")
                ),
                fmt_num(&l["ratio_to_pg_recvlogical"], ""),
            ],
        ),
        (
            "large_transaction",
            [
                "  bridge CPU per change / peak RSS".into(),
                format!(
                    "{} / {}",
                    fmt_num(&l["bridge"]["cpu_us_per_change"], "us"),
                    fmt_num(&l["bridge"]["peak_rss_kb"], "kB")
                ),
                String::new(),
                String::new(),
            ],
        ),
        (
            "latency",
            [
                format!(
                    "latency at {} ch/s, consumer, p50 / p99 / max",
                    lat["target_changes_per_s"]
                ),
                format!(
                    "{} / {} / {} ms",
                    lat["consumer"]["p50_ms"], lat["consumer"]["p99_ms"], lat["consumer"]["max_ms"]
                ),
                format!("{} msgs", lat["messages"]),
                String::new(),
            ],
        ),
        (
            "latency",
            [
                "  commit -> PubAck (bridge histogram, buckets)".into(),
                format!(
                    "{} / {} / <={} ms",
                    lat["bridge_histogram"]["p50_ms"],
                    lat["bridge_histogram"]["p99_ms"],
                    lat["bridge_histogram"]["max_at_most_ms"]
                ),
                format!(
                    "p99 bucket ({}, {}] ms",
                    lat["bridge_histogram"]["p99_bucket_ms"][0],
                    lat["bridge_histogram"]["p99_bucket_ms"][1]
                ),
                String::new(),
            ],
        ),
        (
            "latency",
            [
                "  PostgreSQL alone (2nd slot), p50 / p99 / max".into(),
                format!(
                    "{} / {} / {} ms",
                    lat["postgresql_only"]["p50_ms"],
                    lat["postgresql_only"]["p99_ms"],
                    lat["postgresql_only"]["max_ms"]
                ),
                String::new(),
                String::new(),
            ],
        ),
        (
            "latency",
            [
                "  minus PostgreSQL, per txn, p50 / p99 / max".into(),
                format!(
                    "{} / {} / {} ms",
                    lat["bridge_share"]["p50_ms"],
                    lat["bridge_share"]["p99_ms"],
                    lat["bridge_share"]["max_ms"]
                ),
                String::new(),
                String::new(),
            ],
        ),
        (
            "latency",
            [
                "  NATS ping (5 ms), p50 / p99 / max".into(),
                format!(
                    "{} / {} / {} ms",
                    lat["nats_ping"]["p50_ms"],
                    lat["nats_ping"]["p99_ms"],
                    lat["nats_ping"]["max_ms"]
                ),
                String::new(),
                String::new(),
            ],
        ),
        (
            "snapshot",
            [
                format!("snapshot ({} rows)", snap["rows"]),
                fmt_num(&snap["bridge"]["rows_per_s"], "rows/s"),
                format!("COPY {}", fmt_num(&snap["ceiling"]["rows_per_s"], "rows/s")),
                fmt_num(&snap["ratio"], ""),
            ],
        ),
        (
            "snapshot",
            [
                "  request to meta stored / chunks".into(),
                format!(
                    "{} / {}",
                    fmt_num(&snap["bridge"]["seconds"], "s"),
                    snap["bridge"]["chunks"]
                ),
                format!("COPY {}", fmt_num(&snap["ceiling"]["seconds"], "s")),
                String::new(),
            ],
        ),
        (
            "snapshot",
            [
                "  bridge CPU per row / share of a core".into(),
                format!(
                    "{} / {}",
                    fmt_num(&snap["bridge"]["cpu_us_per_row"], "us"),
                    fmt_num(&snap["bridge"]["cpu_share_of_one_core"], "")
                ),
                String::new(),
                String::new(),
            ],
        ),
        (
            "snapshot",
            [
                "  bridge peak RSS (before the request)".into(),
                format!(
                    "{} ({})",
                    fmt_num(&snap["bridge"]["peak_rss_kb"], "kB"),
                    fmt_num(&snap["bridge"]["rss_before_kb"], "kB")
                ),
                String::new(),
                String::new(),
            ],
        ),
        (
            "startup",
            [
                "start-up to first change, median / max".into(),
                format!(
                    "{} / {} ms",
                    r["startup"]["median_ms"], r["startup"]["max_ms"]
                ),
                String::new(),
                String::new(),
            ],
        ),
        (
            "startup",
            [
                "  PostgreSQL alone: login to first change".into(),
                format!("{} ms", r["startup"]["postgresql_only_median_ms"]),
                String::new(),
                String::new(),
            ],
        ),
    ];
    println!();
    println!(
        "{:<44} {:>24} {:>32} {:>6}",
        "figure", "bridge", "ceiling", "ratio"
    );
    for (_, row) in rows.iter().filter(|(phase, _)| !r[*phase].is_null()) {
        println!("{:<44} {:>24} {:>32} {:>6}", row[0], row[1], row[2], row[3]);
    }
    println!();
    println!(
        "{:<44} {:>10} {:>12} {:>5}",
        "DESIGN §7 target", "target", "value", "met"
    );
    for t in r["targets"].as_array().into_iter().flatten() {
        let met = match t["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "n/a",
        };
        let value = if t["value"].is_null() {
            "n/a".to_string()
        } else {
            t["value"].to_string()
        };
        println!(
            "{:<44} {:>10} {:>12} {:>5}",
            t["name"].as_str().unwrap_or(""),
            t["target"].as_str().unwrap_or(""),
            value,
            met
        );
    }
}
