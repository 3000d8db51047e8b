//! The pgbridge benchmark (run it through `scripts/bench`).
//!
//! Sets up a throw-away PostgreSQL (wal_level=logical) and nats-server -js on random loopback
//! ports, runs the workloads of docs/benchmark.md and measures each figure together with its ceiling
//! in the same run:
//!
//! 1. streaming throughput: a pgbench backlog of small transactions (2 inserts + 1 update),
//!    drained by the bridge vs `pg_recvlogical` to /dev/null; then one large transaction;
//! 2. the JetStream ceiling: the same messages published by a minimal async-nats publisher
//!    (`examples/js_publish.rs`) with the same window and message ids;
//! 3. bridge CPU per change and peak RSS, from /proc;
//! 4. commit → PubAck latency at a steady rate, from the bridge's histogram on /metrics
//!    (scraped before and after the run), cross-checked by a consumer of `cdc.>`, beside
//!    PostgreSQL alone (a second slot), a core NATS ping and a JetStream ping (`jsping.rs`);
//! 5. snapshot: request → meta stored for a table in the INIT stream, with the bridge's CPU
//!    and peak RSS, vs `COPY ... TO STDOUT` of the same table to /dev/null;
//! 6. start-up: from spawn to the first change in the stream.
//!
//! Prints a table and writes the figures as JSON.
//!
//! With `--peer debezium` it runs instead the side-by-side with Debezium Server
//! (`debezium.rs`): the same backlog from slots created at the same position, a live run at a
//! fixed rate, and with `--kafka` both Kafka sinks into one broker; `--sink kafka` runs the
//! bridge's Kafka sink against `pg_recvlogical` (`kafka.rs`). Both write a chart (`chart.rs`).

mod chart;
mod debezium;
mod idle;
mod jsping;
mod kafka;
mod nats;
mod phases;
mod probe;
mod report;
mod threads;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use testkit::pg::init_script;
use testkit::proc::{cpu_by_thread, cpu_of, run, status_kb, Proc, Rusage};
use testkit::{free_port, NatsServer, PgServer};

use report::{machine, print_table, targets};

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
    idle_secs: u64,
    snapshot_rows: u64,
    startup_runs: u32,
    /// Phases to run (all when empty): streaming, jetstream, large, latency, idle, startup,
    /// snapshot.
    only: Vec<String>,
    /// Command line to run the bridge under (e.g. a profiler); figures are then not comparable.
    wrapper: Vec<String>,
    /// `--peer debezium`: Debezium Server's home (the unpacked dist) and the java to run it.
    peer: Option<debezium::Peer>,
    /// Transactions of the side-by-side and Kafka backlogs (3 changes each).
    peer_txns: u64,
    /// The side-by-side live run: changes per second and seconds.
    peer_rate: u64,
    peer_secs: u64,
    /// Where the chart goes.
    chart: PathBuf,
    /// `--chart-from FILE`: only write the chart of an earlier run's results.
    chart_from: Option<PathBuf>,
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
        idle_secs: 20,
        snapshot_rows: 1_000_000,
        startup_runs: 5,
        only: Vec::new(),
        peer: None,
        peer_txns: 100_000,
        peer_rate: 2_000,
        peer_secs: 20,
        chart: PathBuf::from("target/bench/chart.svg"),
        chart_from: None,
        wrapper: std::env::var("BENCH_BRIDGE_WRAPPER")
            .map(|w| w.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
    };
    let mut peer = false;
    let mut kafka = false;
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
            "--idle-secs" => o.idle_secs = num(value()),
            "--snapshot-rows" => o.snapshot_rows = num(value()),
            "--startup-runs" => o.startup_runs = num(value()) as u32,
            "--only" => o.only = value().split(',').map(str::to_string).collect(),
            "--peer" => match value().as_str() {
                "debezium" => peer = true,
                other => usage(&format!("unknown peer {other} (known: debezium)")),
            },
            "--kafka" => kafka = true,
            "--sink" => match value().as_str() {
                "kafka" => kafka = true,
                "nats" => {}
                other => usage(&format!("unknown sink {other} (nats or kafka)")),
            },
            "--peer-txns" => o.peer_txns = num(value()),
            "--peer-rate" => o.peer_rate = num(value()),
            "--peer-secs" => o.peer_secs = num(value()),
            "--chart" => o.chart = PathBuf::from(value()),
            "--chart-from" => o.chart_from = Some(PathBuf::from(value())),
            "--quick" => {
                o.txns = 20_000;
                o.big_rows = 100_000;
                o.latency_secs = 10;
                o.idle_secs = 10;
                o.snapshot_rows = 100_000;
                o.startup_runs = 3;
                o.peer_txns = 20_000;
                o.peer_secs = 10;
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    o.txns = o.txns.max(u64::from(o.clients)) / u64::from(o.clients) * u64::from(o.clients);
    o.peer_txns =
        o.peer_txns.max(u64::from(o.clients)) / u64::from(o.clients) * u64::from(o.clients);
    if peer {
        o.peer = Some(debezium::Peer::from_env().unwrap_or_else(|e| usage(&e)));
    }
    // The side-by-side and the Kafka runs replace the standard phases unless --only names them.
    if o.only.is_empty() && (peer || kafka) {
        if peer {
            o.only = vec!["peer".into(), "peer-live".into()];
        }
        if kafka {
            o.only.push("kafka".into());
            o.only.push("kafka-snapshot".into());
        }
    } else if o.only.is_empty() {
        // A plain run is the standard phases only: the Kafka phase starts a broker of its own.
        o.only = STANDARD_PHASES.iter().map(|p| p.to_string()).collect();
    }
    o
}

/// The phases of a run without `--only`, `--peer` or `--kafka`.
const STANDARD_PHASES: [&str; 7] = [
    "streaming",
    "jetstream",
    "large",
    "latency",
    "idle",
    "startup",
    "snapshot",
];

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("bench: {problem}");
    }
    eprintln!(
        "usage: bench [--dir DIR] [--out FILE] [--bridge PATH] [--txns N] [--clients N] \
         [--big-rows N] [--latency-secs N] [--latency-rate CHANGES_PER_S] [--idle-secs N] [--snapshot-rows N] \
         [--startup-runs N] [--only PHASE,...] [--quick]\n\
         \x20      [--peer debezium] [--kafka | --sink kafka] [--peer-txns N] [--peer-rate CHANGES_PER_S] \
         [--peer-secs N] [--chart FILE] [--chart-from RESULTS_JSON]\n\
         phases: streaming jetstream large latency idle startup snapshot; peer peer-live (--peer debezium); \
         kafka kafka-snapshot (--sink kafka, or --kafka with --peer debezium)\n\
         --peer debezium needs BENCH_DEBEZIUM_HOME and BENCH_JAVA (scripts/bench sets them)\n\
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
    /// Extra environment of the bridge (the Kafka sink's settings).
    bridge_env: Vec<(String, String)>,
    /// The bridge's slot when not [`SLOT`] (a second bridge run on the same backlog).
    bridge_slot: Option<&'static str>,
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
    if let Some(from) = &o.chart_from {
        // Only the picture, from an earlier run's results.
        let results: Json = serde_json::from_str(&fs::read_to_string(from).expect("read results"))
            .expect("results JSON");
        let svg = chart::svg(&results).unwrap_or_else(|| usage("no side-by-side figures in it"));
        fs::write(&o.chart, svg).expect("write chart");
        return;
    }
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
        bridge_env: Vec::new(),
        bridge_slot: None,
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
    let idle = if b.o.runs("idle") {
        b.idle(b.o.idle_secs)
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

    let peer = if b.o.runs("peer") && b.o.peer.is_some() {
        b.peer_backlog()
    } else {
        Json::Null
    };
    let peer_live = if b.o.runs("peer-live") && b.o.peer.is_some() {
        b.peer_live()
    } else {
        Json::Null
    };
    let kafka = if b.o.runs("kafka") {
        b.kafka()
    } else {
        Json::Null
    };
    let kafka_snapshot = if b.o.runs("kafka-snapshot") {
        b.kafka_snapshot()
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
            "idle_seconds": b.o.idle_secs,
            "snapshot_rows": b.o.snapshot_rows,
            "window": WINDOW,
        },
        "streaming": standard,
        "jetstream_ceiling": js_ceiling,
        "large_transaction": large,
        "latency": latency,
        "idle": idle,
        "snapshot": snapshot,
        "startup": startup,
    });
    // Only when run: the standard run's results keep their shape.
    for (key, value) in [
        ("peer", peer),
        ("peer_live", peer_live),
        ("kafka", kafka),
        ("kafka_snapshot", kafka_snapshot),
    ] {
        if !value.is_null() {
            results[key] = value;
        }
    }
    if results.get("peer").is_some() || results.get("kafka").is_some() {
        results["settings"]["peer_transactions"] = json!(b.o.peer_txns);
        results["settings"]["peer_live_changes_per_s"] = json!(b.o.peer_rate);
        results["settings"]["peer_live_seconds"] = json!(b.o.peer_secs);
    }
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
    // The standard table only when a standard phase ran.
    if [
        "streaming",
        "large_transaction",
        "latency",
        "idle",
        "snapshot",
        "startup",
    ]
    .iter()
    .any(|k| !results[*k].is_null())
    {
        print_table(&results);
    }
    debezium::print_table(&results);
    let ks = &results["kafka_snapshot"];
    if !ks.is_null() {
        println!(
            "\nsnapshot into Kafka ({} rows): {} rows/s, COPY {} rows/s, ratio {}; {} us CPU per row, peak RSS {} kB",
            ks["rows"], ks["bridge"]["rows_per_s"], ks["ceiling"]["rows_per_s"], ks["ratio"],
            ks["bridge"]["cpu_us_per_row"], ks["bridge"]["peak_rss_kb"]
        );
    }
    if let Some(svg) = chart::svg(&results) {
        if let Some(parent) = b.o.chart.parent() {
            fs::create_dir_all(parent).expect("chart dir");
        }
        fs::write(&b.o.chart, svg).expect("write chart");
        say(&b, &format!("chart written to {}", b.o.chart.display()));
    }
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
            .envs(self.bridge_env.iter().map(|(k, v)| (k, v)))
            .args([
                "--slot",
                self.bridge_slot.unwrap_or(SLOT),
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

    /// Waits until the bridge's log has a line containing `ready` and its slot has confirmed a
    /// change committed after that; the time it took. The walsender first re-reads the WAL
    /// from the slot's restart_lsn (after a large transaction, all of it: about 190 MB, most
    /// of a second, for the 1 000 000-row one), work that is no part of what the phase
    /// measures. The slot's confirmed position alone does not show the end of it: the
    /// previous bridge confirmed past that WAL already, so only a change newer than the
    /// re-read WAL, published and confirmed, proves the walsender is through it.
    fn wait_caught_up(&self, bridge: &mut Proc, log: &Path, ready: &str) -> Duration {
        let t0 = Instant::now();
        let mut marker: Option<String> = None;
        loop {
            match &marker {
                None if fs::read_to_string(log).unwrap_or_default().contains(ready) => {
                    self.pg.sql(
                        DB,
                        "INSERT INTO users (name, email) VALUES ('caught-up marker', 'marker@bench.invalid')",
                    );
                    marker = Some(self.wal_lsn());
                }
                None => {}
                Some(end) => {
                    let confirmed = self.pg.value(
                        DB,
                        &format!(
                            "SELECT confirmed_flush_lsn >= '{end}'::pg_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
                        ),
                    ) == "t";
                    if confirmed {
                        return t0.elapsed();
                    }
                }
            }
            self.check_alive(bridge, log);
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the bridge did not log {ready:?}, or confirm a change made after it, in 2 minutes"
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
        // For one large transaction: the time until its commit was read (nothing is published
        // before), the rest is publishing.
        let mut first_stored = None;
        let stored = loop {
            let n = self
                .rt
                .block_on(nats::stream_messages(&self.js, &mut stream, "CDC"));
            if n > 0 && first_stored.is_none() {
                first_stored = Some(t0.elapsed());
            }
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
            "seconds_to_first_stored": first_stored.map(secs),
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
            "nats_server_cpu_us_per_change": round(nats_cpu.as_secs_f64() * 1e6 / expected as f64, 3),
        })
    }
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
