//! The measured phases: streaming throughput against its ceilings, the JetStream ceiling,
//! one large transaction, latency at a steady rate, start-up and snapshots.

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value as Json};

use testkit::proc::{cpu_by_thread, cpu_of, status_kb, Proc, Rusage};

use super::threads::{self, TaskSample};
use super::*;

impl Bench {
    pub(super) fn standard(&mut self) -> Json {
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

    pub(super) fn jetstream_ceiling(&mut self, standard: &Json) -> Json {
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
        say(
            self,
            "reference: the same messages as one JetStream fast-ingest batch (flow acks)",
        );
        let fast = self.js_publish("fast", expected);
        say(
            self,
            "reference: the same as one fast-ingest batch, each message expecting the one before",
        );
        let chained = self.js_publish("fast-chained", expected);
        let mut r = api.clone();
        r["core_publish_reference"] = core;
        r["fast_batch_reference"] = fast;
        r["fast_batch_chained_reference"] = chained;
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
        .args(["--window", &WINDOW.to_string()])
        // `fast-chained`: the bridge's headers, `Nats-Expected-Last-Msg-Id` included.
        .args(match mode {
            "fast-chained" => vec!["--mode", "fast", "--chain"],
            _ => vec!["--mode", mode],
        })
        .args(
            self.nats
                .pid()
                .map(|p| ["--server-pid".to_string(), p.to_string()])
                .into_iter()
                .flatten(),
        )
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
        if !r["skipped"].is_null() {
            return r;
        }
        assert_eq!(r["messages"].as_u64(), Some(expected));
        let n = expected as f64;
        json!({
            "client": match mode {
                "core" => "async-nats Client::publish_with_reply_and_headers, one ack inbox subscription",
                "fast" => "plain publishes in one fast-ingest batch (gap mode fail), a flow ack every N messages",
                "fast-chained" => "the same, every message but the first with Nats-Expected-Last-Msg-Id (the one before), as the bridge's",
                _ => "async-nats jetstream::Context::send_publish (as the bridge)",
            },
            "messages": r["messages"],
            "payload_bytes": r["payload_bytes"],
            "mean_payload_bytes": round(r["payload_bytes"].as_f64().unwrap() / n, 1),
            "seconds": r["seconds"],
            "messages_per_s": round(r["rate"].as_f64().unwrap(), 0),
            "window": WINDOW,
            "publisher_cpu_s": r["cpu_seconds"],
            "publisher_cpu_us_per_message": round(r["cpu_seconds"].as_f64().unwrap() * 1e6 / n, 3),
            "nats_server_cpu_s": r["server_cpu_seconds"],
            "nats_server_cpu_us_per_message": r["server_cpu_seconds"].as_f64().map(|s| round(s * 1e6 / n, 3)),
        })
    }

    pub(super) fn large(&mut self) -> Json {
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

    pub(super) fn latency(&mut self) -> Json {
        let rate = self.o.latency_rate;
        let duration = self.o.latency_secs;
        let tps = rate.div_ceil(CHANGES_PER_TXN);
        say(
            self,
            &format!("latency: {rate} changes/s ({tps} tps) for {duration} s"),
        );
        // Steady state: the run starts once the walsender is past the WAL it re-reads.
        let reread = self.slot_reread_bytes();
        let (mut bridge, log) = self.spawn_bridge("latency", "users");
        let catch_up = self.wait_caught_up(&mut bridge, &log, "streaming started");
        let t0 = Instant::now();
        let cpu0 = cpu_of(bridge.pid()).unwrap_or_default();
        let threads0 = threads::sample(bridge.pid());
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
        // JetStream's share: the same every 5 ms, stored in a stream of its own.
        let js_ping = self.rt.block_on(jsping::JsPing::start(&self.js, "CDC"));
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
                    if pgbench_exit.is_some() {
                        js_ping.stop();
                    }
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
        let js_pings = self.rt.block_on(js_ping.finish());
        let mut js_ping_ms = js_pings.ms;
        js_ping_ms.sort_by(f64::total_cmp);
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
        let cpu_end = cpu_of(bridge.pid()).unwrap_or_default();
        let cpu = cpu_end.total() - cpu0.total();
        let threads = threads::since(&threads::sample(bridge.pid()), &threads0);
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
            "jetstream_ping": {
                "what": "a change-sized message with a Nats-Msg-Id every 5 ms into a stream of its own with the CDC stream's settings (file storage), publish -> PubAck one at a time, from the consumer's connection, same time",
                "stream": jsping::STREAM,
                "payload_bytes": jsping::PAYLOAD_BYTES,
                "pings": js_ping_ms.len(),
                "errors": js_pings.errors,
                "p50_ms": round(nats::percentile(&js_ping_ms, 50.0), 3),
                "p99_ms": round(nats::percentile(&js_ping_ms, 99.0), 3),
                "max_ms": round(js_ping_ms.last().copied().unwrap_or(f64::NAN), 3),
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
            "bridge_cpu_user_s": secs(cpu_end.user.saturating_sub(cpu0.user)),
            "bridge_cpu_sys_s": secs(cpu_end.sys.saturating_sub(cpu0.sys)),
            "bridge_threads": threads_per_change(&threads, n.max(1) as f64),
            "bridge_peak_rss_kb": hwm,
        })
    }

    pub(super) fn startup(&mut self) -> Json {
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

    pub(super) fn snapshot(&mut self) -> Json {
        let rows = self.o.snapshot_rows;
        say(
            self,
            &format!("snapshot ceiling: COPY of a {rows}-row table to /dev/null"),
        );
        self.create_snapshot_table("snap_users", rows);
        let best = self.copy_ceiling("snap_users");
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

    /// A `rows`-row, 7-column table like the streaming workload's, vacuumed and analysed.
    pub(super) fn create_snapshot_table(&self, table: &str, rows: u64) {
        self.pg.sql(
            DB,
            &format!(
                "CREATE TABLE {table} AS SELECT g::bigint AS id, 'user ' || g AS name, \
                 'user' || g || '@example.com' AS email, g % 1000 AS score, g % 2 = 0 AS active, \
                 now() AS created_at, now() AS updated_at FROM generate_series(1, {rows}) g"
            ),
        );
        self.pg.sql(DB, &format!("VACUUM ANALYZE {table}"));
    }

    /// The snapshot's ceiling: `COPY (SELECT * FROM table) TO STDOUT` into /dev/null, best of 3.
    pub(super) fn copy_ceiling(&self, table: &str) -> Duration {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let mut cmd = self.pg.tool("psql", DB);
            cmd.args(["-X", "-q", "-c"])
                .arg(format!("COPY (SELECT * FROM {table}) TO STDOUT"))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            let t = Instant::now();
            let status = cmd.status().expect("psql");
            assert!(status.success(), "COPY failed");
            best = best.min(t.elapsed());
        }
        best
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
        let (mut bridge, log) = self.spawn_bridge("snapshot", &format!("users,{TABLE}"));
        // Before the request: the table's creation is in the WAL the walsender re-reads.
        let catch_up = self.wait_caught_up(&mut bridge, &log, "snapshot requests served");
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
        let nats_rss_before = status_kb(nats_pid, "VmRSS").unwrap_or(0);

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
        // The meta is on its subject as nats-server routes it, which can be a moment before
        // the stream has stored it; check it is stored (looking again for up to 5 s), and
        // that it is this snapshot's and complete.
        let (init_messages, init_bytes) = self.rt.block_on(async {
            let mut s = self.js.get_stream("INIT").await.expect("INIT stream");
            let subject = format!("init.meta.{TABLE}");
            let looked = Instant::now();
            loop {
                let last = s.get_last_raw_message_by_subject(&subject).await;
                match last {
                    Ok(m) if m.payload == meta.payload => break,
                    _ if looked.elapsed() < Duration::from_secs(5) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(_) => panic!("the last stored meta is not the one received"),
                    Err(e) => panic!("the snapshot's meta is not stored after 5 s: {e}"),
                }
            }
            let state = s.info().await.expect("INIT info").state.clone();
            (state.messages, state.bytes)
        });
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
            "nats_server_rss_before_kb": nats_rss_before,
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

/// Per thread: CPU and context switches per change of `changes`, for the threads with a
/// figure above zero at three decimals.
fn threads_per_change(
    threads: &std::collections::BTreeMap<String, TaskSample>,
    changes: f64,
) -> Json {
    threads
        .iter()
        .filter_map(|(name, d)| {
            let us = round(d.cpu_ns as f64 / 1e3 / changes, 3);
            let switches = round(d.switches as f64 / changes, 3);
            (us > 0.0 || switches > 0.0).then(|| {
                (
                    name.clone(),
                    json!({"us_per_change": us, "switches_per_change": switches}),
                )
            })
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}
