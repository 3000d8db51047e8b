//! `[kafka]` and the sink choice (`replication.sink`): where changes go when the sink is Kafka.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::secret::REDACTED;

/// Where changes are delivered.
pub(crate) const DEFAULT_SINK: SinkKind = SinkKind::Nats;
/// First part of every Kafka topic name: `{prefix}.{table}`.
pub(crate) const DEFAULT_TOPIC_PREFIX: &str = "cdc";
/// Whether a DELETE is followed by a tombstone (same key, null value), so that log compaction
/// can remove the row's records.
pub(crate) const DEFAULT_KAFKA_TOMBSTONES: bool = true;
/// Whether the producer is transactional, writing whole PostgreSQL transactions and their end
/// position atomically (exactly once for read_committed consumers); off: at least once.
pub(crate) const DEFAULT_KAFKA_EXACTLY_ONCE: bool = false;
/// librdkafka's default `transaction.timeout.ms`, for the check of `message.timeout.ms`.
pub(super) const DEFAULT_TRANSACTION_TIMEOUT_MS: u64 = 60_000;
/// Kafka's own limit on a topic name's length.
const MAX_TOPIC_NAME: usize = 249;

/// The destination of the changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// NATS JetStream (the default).
    #[default]
    Nats,
    /// Apache Kafka.
    Kafka,
}

impl fmt::Display for SinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SinkKind::Nats => "nats",
            SinkKind::Kafka => "kafka",
        })
    }
}

/// librdkafka properties passed to the producer and the admin client as they are. Values of
/// keys that name a secret print, debug and serialize as `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(pub BTreeMap<String, String>);

impl KafkaProperties {
    /// Every property, values in clear, for the one place that hands them to librdkafka.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn expose(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The properties of `self` not given in `later`, added to it: flags and environment add
    /// to (and override single keys of) the file's properties rather than replacing them all.
    pub(crate) fn fill_from(&self, later: &mut KafkaProperties) {
        for (k, v) in &self.0 {
            later.0.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }

    /// The properties with secret values replaced by `***`.
    fn redacted(&self) -> BTreeMap<&str, &str> {
        self.0
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) {
                    REDACTED
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect()
    }
}

/// True for the librdkafka properties that hold a secret: every `*password*`, `*secret*`,
/// the SASL JAAS configuration, PEM keys and the OAUTHBEARER configuration.
pub(crate) fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "key.pem",
        "oauthbearer.config",
    ]
    .iter()
    .any(|s| key.contains(s))
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.redacted()).finish()
    }
}

impl Serialize for KafkaProperties {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.redacted().serialize(serializer)
    }
}

/// Values may be written as TOML strings, integers or booleans (`linger.ms = 5`); librdkafka
/// takes them all as text.
impl<'de> Deserialize<'de> for KafkaProperties {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Int(i64),
            Float(f64),
            Bool(bool),
        }
        let map = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
        Ok(KafkaProperties(
            map.into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        Scalar::Text(s) => s,
                        Scalar::Int(i) => i.to_string(),
                        Scalar::Float(x) => x.to_string(),
                        Scalar::Bool(b) => b.to_string(),
                    };
                    (k, v)
                })
                .collect(),
        ))
    }
}

/// Parses `key=value` (a `--kafka-property` flag).
pub(crate) fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err("expected key=value, e.g. security.protocol=SASL_SSL".into()),
    }
}

/// The Kafka sink (`[kafka]`), used with `--sink kafka`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// First part of every topic name.
    pub topic_prefix: String,
    /// Whether a DELETE is followed by a tombstone.
    pub tombstones: bool,
    /// Partitions of the topics the bridge creates (`None`: the broker's `num.partitions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// Replication factor of the topics the bridge creates (`None`: the broker's
    /// `default.replication.factor`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<u16>,
    /// Topic settings of the topics the bridge creates (`min.insync.replicas`,
    /// `cleanup.policy`, `retention.ms`, ...); existing topics are left as they are.
    pub topic_config: KafkaProperties,
    /// A transactional producer: each Kafka transaction holds whole PostgreSQL transactions
    /// and the end position of the last, written to `{prefix}.pgbridge.positions`.
    pub exactly_once: bool,
    /// Further librdkafka properties (SASL, TLS, tuning).
    pub properties: KafkaProperties,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: Vec::new(),
            topic_prefix: DEFAULT_TOPIC_PREFIX.to_owned(),
            tombstones: DEFAULT_KAFKA_TOMBSTONES,
            partitions: None,
            replication_factor: None,
            topic_config: KafkaProperties::default(),
            exactly_once: DEFAULT_KAFKA_EXACTLY_ONCE,
            properties: KafkaProperties::default(),
        }
    }
}

/// Properties the bridge sets itself, and why a user may not change them.
pub(super) const RESERVED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "use --kafka-brokers / KAFKA_BROKERS"),
    (
        "metadata.broker.list",
        "use --kafka-brokers / KAFKA_BROKERS",
    ),
    (
        "enable.idempotence",
        "the bridge needs the idempotent producer to keep each row's changes in order",
    ),
    (
        "acks",
        "the bridge confirms a position only once every in-sync replica has the records (acks=all)",
    ),
    (
        "request.required.acks",
        "see acks: the bridge sets acks=all",
    ),
    (
        "transactional.id",
        "the bridge sets none at least once, and derives it from the system identifier and \
         slot with --kafka-exactly-once (so a restarted bridge fences its predecessor)",
    ),
];

/// A topic prefix: Kafka topic characters (`A-Z a-z 0-9 . _ -`), leaving room for the table.
pub(super) fn check_topic_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("is empty".into());
    }
    if prefix.len() > MAX_TOPIC_NAME / 2 {
        return Err(format!(
            "is longer than {} characters; topic names are limited to {MAX_TOPIC_NAME}",
            MAX_TOPIC_NAME / 2
        ));
    }
    if let Some(c) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "'{prefix}' contains {c:?}; topic names allow only A-Z, a-z, 0-9, '.', '_' and '-'"
        ));
    }
    if prefix.starts_with('.') || prefix.ends_with('.') {
        return Err(format!("'{prefix}' must not start or end with '.'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(brokers: &[&str]) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.iter().map(|b| b.to_string()).collect(),
            ..KafkaConfig::default()
        }
    }

    #[test]
    fn secret_properties_are_redacted() {
        let mut p = KafkaProperties::default();
        for (k, v) in [
            ("sasl.password", "hunter2"),
            ("ssl.key.password", "kpass"),
            ("ssl.keystore.password", "kspass"),
            ("sasl.oauthbearer.client.secret", "csecret"),
            ("sasl.jaas.config", "jaasv"),
            ("ssl.key.pem", "pemv"),
            ("sasl.username", "alice"),
        ] {
            p.0.insert(k.into(), v.into());
        }
        let debug = format!("{p:?}");
        let toml = toml::to_string(&KafkaConfig {
            properties: p.clone(),
            ..kafka(&["b:9092"])
        })
        .unwrap();
        for text in [&debug, &toml] {
            for secret in ["hunter2", "kpass", "kspass", "csecret", "jaasv", "pemv"] {
                assert!(!text.contains(secret), "{secret} shown in {text}");
            }
            assert!(text.contains("alice"), "{text}");
        }
    }

    #[test]
    fn file_values_of_any_scalar_type_become_text() {
        let p: KafkaProperties = toml::from_str(
            "\"linger.ms\" = 5\n\"socket.nagle.disable\" = true\n\"client.id\" = \"x\"",
        )
        .unwrap();
        assert_eq!(p.0["linger.ms"], "5");
        assert_eq!(p.0["socket.nagle.disable"], "true");
        assert_eq!(p.0["client.id"], "x");
    }

    #[test]
    fn validation() {
        assert!(KafkaConfig::default().validate(SinkKind::Nats).is_ok());
        let e = kafka(&["b:9092"]).validate(SinkKind::Nats).unwrap_err();
        assert!(e.to_string().contains("--sink kafka"), "{e}");
        if !cfg!(feature = "kafka") {
            return;
        }
        let e = KafkaConfig::default()
            .validate(SinkKind::Kafka)
            .unwrap_err();
        assert!(e.to_string().contains("required"), "{e}");
        assert!(kafka(&["b:9092"]).validate(SinkKind::Kafka).is_ok());
        assert!(kafka(&["kafka://b:9092"])
            .validate(SinkKind::Kafka)
            .is_err());
        for (k, v, ok) in [
            ("enable.idempotence", "false", false),
            ("enable.idempotence", "true", true),
            ("acks", "1", false),
            ("acks", "all", true),
            ("bootstrap.servers", "x:1", false),
            ("transactional.id", "t", false),
            ("security.protocol", "SASL_SSL", true),
        ] {
            let mut c = kafka(&["b:9092"]);
            c.properties.0.insert(k.into(), v.into());
            assert_eq!(c.validate(SinkKind::Kafka).is_ok(), ok, "{k}={v}");
        }
        for (key, ok) in [("min.insync.replicas", true), ("", false), ("a b", false)] {
            let mut c = kafka(&["b:9092"]);
            c.topic_config.0.insert(key.into(), "2".into());
            assert_eq!(c.validate(SinkKind::Kafka).is_ok(), ok, "{key:?}");
        }
        for (prefix, ok) in [
            ("cdc", true),
            ("a.b-c_d", true),
            ("", false),
            ("a b", false),
            (".a", false),
        ] {
            let c = KafkaConfig {
                topic_prefix: prefix.into(),
                ..kafka(&["b:9092"])
            };
            assert_eq!(c.validate(SinkKind::Kafka).is_ok(), ok, "{prefix:?}");
        }
    }

    #[test]
    fn exactly_once_refuses_contradicting_properties() {
        if !cfg!(feature = "kafka") {
            return;
        }
        let eos = |props: &[(&str, &str)]| {
            let mut c = KafkaConfig {
                exactly_once: true,
                ..kafka(&["b:9092"])
            };
            for (k, v) in props {
                c.properties.0.insert((*k).into(), (*v).into());
            }
            c.validate(SinkKind::Kafka)
        };
        assert!(eos(&[]).is_ok());
        assert!(eos(&[("message.timeout.ms", "30000")]).is_ok());
        assert!(eos(&[
            ("message.timeout.ms", "120000"),
            ("transaction.timeout.ms", "180000")
        ])
        .is_ok());
        for props in [
            &[("transactional.id", "mine")][..],
            &[("enable.idempotence", "false")],
            &[("message.timeout.ms", "120000")],
            &[("delivery.timeout.ms", "90000")],
            &[
                ("message.timeout.ms", "5000"),
                ("transaction.timeout.ms", "1000"),
            ],
            &[("message.timeout.ms", "soon")],
        ] {
            let e = eos(props).unwrap_err().to_string();
            assert!(!e.contains('\n'), "one line: {e}");
            assert!(e.contains(props[0].0), "{props:?}: {e}");
        }
    }

    #[test]
    fn flag_properties_add_to_the_file_ones() {
        let file = KafkaProperties(BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "1".to_string()),
        ]));
        let mut flags = KafkaProperties(BTreeMap::from([("b".to_string(), "2".to_string())]));
        file.fill_from(&mut flags);
        assert_eq!(flags.0["a"], "1");
        assert_eq!(flags.0["b"], "2");
        assert_eq!(parse_property("x=a=b").unwrap(), ("x".into(), "a=b".into()));
        assert!(parse_property("=v").is_err());
        assert!(parse_property("novalue").is_err());
    }
}
