//! The sink choice and the Kafka flags (`[kafka]`), and the overlay they give.

use std::collections::BTreeMap;

use clap::builder::BoolishValueParser;
use clap::Args;

use crate::config::kafka::{self, parse_property};
use crate::config::{KafkaOverlay, KafkaProperties, SinkKind};

use super::help::with_default;

/// Kafka flags (`[kafka]`), used with `--sink kafka`.
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Kafka (with --sink kafka)")]
pub(crate) struct KafkaArgs {
    /// `replication.sink`.
    #[arg(long, env = "BRIDGE_SINK", value_name = "SINK", global = true,
          help = with_default("Where changes go: NATS JetStream or Kafka", kafka::DEFAULT_SINK))]
    pub(crate) sink: Option<SinkKind>,

    /// `kafka.brokers`.
    #[arg(
        long,
        env = "KAFKA_BROKERS",
        value_name = "HOST:PORT",
        value_delimiter = ',',
        global = true,
        help = "Kafka bootstrap brokers, comma separated; required with --sink kafka"
    )]
    pub(crate) kafka_brokers: Option<Vec<String>>,

    /// `kafka.topic_prefix`.
    #[arg(long, env = "BRIDGE_TOPIC_PREFIX", value_name = "PREFIX", global = true,
          help = with_default("First part of every topic: {prefix}.{table}, or \
                               {prefix}.{schema}.{table} outside public", kafka::DEFAULT_TOPIC_PREFIX))]
    pub(crate) topic_prefix: Option<String>,

    /// `kafka.tombstones`.
    #[arg(long, env = "BRIDGE_KAFKA_TOMBSTONES", value_name = "BOOL", global = true,
          value_parser = BoolishValueParser::new(),
          help = with_default("Follow every DELETE with a tombstone (same key, null value) for \
                               compacted topics", kafka::DEFAULT_KAFKA_TOMBSTONES))]
    pub(crate) kafka_tombstones: Option<bool>,

    /// `kafka.exactly_once`.
    #[arg(long, env = "KAFKA_EXACTLY_ONCE", value_name = "BOOL", global = true,
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(),
          help = with_default("Exactly once for read_committed consumers: a transactional \
                               producer writes whole PostgreSQL transactions with their end \
                               position ({prefix}.pgbridge.positions); a restart skips what \
                               Kafka already committed", kafka::DEFAULT_KAFKA_EXACTLY_ONCE))]
    pub(crate) kafka_exactly_once: Option<bool>,

    /// `kafka.partitions`.
    #[arg(
        long,
        env = "BRIDGE_KAFKA_PARTITIONS",
        value_name = "N",
        global = true,
        help = "Partitions of the topics the bridge creates [default: the broker's num.partitions]"
    )]
    pub(crate) kafka_partitions: Option<u32>,

    /// `kafka.replication_factor`.
    #[arg(
        long,
        env = "BRIDGE_KAFKA_REPLICATION_FACTOR",
        value_name = "N",
        global = true,
        help = "Replication factor of the topics the bridge creates [default: the broker's \
                  default.replication.factor]"
    )]
    pub(crate) kafka_replication_factor: Option<u16>,

    /// `kafka.topic_config`.
    #[arg(long, env = "BRIDGE_KAFKA_TOPIC_CONFIG", value_name = "KEY=VALUE",
          value_delimiter = ';', value_parser = parse_property, global = true,
          help = "A topic setting of the topics the bridge creates, repeatable, e.g. \
                  min.insync.replicas=2 on a cluster; BRIDGE_KAFKA_TOPIC_CONFIG (read when no \
                  flag is given) takes several separated by ';'. They add to \
                  [kafka.topic_config] of the file. Existing topics are left as they are")]
    pub(crate) kafka_topic_config: Option<Vec<(String, String)>>,

    /// `kafka.properties`.
    #[arg(long, env = "KAFKA_PROPERTIES", value_name = "KEY=VALUE", value_delimiter = ';',
          value_parser = parse_property, global = true, hide_env_values = true,
          help = "A librdkafka property for the producer and the admin client (SASL, TLS, \
                  tuning), repeatable; KAFKA_PROPERTIES (read when no flag is given) takes \
                  several separated by ';'. They add to [kafka.properties] of the file. Values of *password*, *secret* and \
                  sasl.jaas.config keys are never printed")]
    pub(crate) kafka_property: Option<Vec<(String, String)>>,
}

impl KafkaArgs {
    /// The `[kafka]` overlay of one source; `take` picks a field's value when that source gave it.
    pub(crate) fn overlay(&self, take: &dyn Fn(&str) -> bool) -> KafkaOverlay {
        fn pick<T: Clone>(take: &dyn Fn(&str) -> bool, id: &str, v: &Option<T>) -> Option<T> {
            v.as_ref().filter(|_| take(id)).cloned()
        }
        KafkaOverlay {
            brokers: pick(take, "kafka_brokers", &self.kafka_brokers).map(|b| {
                b.iter()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            }),
            topic_prefix: pick(take, "topic_prefix", &self.topic_prefix),
            tombstones: pick(take, "kafka_tombstones", &self.kafka_tombstones),
            partitions: pick(take, "kafka_partitions", &self.kafka_partitions),
            exactly_once: pick(take, "kafka_exactly_once", &self.kafka_exactly_once),
            replication_factor: pick(
                take,
                "kafka_replication_factor",
                &self.kafka_replication_factor,
            ),
            topic_config: pick(take, "kafka_topic_config", &self.kafka_topic_config)
                .map(|p| KafkaProperties(p.into_iter().collect::<BTreeMap<_, _>>())),
            properties: pick(take, "kafka_property", &self.kafka_property)
                .map(|p| KafkaProperties(p.into_iter().collect::<BTreeMap<_, _>>())),
        }
    }
}
