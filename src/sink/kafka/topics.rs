//! The topics: created when missing (partitions and replication factor configurable), and
//! checked once per run for settings that would break a guarantee.

use std::sync::Arc;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::telemetry::counters::NatsStats;

use super::{client_config, Context, KafkaSinkError, REQUEST_TIMEOUT};

/// The admin client of the sink.
pub(crate) struct Admin {
    client: AdminClient<Context>,
    partitions: Option<u32>,
    replication_factor: Option<u16>,
    /// Settings of the topics it creates.
    topic_config: Vec<(String, String)>,
    tombstones: bool,
}

impl Admin {
    pub(crate) fn new(
        kafka: &KafkaConfig,
        connection: Arc<NatsStats>,
    ) -> Result<Self, KafkaSinkError> {
        let client = client_config(kafka)
            .create_with_context(Context { connection })
            .map_err(KafkaSinkError::Config)?;
        Ok(Admin {
            client,
            partitions: kafka.partitions,
            replication_factor: kafka.replication_factor,
            topic_config: kafka
                .topic_config
                .0
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            tombstones: kafka.tombstones,
        })
    }

    /// The number of brokers in the cluster (a metadata request).
    pub(crate) fn broker_count(&self) -> Result<usize, KafkaError> {
        let md = self.client.inner().fetch_metadata(None, REQUEST_TIMEOUT)?;
        Ok(md.brokers().len())
    }

    /// The partition count of `topic` and the largest record batch it accepts
    /// (`max.message.bytes`, `None` when it cannot be read), creating the topic when missing
    /// and warning once about settings that break a guarantee.
    pub(crate) async fn ensure(&self, topic: &str) -> Result<(usize, Option<usize>), KafkaError> {
        self.ensure_with(topic, self.partitions, &[]).await
    }

    /// The positions topic of exactly-once delivery: one partition (its records are read
    /// back in order at start), compacted (only each key's last record matters), replicated
    /// as the other topics.
    pub(crate) async fn ensure_positions(
        &self,
        topic: &str,
    ) -> Result<(usize, Option<usize>), KafkaError> {
        self.ensure_with(topic, Some(1), &[("cleanup.policy", "compact")])
            .await
    }

    /// [`Admin::ensure`], creating a missing topic with `partitions` (`None`: the broker's
    /// default) instead of the configured count, and `configs` over the configured topic
    /// settings.
    pub(crate) async fn ensure_with(
        &self,
        topic: &str,
        partitions: Option<u32>,
        configs: &[(&str, &str)],
    ) -> Result<(usize, Option<usize>), KafkaError> {
        if let Some(n) = self.partitions_of(topic)? {
            return Ok((n, self.check(topic).await));
        }
        let partitions = partitions.map_or(-1, |p| p as i32);
        let replication = self.replication_factor.map_or(-1, i32::from);
        let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
        let configured = self
            .topic_config
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        for (k, v) in configured.chain(configs.iter().copied()) {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = self.client.create_topics([&new], &opts).await?;
        for r in results {
            match r {
                Ok(_) => log::info!("created Kafka topic {topic}"),
                // Created meanwhile by someone else: fine.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(KafkaError::AdminOp(code)),
            }
        }
        // The metadata of a new topic can take a moment to reach every broker.
        for _ in 0..50 {
            if let Some(n) = self.partitions_of(topic)? {
                return Ok((n, self.check(topic).await));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(KafkaError::AdminOp(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ))
    }

    /// The partition count of `topic`, `None` when it does not exist.
    pub(crate) fn partitions_of(&self, topic: &str) -> Result<Option<usize>, KafkaError> {
        let md = self
            .client
            .inner()
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len()))
    }

    /// Warns about an existing topic's settings that break a guarantee, and returns its
    /// `max.message.bytes`; a failed lookup is only logged (the settings are advice, not a
    /// condition of delivering).
    async fn check(&self, topic: &str) -> Option<usize> {
        let opts = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
        let spec = ResourceSpecifier::Topic(topic);
        let configs = match self.client.describe_configs([&spec], &opts).await {
            Ok(c) => c,
            Err(e) => {
                log::debug!("cannot read the settings of topic {topic}: {e}");
                return None;
            }
        };
        let brokers = self.broker_count().unwrap_or(1);
        let mut max_bytes = None;
        for resource in configs.into_iter().flatten() {
            let get = |name: &str| resource.get(name).and_then(|e| e.value.clone());
            max_bytes = get("max.message.bytes").and_then(|v| v.parse().ok());
            if !self.tombstones && get("cleanup.policy").is_some_and(|p| p.contains("compact")) {
                log::warn!(
                    "Kafka topic {topic} is compacted (cleanup.policy={}) but tombstones are off \
                     (--kafka-tombstones false): deleted rows keep their last record for good",
                    get("cleanup.policy").unwrap_or_default()
                );
            }
            let min_isr = get("min.insync.replicas").and_then(|v| v.parse::<u32>().ok());
            if brokers > 1 && min_isr.is_some_and(|m| m < 2) {
                log::warn!(
                    "Kafka topic {topic} has min.insync.replicas={} on a cluster of {brokers} \
                     brokers: a record acknowledged by one broker is lost if that broker fails; \
                     set min.insync.replicas=2 (with replication factor 3)",
                    min_isr.unwrap_or(1)
                );
            }
        }
        max_bytes
    }
}
