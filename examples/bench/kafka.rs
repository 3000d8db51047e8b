//! The Kafka sink (`--sink kafka`, or `--kafka` with `--peer debezium`): one backlog drained
//! by `pg_recvlogical`, the bridge into a Kafka broker, and with the peer Debezium Server's
//! Kafka sink into the same broker, each from its own slot created before the workload.

use std::time::Instant;

use serde_json::{json, Value as Json};

use testkit::proc::{cpu_of, status_kb};
use testkit::KafkaServer;

use super::debezium::{DbzSink, Run, DBZ_KAFKA_SLOT};
use super::*;

/// How often the topic's end offsets are asked for: each ask is a new client (metadata and a
/// watermark request per partition), work this process should not do every 20 ms on 2 cores.
const KAFKA_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// The bridge's topic for `public.users` (`--topic-prefix` default `cdc`).
const BRIDGE_TOPIC: &str = "cdc.users";
/// The slot and topic prefix of the exactly-once run, beside the at-least-once run's.
const EOS_SLOT: &str = "bench_eos";
const EOS_PREFIX: &str = "eos";

/// `bridge_cdc_events_published_total`: with Kafka, the changes whose delivery (in
/// exactly-once mode, whose Kafka transaction) is confirmed.
fn published(http_port: u16) -> Option<u64> {
    let text = nats::http_get(http_port, "/metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix("bridge_cdc_events_published_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

impl Bench {
    pub(super) fn kafka(&mut self) -> Json {
        let peer = self.o.peer.is_some();
        say(self, "Kafka: starting a broker");
        // Debezium's producer relies on the broker creating its topic; the bridge creates its own.
        let broker = KafkaServer::start_in(&self.o.dir, &[("auto.create.topics.enable", "true")]);
        let txns = if peer { self.o.peer_txns } else { self.o.txns };
        let changes = txns * CHANGES_PER_TXN;
        if peer {
            self.reset_backlog(&[CEILING_SLOT, EOS_SLOT, DBZ_KAFKA_SLOT]);
        } else {
            self.reset_backlog(&[CEILING_SLOT, EOS_SLOT]);
        }
        say(
            self,
            &format!("Kafka: {txns} transactions with pgbench ({changes} changes)"),
        );
        let per_client = (txns / u64::from(self.o.clients)).to_string();
        let (gen, _) = self.pgbench(&["-t".into(), per_client]);
        let endpos = self.wal_lsn();
        say(self, "ceiling: pg_recvlogical drains the backlog");
        let options = ["proto_version=1", "publication_names=cdc_pub"];
        let ceiling = self.recvlogical(CEILING_SLOT, &endpos, &options, changes);

        say(self, "bridge drains the backlog into Kafka");
        self.bridge_env = vec![
            ("BRIDGE_SINK".into(), "kafka".into()),
            ("KAFKA_BROKERS".into(), broker.brokers()),
        ];
        let (proc, log) = self.spawn_bridge("kafka", "users");
        self.bridge_env.clear();
        let mut run = Run {
            proc,
            log,
            spawned: Instant::now(),
        };
        let count = |topic: &str| broker.end_offsets(topic).values().sum::<i64>().max(0) as u64;
        let bridge = self.watch(&mut run, changes, KAFKA_POLL, || count(BRIDGE_TOPIC));
        self.stop_bridge(run.proc, &run.log);

        say(
            self,
            "bridge drains the backlog into Kafka exactly once (--kafka-exactly-once)",
        );
        let _ = std::fs::remove_file(self.o.dir.join("bridge.lsn"));
        self.bridge_env = vec![
            ("BRIDGE_SINK".into(), "kafka".into()),
            ("KAFKA_BROKERS".into(), broker.brokers()),
            ("KAFKA_EXACTLY_ONCE".into(), "true".into()),
            ("BRIDGE_TOPIC_PREFIX".into(), EOS_PREFIX.into()),
        ];
        self.bridge_slot = Some(EOS_SLOT);
        let (proc, log) = self.spawn_bridge("kafka-eos", "users");
        self.bridge_env.clear();
        self.bridge_slot = None;
        let mut run = Run {
            proc,
            log,
            spawned: Instant::now(),
        };
        // Transaction markers take offsets too: count what the bridge has seen committed.
        let http_port = self.http_port;
        let mut exactly_once = self.watch(&mut run, changes, KAFKA_POLL, || {
            published(http_port).unwrap_or(0)
        });
        self.stop_bridge(run.proc, &run.log);
        // Its state file names its own slot: the next bridge run starts from [`SLOT`]'s.
        let _ = std::fs::remove_file(self.o.dir.join("bridge.lsn"));
        let stored = broker
            .client()
            .read_topic_isolated(&format!("{EOS_PREFIX}.users"), true)
            .len() as u64;
        exactly_once["read_committed_records"] = json!(stored);
        exactly_once["all_arrived"] = json!(stored == changes);

        let debezium = if peer {
            say(self, "Debezium Server drains the backlog into Kafka");
            let mut run = self.spawn_debezium(
                "kafka",
                DBZ_KAFKA_SLOT,
                &DbzSink::Kafka {
                    brokers: broker.brokers(),
                },
            );
            let r = self.watch(&mut run, changes, KAFKA_POLL, || {
                count("dbz_kafka.public.users")
            });
            let _ = run
                .proc
                .stop(libc::SIGTERM, std::time::Duration::from_secs(60));
            r
        } else {
            Json::Null
        };
        let f = |v: &Json| v.as_f64();
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => json!(round(a / b, 4)),
            _ => Json::Null,
        };
        json!({
            "transactions": txns,
            "changes": changes,
            "pgbench_seconds": secs(gen),
            "what": "spawn -> the topic's end offsets (all partitions) sum to the backlog's changes",
            "ceiling": ceiling,
            "bridge": bridge,
            "bridge_exactly_once": exactly_once,
            "exactly_once_ratio": ratio(f(&exactly_once["changes_per_s"]), f(&bridge["changes_per_s"])),
            "debezium": debezium,
            "ratio_to_pg_recvlogical": ratio(f(&bridge["changes_per_s"]), f(&ceiling["changes_per_s"])),
            "bridge_rate_vs_debezium": ratio(f(&bridge["changes_per_s"]), f(&debezium["changes_per_s"])),
            "cpu_ratio_to_debezium": ratio(f(&bridge["cpu_us_per_change"]), f(&debezium["cpu_us_per_change"])),
            "rss_ratio_to_debezium": ratio(f(&bridge["peak_rss_kb"]), f(&debezium["peak_rss_kb"])),
        })
    }
}

/// The admin token of the Kafka snapshot phase's bridge (POST /snapshots needs one).
const SNAPSHOT_TOKEN: &str = "bench-admin-token";

impl Bench {
    /// A snapshot of a `--snapshot-rows` table into its Kafka init topic, from
    /// `POST /snapshots/{table}` until the bridge logs it complete (its records acknowledged
    /// by the broker), against `COPY` of the same table to /dev/null in the same run.
    pub(super) fn kafka_snapshot(&mut self) -> Json {
        const TABLE: &str = "ksnap_users";
        let rows = self.o.snapshot_rows;
        say(self, "Kafka snapshot: starting a broker");
        let broker = KafkaServer::start_in(&self.o.dir, &[]);
        self.create_snapshot_table(TABLE, rows);
        say(
            self,
            "Kafka snapshot ceiling: COPY of the table to /dev/null",
        );
        let best = self.copy_ceiling(TABLE);
        self.pg.sql(
            DB,
            &format!("ALTER PUBLICATION {PUBLICATION} ADD TABLE {TABLE}"),
        );
        self.bridge_env = vec![
            ("BRIDGE_SINK".into(), "kafka".into()),
            ("KAFKA_BROKERS".into(), broker.brokers()),
            ("BRIDGE_ADMIN_TOKEN".into(), SNAPSHOT_TOKEN.into()),
        ];
        let (mut bridge, log) = self.spawn_bridge("kafka-snapshot", &format!("users,{TABLE}"));
        self.bridge_env.clear();
        self.wait_caught_up(&mut bridge, &log, "served on POST /snapshots/{table}");
        let pid = bridge.pid();
        let cpu0 = cpu_of(pid).unwrap_or_default();
        say(
            self,
            "Kafka snapshot: the bridge's snapshot into its init topic",
        );
        let t = Instant::now();
        match nats::http_post(
            self.http_port,
            &format!("/snapshots/{TABLE}"),
            Some(SNAPSHOT_TOKEN),
        ) {
            Some((202, _)) => {}
            other => panic!("POST /snapshots/{TABLE} was not accepted: {other:?}"),
        }
        let done = format!(" of public.{TABLE}: ");
        let deadline = Instant::now() + std::time::Duration::from_secs(600);
        let line = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains(&done)) {
                break l.to_string();
            }
            self.check_alive(&mut bridge, &log);
            assert!(
                Instant::now() < deadline,
                "the Kafka snapshot did not finish in 600 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let took = t.elapsed();
        let cpu = cpu_of(pid).unwrap_or_default();
        let hwm = status_kb(pid, "VmHWM").unwrap_or(0);
        self.stop_bridge(bridge, &log);
        let cpu_s = (cpu.total() - cpu0.total()).as_secs_f64();
        let rate = rows as f64 / took.as_secs_f64();
        let ceiling_rate = rows as f64 / best.as_secs_f64();
        json!({
            "rows": rows,
            "what": "POST /snapshots/{table} -> the bridge logs the snapshot complete (every record acknowledged with acks=all)",
            "ceiling": {
                "tool": format!("psql COPY (SELECT * FROM {TABLE}) TO STDOUT > /dev/null, best of 3"),
                "seconds": secs(best),
                "rows_per_s": round(ceiling_rate, 0),
            },
            "bridge": {
                "seconds": secs(took),
                "rows_per_s": round(rate, 0),
                "cpu_us_per_row": round(cpu_s * 1e6 / rows as f64, 3),
                "peak_rss_kb": hwm,
                "log_line": line,
            },
            "ratio": round(rate / ceiling_rate, 3),
        })
    }
}
