//! The Kafka sink (`--sink kafka`, or `--kafka` with `--peer debezium`): one backlog drained
//! by `pg_recvlogical`, the bridge into a Kafka broker, and with the peer Debezium Server's
//! Kafka sink into the same broker, each from its own slot created before the workload.

use std::time::Instant;

use serde_json::{json, Value as Json};

use testkit::KafkaServer;

use super::debezium::{DbzSink, Run, DBZ_KAFKA_SLOT};
use super::*;

/// How often the topic's end offsets are asked for: each ask is a new client (metadata and a
/// watermark request per partition), work this process should not do every 20 ms on 2 cores.
const KAFKA_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// The bridge's topic for `public.users` (`--topic-prefix` default `cdc`).
const BRIDGE_TOPIC: &str = "cdc.users";

impl Bench {
    pub(super) fn kafka(&mut self) -> Json {
        let peer = self.o.peer.is_some();
        say(self, "Kafka: starting a broker");
        // Debezium's producer relies on the broker creating its topic; the bridge creates its own.
        let broker = KafkaServer::start_in(&self.o.dir, &[("auto.create.topics.enable", "true")]);
        let txns = if peer { self.o.peer_txns } else { self.o.txns };
        let changes = txns * CHANGES_PER_TXN;
        if peer {
            self.reset_backlog(&[CEILING_SLOT, DBZ_KAFKA_SLOT]);
        } else {
            self.reset_backlog(&[CEILING_SLOT]);
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
            "debezium": debezium,
            "ratio_to_pg_recvlogical": ratio(f(&bridge["changes_per_s"]), f(&ceiling["changes_per_s"])),
            "bridge_rate_vs_debezium": ratio(f(&bridge["changes_per_s"]), f(&debezium["changes_per_s"])),
            "cpu_ratio_to_debezium": ratio(f(&bridge["cpu_us_per_change"]), f(&debezium["cpu_us_per_change"])),
            "rss_ratio_to_debezium": ratio(f(&bridge["peak_rss_kb"]), f(&debezium["peak_rss_kb"])),
        })
    }
}
