//! The side-by-side with Debezium Server (`--peer debezium`): the same backlog drained by the
//! bridge, `pg_recvlogical` and Debezium Server's JetStream sink (JSON without and with
//! schemas), each from its own slot created at the same position before the workload; then a
//! live run of each at a fixed rate, commit -> receipt by a core NATS subscriber.
//!
//! Debezium Server runs from its unpacked distribution (`BENCH_DEBEZIUM_HOME`) with the java
//! in `BENCH_JAVA` (21 or newer) and `BENCH_JAVA_OPTS`; `scripts/bench` fetches the
//! distribution into a cache and finds the JDK.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value as Json};

use testkit::proc::{cpu_of, status_kb, Proc};
use testkit::{free_port, PG_SUPERUSER};

use super::*;

/// Slots of Debezium's runs, created with the bridge's before the workload.
pub(super) const DBZ_JSON_SLOT: &str = "dbz_json";
pub(super) const DBZ_SCHEMAS_SLOT: &str = "dbz_schemas";
pub(super) const DBZ_KAFKA_SLOT: &str = "dbz_kafka";
/// How often a JetStream stream's message count is asked for while a backlog drains.
const NATS_POLL: Duration = Duration::from_millis(20);
/// How long a consumer may take for a backlog before the run is given up.
const DRAIN_LIMIT: Duration = Duration::from_secs(900);

/// Debezium Server: where its distribution is unpacked and how to run its JVM.
pub struct Peer {
    home: PathBuf,
    runner: PathBuf,
    java: PathBuf,
    java_opts: Vec<String>,
}

impl Peer {
    pub fn from_env() -> Result<Peer, String> {
        let home = PathBuf::from(std::env::var_os("BENCH_DEBEZIUM_HOME").ok_or(
            "--peer debezium: BENCH_DEBEZIUM_HOME (Debezium Server's unpacked dist) is not set; run it through scripts/bench",
        )?);
        let runner = fs::read_dir(&home)
            .map_err(|e| format!("{}: {e}", home.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("debezium-server") && n.ends_with("-runner.jar"))
            })
            .ok_or_else(|| format!("no debezium-server-*-runner.jar in {}", home.display()))?;
        let java = PathBuf::from(std::env::var_os("BENCH_JAVA").unwrap_or_else(|| "java".into()));
        let java_opts = std::env::var("BENCH_JAVA_OPTS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        Ok(Peer {
            home,
            runner,
            java,
            java_opts,
        })
    }

    fn version(&self) -> String {
        self.runner
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .trim_start_matches("debezium-server-dist-")
            .trim_end_matches("-runner.jar")
            .to_string()
    }
}

/// Where a Debezium run sends its changes.
pub(super) enum DbzSink {
    /// Its `nats-jetstream` sink into a file-storage stream of its own.
    Nats { schemas: bool },
    /// Its `kafka` sink.
    Kafka { brokers: String },
}

/// A run of one consumer: what it is called in the results and chart, and its process.
pub(super) struct Run {
    pub proc: Proc,
    pub log: PathBuf,
    pub spawned: Instant,
}

impl Bench {
    /// The bridge's slot (again) and `others` created at the WAL's current end, nothing left of
    /// a previous run: the bridge's state file, its CDC stream, Debezium's offsets and streams.
    pub(super) fn reset_backlog(&mut self, others: &[&str]) {
        let _ = fs::remove_file(self.o.dir.join("bridge.lsn"));
        self.rt.block_on(async {
            for s in ["CDC", "DBZ_JSON", "DBZ_SCHEMAS"] {
                let _ = self.js.delete_stream(s).await;
            }
        });
        for tag in ["json", "schemas", "kafka"] {
            let _ = fs::remove_dir_all(self.o.dir.join(format!("debezium-{tag}")));
        }
        let slots: Vec<&str> = std::iter::once(SLOT)
            .chain(others.iter().copied())
            .collect();
        let list = slots
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(",");
        self.pg.sql(
            DB,
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name IN ({list})"
            ),
        );
        // One statement: every slot starts at the same point.
        let create = slots
            .iter()
            .map(|s| format!("pg_create_logical_replication_slot('{s}', 'pgoutput')"))
            .collect::<Vec<_>>()
            .join(", ");
        self.pg.sql(DB, &format!("SELECT {create}"));
    }

    /// Starts Debezium Server on `slot` with `sink`; its files under `{dir}/debezium-{tag}` (kept
    /// between runs of one tag, so a later run resumes from its offsets).
    pub(super) fn spawn_debezium(&mut self, tag: &str, slot: &str, sink: &DbzSink) -> Run {
        let peer = self.o.peer.as_ref().expect("--peer debezium");
        let run_dir = self.o.dir.join(format!("debezium-{tag}"));
        fs::create_dir_all(run_dir.join("config")).unwrap();
        fs::create_dir_all(run_dir.join("data")).unwrap();
        let prefix = format!("dbz_{tag}");
        let mut props = format!(
            "debezium.source.connector.class=io.debezium.connector.postgresql.PostgresConnector\n\
             debezium.source.offset.storage.file.filename={offsets}\n\
             debezium.source.offset.flush.interval.ms=1000\n\
             debezium.source.database.hostname=127.0.0.1\n\
             debezium.source.database.port={port}\n\
             debezium.source.database.user={user}\n\
             debezium.source.database.password={password}\n\
             debezium.source.database.dbname={DB}\n\
             debezium.source.topic.prefix={prefix}\n\
             debezium.source.table.include.list=public.users\n\
             debezium.source.plugin.name=pgoutput\n\
             debezium.source.slot.name={slot}\n\
             debezium.source.publication.name={PUBLICATION}\n\
             debezium.source.publication.autocreate.mode=disabled\n\
             debezium.source.snapshot.mode=no_data\n\
             debezium.format.key=json\n\
             debezium.format.value=json\n\
             quarkus.http.port={http}\n\
             quarkus.log.console.json=false\n\
             quarkus.log.level=INFO\n",
            offsets = run_dir.join("data/offsets.dat").display(),
            port = self.pg.port(),
            user = PG_SUPERUSER,
            password = self.pg.password(),
            http = free_port(),
        );
        match sink {
            DbzSink::Nats { schemas } => props.push_str(&format!(
                "debezium.format.key.schemas.enable={schemas}\n\
                 debezium.format.value.schemas.enable={schemas}\n\
                 debezium.sink.type=nats-jetstream\n\
                 debezium.sink.nats-jetstream.url={url}\n\
                 debezium.sink.nats-jetstream.create-stream=true\n\
                 debezium.sink.nats-jetstream.stream-name={stream}\n\
                 debezium.sink.nats-jetstream.subjects={prefix}.>\n\
                 debezium.sink.nats-jetstream.storage=file\n",
                url = self.nats.url(),
                stream = dbz_stream(tag),
            )),
            DbzSink::Kafka { brokers } => props.push_str(&format!(
                "debezium.format.key.schemas.enable=false\n\
                 debezium.format.value.schemas.enable=false\n\
                 debezium.sink.type=kafka\n\
                 debezium.sink.kafka.producer.bootstrap.servers={brokers}\n\
                 debezium.sink.kafka.producer.key.serializer=org.apache.kafka.common.serialization.StringSerializer\n\
                 debezium.sink.kafka.producer.value.serializer=org.apache.kafka.common.serialization.StringSerializer\n"
            )),
        }
        fs::write(run_dir.join("config/application.properties"), props).unwrap();
        let log = self
            .o
            .dir
            .join(format!("debezium-{tag}-{}.log", free_port()));
        let out = fs::File::create(&log).unwrap();
        let home = &peer.home;
        let classpath = format!(
            "{}:{}:{}",
            peer.runner.display(),
            home.join("config/lib").display(),
            home.join("lib/*").display()
        );
        let mut cmd = Command::new(&peer.java);
        cmd.args(&peer.java_opts)
            .arg("-cp")
            .arg(classpath)
            .arg("io.debezium.server.Main")
            // It reads config/application.properties from its working directory.
            .current_dir(&run_dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let spawned = Instant::now();
        let proc = Proc::spawn(&self.o.dir, "debezium", &mut cmd, libc::SIGTERM);
        Run { proc, log, spawned }
    }

    /// Waits until `count()` (asked every `poll`) reaches `expected`: the rate from spawn, the
    /// time to the first change, the process's CPU (in all, and from the first change on) and
    /// peak RSS; then whether exactly `expected` arrived, a second later.
    pub(super) fn watch(
        &self,
        run: &mut Run,
        expected: u64,
        poll: Duration,
        mut count: impl FnMut() -> u64,
    ) -> Json {
        let pid = run.proc.pid();
        let mut first = None;
        let mut cpu_at_first = Duration::ZERO;
        let done = loop {
            let n = count();
            if n > 0 && first.is_none() {
                first = Some(run.spawned.elapsed());
                cpu_at_first = cpu_of(pid).unwrap_or_default().total();
            }
            if n >= expected {
                break run.spawned.elapsed();
            }
            if let Some((code, _)) = run.proc.wait_timeout(Duration::ZERO) {
                panic!(
                    "{} exited with {code} after {n} of {expected} changes; log {}:\n{}",
                    run.proc.name,
                    run.log.display(),
                    log_tail(&run.log)
                );
            }
            assert!(
                run.spawned.elapsed() < DRAIN_LIMIT,
                "{} delivered {n} of {expected} changes in {DRAIN_LIMIT:?}; log {}",
                run.proc.name,
                run.log.display()
            );
            std::thread::sleep(poll);
        };
        let cpu = cpu_of(pid).unwrap_or_default();
        let hwm = status_kb(pid, "VmHWM").unwrap_or(0);
        std::thread::sleep(Duration::from_secs(1));
        let delivered = count();
        let first = first.unwrap_or(done);
        let streaming = done.saturating_sub(first);
        let n = expected as f64;
        json!({
            "changes": expected,
            "poll_ms": poll.as_millis() as u64,
            "delivered": delivered,
            "all_arrived": delivered == expected,
            "seconds": secs(done),
            "changes_per_s": round(n / done.as_secs_f64(), 0),
            "first_change_s": secs(first),
            "changes_per_s_after_first": round(n / streaming.as_secs_f64().max(1e-6), 0),
            "cpu_s": secs(cpu.total()),
            "cpu_s_to_first_change": secs(cpu_at_first),
            "cpu_us_per_change": round(cpu.total().as_secs_f64() * 1e6 / n, 3),
            "cpu_us_per_change_after_first": round(cpu.total().saturating_sub(cpu_at_first).as_secs_f64() * 1e6 / n, 3),
            "peak_rss_kb": hwm,
        })
    }

    fn stop_run(&self, mut run: Run) {
        if run
            .proc
            .stop(libc::SIGTERM, Duration::from_secs(60))
            .is_none()
        {
            panic!("{} did not stop; log {}", run.proc.name, run.log.display());
        }
    }

    /// Mean payload and stored bytes per message of a stream, from its first `sample` messages.
    fn message_sizes(&self, stream: &str, sample: u64) -> Json {
        self.rt.block_on(async {
            let Ok(mut s) = self.js.get_stream(stream).await else {
                return Json::Null;
            };
            let Ok(info) = s.info().await else {
                return Json::Null;
            };
            let state = info.state.clone();
            let mut bytes = 0usize;
            let mut n = 0usize;
            let mut example = Json::Null;
            for seq in state.first_sequence..state.first_sequence + sample.min(state.messages) {
                if let Ok(m) = s.get_raw_message(seq).await {
                    bytes += m.payload.len();
                    n += 1;
                    if example.is_null() {
                        example = match serde_json::from_slice::<Json>(&m.payload) {
                            Ok(v) => v,
                            Err(_) => rmpv::decode::read_value(&mut &m.payload[..])
                                .map(|v| json!(v.to_string()))
                                .unwrap_or(Json::Null),
                        };
                    }
                }
            }
            json!({
                "stream": stream,
                "messages": state.messages,
                "stored_bytes": state.bytes,
                "stored_bytes_per_message": round(state.bytes as f64 / state.messages.max(1) as f64, 1),
                "mean_payload_bytes": round(bytes as f64 / n.max(1) as f64, 1),
                "payloads_sampled": n,
                "first_message": example,
            })
        })
    }

    /// The same backlog through the bridge, `pg_recvlogical` and Debezium Server (JSON without
    /// and with schemas), one after the other, each from its own slot.
    pub(super) fn peer_backlog(&mut self) -> Json {
        let txns = self.o.peer_txns;
        let changes = txns * CHANGES_PER_TXN;
        self.reset_backlog(&[CEILING_SLOT, DBZ_JSON_SLOT, DBZ_SCHEMAS_SLOT]);
        say(
            self,
            &format!("side by side: {txns} transactions with pgbench ({changes} changes)"),
        );
        let per_client = (txns / u64::from(self.o.clients)).to_string();
        let (gen, _) = self.pgbench(&["-t".into(), per_client]);
        let endpos = self.wal_lsn();
        say(self, "ceiling: pg_recvlogical drains the backlog");
        let options = ["proto_version=1", "publication_names=cdc_pub"];
        let ceiling = self.recvlogical(CEILING_SLOT, &endpos, &options, changes);

        say(self, "bridge drains the backlog");
        let (proc, log) = self.spawn_bridge("peer", "users");
        let mut run = Run {
            proc,
            log,
            spawned: Instant::now(),
        };
        let mut cache = None;
        let bridge = self.watch(&mut run, changes, NATS_POLL, || {
            self.rt
                .block_on(nats::stream_messages(&self.js, &mut cache, "CDC"))
        });
        self.stop_run(run);
        let mut bridge = bridge;
        bridge["messages"] = self.message_sizes("CDC", 1000);

        let mut dbz = serde_json::Map::new();
        for (tag, slot, schemas) in [
            ("json", DBZ_JSON_SLOT, false),
            ("schemas", DBZ_SCHEMAS_SLOT, true),
        ] {
            say(
                self,
                &format!(
                    "Debezium Server drains the backlog (JetStream sink, JSON {} schemas)",
                    if schemas { "with" } else { "without" }
                ),
            );
            let mut run = self.spawn_debezium(tag, slot, &DbzSink::Nats { schemas });
            let stream = dbz_stream(tag);
            let mut cache = None;
            let mut r = self.watch(&mut run, changes, NATS_POLL, || {
                self.rt
                    .block_on(nats::stream_messages(&self.js, &mut cache, &stream))
            });
            self.stop_run(run);
            r["messages"] = self.message_sizes(&stream, 1000);
            dbz.insert(
                format!("json_{}", if schemas { "schemas" } else { "plain" }),
                r,
            );
        }
        let dbz = Json::Object(dbz);
        let f = |v: &Json| v.as_f64();
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => json!(round(a / b, 4)),
            _ => Json::Null,
        };
        let plain = &dbz["json_plain"];
        let rate_x = ratio(f(&bridge["changes_per_s"]), f(&plain["changes_per_s"]));
        let cpu_share = ratio(
            f(&bridge["cpu_us_per_change"]),
            f(&plain["cpu_us_per_change"]),
        );
        let rss_share = ratio(f(&bridge["peak_rss_kb"]), f(&plain["peak_rss_kb"]));
        let targets = json!([
            {"name": "rate vs Debezium (JSON, no schemas)", "target": ">= 5", "value": rate_x,
             "met": rate_x.as_f64().map(|v| v >= 5.0)},
            {"name": "CPU per change vs Debezium", "target": "<= 0.02", "value": cpu_share,
             "met": cpu_share.as_f64().map(|v| v <= 0.02)},
            {"name": "peak RSS vs Debezium", "target": "<= 0.02", "value": rss_share,
             "met": rss_share.as_f64().map(|v| v <= 0.02)},
        ]);
        json!({
            "transactions": txns,
            "changes": changes,
            "pgbench_seconds": secs(gen),
            "debezium_server": self.o.peer.as_ref().map(Peer::version),
            "java": java_version(&self.o.peer.as_ref().unwrap().java),
            "java_opts": self.o.peer.as_ref().unwrap().java_opts,
            "ceiling": ceiling,
            "bridge": bridge,
            "debezium": dbz,
            "bridge_rate_vs_pg_recvlogical": ratio(f(&bridge["changes_per_s"]), f(&ceiling["changes_per_s"])),
            "targets": targets,
        })
    }

    /// Each of the bridge and Debezium Server (JSON without schemas) alone at the same fixed
    /// rate: commit -> receipt by a core NATS subscriber on its subjects, and CPU per change.
    pub(super) fn peer_live(&mut self) -> Json {
        let rate = self.o.peer_rate;
        let secs_ = self.o.peer_secs;
        if self.js_stream_missing("DBZ_JSON") {
            // Without the backlog run first: its slot and offsets start here.
            self.reset_backlog(&[DBZ_JSON_SLOT]);
        }
        say(
            self,
            &format!("live: the bridge at {rate} changes/s for {secs_} s"),
        );
        let (proc, log) = self.spawn_bridge("peer-live", "users");
        let run = Run {
            proc,
            log,
            spawned: Instant::now(),
        };
        let bridge = self.live_run(run, "cdc.>", commit_us_bridge);
        say(
            self,
            &format!("live: Debezium Server at {rate} changes/s for {secs_} s"),
        );
        let run = self.spawn_debezium("json", DBZ_JSON_SLOT, &DbzSink::Nats { schemas: false });
        let dbz = self.live_run(run, "dbz_json.>", commit_us_debezium);
        let f = |v: &Json| v.as_f64();
        json!({
            "target_changes_per_s": rate,
            "seconds": secs_,
            "what": "each alone, one after the other: pgbench at a fixed rate; a core NATS subscriber on the consumer's subjects takes each message's receipt time minus its transaction's commit time (the bridge's commit_time, Debezium's source.ts_us); CPU of the consumer's process over the run per change received",
            "bridge": bridge,
            "debezium_json_plain": dbz,
            "cpu_ratio": match (f(&bridge["cpu_us_per_change"]), f(&dbz["cpu_us_per_change"])) {
                (Some(a), Some(b)) if b > 0.0 => json!(round(a / b, 4)),
                _ => Json::Null,
            },
        })
    }

    fn js_stream_missing(&self, name: &str) -> bool {
        self.rt.block_on(self.js.get_stream(name)).is_err()
    }

    /// One live run of a started consumer: waits until a marker row arrives (the consumer has
    /// started and caught up), then pgbench at the fixed rate; stops the consumer.
    fn live_run(
        &mut self,
        mut run: Run,
        subject: &str,
        commit_us: fn(&[u8]) -> Option<i64>,
    ) -> Json {
        let rate = self.o.peer_rate;
        let duration = self.o.peer_secs;
        let tps = rate.div_ceil(CHANGES_PER_TXN);
        let mut sub = self
            .rt
            .block_on(async {
                let s = self.client.subscribe(subject.to_string()).await;
                self.client.flush().await.map(|_| s)
            })
            .expect("subscribe")
            .expect("subscribe");
        // Ready: a marker row, inserted again every second until it arrives; then quiet.
        let t0 = Instant::now();
        let mut ready = None;
        let mut i = 0;
        while ready.is_none() {
            self.pg.sql(
                DB,
                &format!(
                    "INSERT INTO users (name, email) VALUES ('marker {i}', 'marker@example.com')"
                ),
            );
            i += 1;
            let got = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(1), sub.next()).await });
            if let Ok(Some(_)) = got {
                ready = Some(t0.elapsed());
            }
            if let Some((code, _)) = run.proc.wait_timeout(Duration::ZERO) {
                panic!(
                    "{} exited with {code}; log {}:\n{}",
                    run.proc.name,
                    run.log.display(),
                    log_tail(&run.log)
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(180),
                "{} not ready in 3 minutes",
                run.proc.name
            );
        }
        // The rest of the markers and whatever came before them.
        self.rt.block_on(async {
            while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
            }
        });
        let pid = run.proc.pid();
        let cpu0 = cpu_of(pid).unwrap_or_default();
        let clients = self.o.clients.to_string();
        let threads = self.o.clients.min(2).to_string();
        let mut cmd = self.pg.tool("pgbench", DB);
        cmd.args(["-n", "-M", "prepared", "-c", &clients, "-j", &threads, "-f"])
            .arg(self.o.dir.join("workload.sql"))
            .args(["--rate", &tps.to_string(), "-T", &duration.to_string(), DB])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let started = Instant::now();
        let mut pgbench = Proc::spawn(&self.o.dir, "pgbench", &mut cmd, libc::SIGTERM);
        let mut received: Vec<(i64, bytes::Bytes)> =
            Vec::with_capacity((rate * duration) as usize + 1024);
        let mut pgbench_done = false;
        let mut quiet_since = Instant::now();
        self.rt.block_on(async {
            loop {
                match tokio::time::timeout(Duration::from_millis(50), sub.next()).await {
                    Ok(Some(m)) => {
                        received.push((nats::now_unix_micros(), m.payload));
                        quiet_since = Instant::now();
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
                if !pgbench_done {
                    pgbench_done = pgbench.wait_timeout(Duration::ZERO).is_some();
                } else if quiet_since.elapsed() > Duration::from_secs(3) {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(duration + 180),
                    "live run does not end"
                );
            }
        });
        // The quiet tail is not the consumer's work: CPU up to the last message.
        let cpu = cpu_of(pid).unwrap_or_default().total() - cpu0.total();
        let hwm = status_kb(pid, "VmHWM").unwrap_or(0);
        let mut out = String::new();
        std::io::Read::read_to_string(pgbench.child.stdout.as_mut().unwrap(), &mut out).ok();
        let done_txns: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split(['/', ' ']).next()?.parse().ok())
            .unwrap_or(0);
        let mut ms: Vec<f64> = received
            .iter()
            .filter_map(|(now, p)| Some((now - commit_us(p)?) as f64 / 1000.0))
            .collect();
        ms.sort_by(f64::total_cmp);
        let n = received.len();
        self.stop_run(run);
        json!({
            "seconds_to_ready": secs(ready.unwrap_or_default()),
            "transactions": done_txns,
            "messages": n,
            "messages_expected": done_txns * CHANGES_PER_TXN,
            "all_arrived": n as u64 == done_txns * CHANGES_PER_TXN,
            "latencies": ms.len(),
            "p50_ms": round(nats::percentile(&ms, 50.0), 3),
            "p99_ms": round(nats::percentile(&ms, 99.0), 3),
            "max_ms": round(ms.last().copied().unwrap_or(f64::NAN), 3),
            "mean_ms": round(ms.iter().sum::<f64>() / ms.len().max(1) as f64, 3),
            "cpu_s": secs(cpu),
            "cpu_us_per_change": round(cpu.as_secs_f64() * 1e6 / n.max(1) as f64, 3),
            "cpu_share_of_one_core": round(cpu.as_secs_f64() / duration as f64, 3),
            "peak_rss_kb": hwm,
        })
    }
}

/// The stream Debezium's run `tag` stores into.
pub(super) fn dbz_stream(tag: &str) -> String {
    format!("DBZ_{}", tag.to_uppercase())
}

/// The commit time (µs since the epoch) of a bridge change event.
fn commit_us_bridge(payload: &[u8]) -> Option<i64> {
    nats::parse_commit_time(&nats::field(payload, "commit_time")?)
}

/// The commit time (µs since the epoch) of a Debezium change event: `source.ts_us`, else
/// `source.ts_ms`; under `payload` when the message has its schema.
fn commit_us_debezium(payload: &[u8]) -> Option<i64> {
    let v: Json = serde_json::from_slice(payload).ok()?;
    let body = if v["payload"].is_object() {
        &v["payload"]
    } else {
        &v
    };
    let source = &body["source"];
    source["ts_us"]
        .as_i64()
        .or_else(|| source["ts_ms"].as_i64().map(|ms| ms * 1000))
}

fn java_version(java: &Path) -> String {
    Command::new(java)
        .arg("-version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The side-by-side's table (nothing when it did not run).
pub(super) fn print_table(r: &Json) {
    let mut rows: Vec<(String, &Json)> = Vec::new();
    let p = &r["peer"];
    if !p.is_null() {
        rows.push((
            "pg_recvlogical (ceiling, to /dev/null)".into(),
            &p["ceiling"],
        ));
        rows.push(("bridge -> JetStream (MessagePack)".into(), &p["bridge"]));
        rows.push((
            "Debezium -> JetStream (JSON)".into(),
            &p["debezium"]["json_plain"],
        ));
        rows.push((
            "Debezium -> JetStream (JSON + schemas)".into(),
            &p["debezium"]["json_schemas"],
        ));
    }
    let k = &r["kafka"];
    if !k.is_null() {
        rows.push(("pg_recvlogical (Kafka run's ceiling)".into(), &k["ceiling"]));
        rows.push(("bridge -> Kafka".into(), &k["bridge"]));
        if !k["bridge_exactly_once"].is_null() {
            rows.push((
                "bridge -> Kafka, --kafka-exactly-once".into(),
                &k["bridge_exactly_once"],
            ));
        }
        if !k["debezium"].is_null() {
            rows.push(("Debezium -> Kafka (JSON)".into(), &k["debezium"]));
        }
    }
    if rows.is_empty() && r["peer_live"].is_null() {
        return;
    }
    let num = |v: &Json, digits: i32| {
        v.as_f64()
            .map(|x| round(x, digits).to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!();
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8}",
        "backlog", "changes/s", "CPU us/ch", "RSS MB", "first s", "msg B", "arrived"
    );
    for (name, v) in rows {
        println!(
            "{:<40} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8}",
            name,
            num(&v["changes_per_s"], 0),
            num(&v["cpu_us_per_change"], 2),
            v["peak_rss_kb"]
                .as_f64()
                .map(|kb| round(kb / 1024.0, 1).to_string())
                .unwrap_or_else(|| "-".into()),
            num(&v["first_change_s"], 2),
            num(&v["messages"]["mean_payload_bytes"], 0),
            match v["all_arrived"].as_bool() {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
    }
    let l = &r["peer_live"];
    if !l.is_null() {
        println!();
        println!(
            "{:<40} {:>10} {:>10} {:>10} {:>10} {:>8}",
            format!("live at {} changes/s", l["target_changes_per_s"]),
            "p50 ms",
            "p99 ms",
            "max ms",
            "CPU us/ch",
            "arrived"
        );
        for (name, v) in [
            ("bridge", &l["bridge"]),
            ("Debezium (JSON)", &l["debezium_json_plain"]),
        ] {
            println!(
                "{:<40} {:>10} {:>10} {:>10} {:>10} {:>8}",
                name,
                num(&v["p50_ms"], 2),
                num(&v["p99_ms"], 2),
                num(&v["max_ms"], 2),
                num(&v["cpu_us_per_change"], 2),
                match v["all_arrived"].as_bool() {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "-",
                }
            );
        }
    }
    for t in p["targets"].as_array().into_iter().flatten() {
        println!(
            "{:<40} {:>10} {:>12} {:>5}",
            t["name"].as_str().unwrap_or(""),
            t["target"].as_str().unwrap_or(""),
            t["value"],
            match t["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "n/a",
            }
        );
    }
}
