//! `validate()`: every field's range and the relations between fields. Each error names the
//! field (and, through [`ConfigError`], the flag and environment variable that set it).

use std::collections::HashSet;
use std::path::PathBuf;

use super::error::{invalid, ConfigError};
use super::kafka::{
    check_topic_prefix, KafkaConfig, SinkKind, DEFAULT_TRANSACTION_TIMEOUT_MS, RESERVED_PROPERTIES,
};
use super::names::{
    check_id_namespace, check_identifier, check_inbox_prefix, check_reply_prefix, check_slot_name,
    check_stream_name, check_table_name,
};
use super::nats::check_nkey_seed;
use super::replication::{
    Envelope, Format, MAX_BATCH_WAIT_MS, MAX_IN_FLIGHT_LIMIT, MAX_RING_CAPACITY, MIN_BYTE_BUDGET,
    MIN_RING_CAPACITY,
};
use super::sections::{MAX_SNAPSHOT_CHUNK_ROWS, MAX_SNAPSHOT_MAX_CONCURRENT, MAX_STREAM_REPLICAS};
use super::{
    Config, HttpConfig, MonitorConfig, NatsConfig, OutboxConfig, PgConfig, ReplicationConfig,
    Secret, SnapshotConfig, StreamsConfig,
};

impl Config {
    /// Checks every field and the relations between them. The first problem found is returned,
    /// naming the field, the flag and the environment variable that set it.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.postgres.validate()?;
        self.nats.validate()?;
        self.replication.validate()?;
        self.http.validate()?;
        self.monitor.validate()?;
        self.snapshot.validate()?;
        self.streams.validate()?;
        self.outbox.validate()?;
        self.kafka.validate(self.replication.sink)?;
        Ok(())
    }
}

impl OutboxConfig {
    /// Checks every field; see [`Config::validate`].
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for (table, qualified) in self.tables.iter().zip(self.qualified_tables()) {
            check_table_name(table).map_err(|r| invalid("outbox.tables", r))?;
            if !seen.insert(qualified) {
                return Err(invalid(
                    "outbox.tables",
                    format!("table '{table}' is listed twice"),
                ));
            }
        }
        let columns = [
            ("outbox.id_column", &self.id_column),
            ("outbox.aggregate_type_column", &self.aggregate_type_column),
            ("outbox.aggregate_id_column", &self.aggregate_id_column),
            ("outbox.event_type_column", &self.event_type_column),
            ("outbox.payload_column", &self.payload_column),
        ];
        for (field, name) in columns {
            if name.is_empty() {
                return Err(invalid(field, "a column name is empty"));
            }
        }
        Ok(())
    }
}

impl PgConfig {
    /// Checks every field; see [`Config::validate`].
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.hosts().any(str::is_empty) {
            return Err(invalid(
                "postgres.host",
                "is empty (or a host of its comma list is)",
            ));
        }
        if self.port.as_slice().contains(&0) {
            return Err(invalid("postgres.port", "must be 1-65535, not 0"));
        }
        let (hosts, ports) = (self.hosts().count(), self.port.as_slice().len());
        if ports != 1 && ports != hosts {
            return Err(invalid(
                "postgres.port",
                format!(
                    "gives {ports} ports for {hosts} hosts: give one port for all or one per host"
                ),
            ));
        }
        if self.user.is_empty() {
            return Err(invalid("postgres.user", "is empty"));
        }
        if self.dbname.is_empty() {
            return Err(invalid("postgres.dbname", "is empty"));
        }
        if self.connect_timeout_secs == 0 {
            return Err(invalid(
                "postgres.connect_timeout_secs",
                "must be at least 1 (0 would wait forever)",
            ));
        }
        // libpq's own value for the system's CA store, not a file.
        let rootcert = self
            .sslrootcert
            .as_ref()
            .filter(|p| p.as_os_str() != "system");
        check_file("postgres.sslrootcert", rootcert)?;
        check_file("postgres.sslcert", self.sslcert.as_ref())?;
        check_file("postgres.sslkey", self.sslkey.as_ref())?;
        match (&self.sslcert, &self.sslkey) {
            (Some(_), None) => {
                return Err(invalid(
                    "postgres.sslkey",
                    "postgres.sslcert is set but not its key; give both",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "postgres.sslcert",
                    "postgres.sslkey is set but not the certificate; give both",
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

impl NatsConfig {
    /// Checks every field; see `Config::validate`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.urls.is_empty() {
            return Err(invalid("nats.urls", "no NATS server given"));
        }
        self.servers()?;
        match (&self.user, &self.password) {
            (Some(user), _) if user.is_empty() => return Err(invalid("nats.user", "is empty")),
            (Some(_), None) => {
                return Err(invalid(
                    "nats.password",
                    "a NATS user is set but no password (set NATS_BRIDGE_PASSWORD)",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "nats.user",
                    "a NATS password is set but no user (set NATS_BRIDGE_USER)",
                ))
            }
            _ => {}
        }
        if self.token.as_ref().is_some_and(Secret::is_empty) {
            return Err(invalid("nats.token", "is empty"));
        }
        if let Some(seed) = &self.nkey_seed {
            check_nkey_seed(seed.expose()).map_err(|r| invalid("nats.nkey_seed", r))?;
        }
        self.auth()?;
        if self
            .creds_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("nats.creds_file", "is empty"));
        }
        check_inbox_prefix(&self.inbox_prefix).map_err(|r| invalid("nats.inbox_prefix", r))?;
        check_file("nats.nkey_file", self.nkey_file.as_ref())?;
        check_file("nats.tls_ca_file", self.tls_ca_file.as_ref())?;
        check_file("nats.tls_cert_file", self.tls_cert_file.as_ref())?;
        check_file("nats.tls_key_file", self.tls_key_file.as_ref())?;
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => Err(invalid(
                "nats.tls_key_file",
                "nats.tls_cert_file is set but not its key; give both",
            )),
            (None, Some(_)) => Err(invalid(
                "nats.tls_cert_file",
                "nats.tls_key_file is set but not the certificate; give both",
            )),
            _ => Ok(()),
        }
    }
}

impl ReplicationConfig {
    /// Checks every field; see [`Config::validate`].
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        check_slot_name(&self.slot).map_err(|r| invalid("replication.slot", r))?;
        check_identifier(&self.publication)
            .map_err(|r| invalid("replication.publication", format!("publication {r}")))?;
        let mut seen = HashSet::new();
        for table in &self.tables {
            check_table_name(table).map_err(|r| invalid("replication.tables", r))?;
            if !seen.insert(table.as_str()) {
                return Err(invalid(
                    "replication.tables",
                    format!("table '{table}' is listed twice"),
                ));
            }
        }
        if self.envelope == Envelope::Debezium && self.format != Format::Json {
            return Err(invalid(
                "replication.format",
                format!(
                    "{} cannot carry the Debezium envelope, which is JSON: use --format json \
                     (or leave --format out) with --envelope debezium",
                    self.format
                ),
            ));
        }
        if self.debezium_schemas && self.envelope != Envelope::Debezium {
            return Err(invalid(
                "replication.debezium_schemas",
                "applies to the Debezium envelope only: add --envelope debezium, or leave \
                 --debezium-schemas out",
            ));
        }
        if !self.ring_capacity.is_power_of_two()
            || !(MIN_RING_CAPACITY..=MAX_RING_CAPACITY).contains(&self.ring_capacity)
        {
            return Err(invalid(
                "replication.ring_capacity",
                format!(
                    "{} is not a power of two between {MIN_RING_CAPACITY} and {MAX_RING_CAPACITY}",
                    self.ring_capacity
                ),
            ));
        }
        if !(1..=MAX_IN_FLIGHT_LIMIT).contains(&self.max_in_flight) {
            return Err(invalid(
                "replication.max_in_flight",
                format!(
                    "{} is not between 1 and {MAX_IN_FLIGHT_LIMIT}",
                    self.max_in_flight
                ),
            ));
        }
        for (field, value) in [
            ("replication.ring_max_bytes", self.ring_max_bytes),
            ("replication.max_in_flight_bytes", self.max_in_flight_bytes),
        ] {
            if value < MIN_BYTE_BUDGET {
                return Err(invalid(
                    field,
                    format!("{value} bytes is less than the minimum of {MIN_BYTE_BUDGET}"),
                ));
            }
        }
        if self.reconnect_backoff_secs == 0 {
            return Err(invalid(
                "replication.reconnect_backoff_secs",
                "must be at least 1 second",
            ));
        }
        if self.standby_status_interval_secs == 0 {
            return Err(invalid(
                "replication.standby_status_interval_secs",
                "must be at least 1 second",
            ));
        }
        if self.batch_wait_ms > MAX_BATCH_WAIT_MS {
            return Err(invalid(
                "replication.batch_wait_ms",
                format!(
                    "{} ms is more than the maximum of {MAX_BATCH_WAIT_MS} ms",
                    self.batch_wait_ms
                ),
            ));
        }
        if self
            .state_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("replication.state_file", "is empty"));
        }
        if self
            .spool_dir
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("replication.spool_dir", "is empty"));
        }
        if self.wal_receive_timeout_secs > 0
            && self.wal_receive_timeout_secs <= 2 * self.standby_status_interval_secs
        {
            return Err(invalid(
                "replication.wal_receive_timeout_secs",
                format!(
                    "{} s is too short: it must be more than twice standby_status_interval_secs ({} s), or 0 for automatic",
                    self.wal_receive_timeout_secs, self.standby_status_interval_secs
                ),
            ));
        }
        if let Some(ns) = &self.id_namespace {
            check_id_namespace(ns).map_err(|r| invalid("replication.id_namespace", r))?;
        }
        Ok(())
    }
}

impl HttpConfig {
    /// Checks every field; see [`Config::validate`].
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.port == 0 {
            return Err(invalid("http.port", "must be 1-65535, not 0"));
        }
        if let Some(token) = &self.admin_token {
            if token.is_empty() {
                return Err(invalid(
                    "http.admin_token",
                    "is empty; leave it unset to refuse every admin request",
                ));
            }
            // An Authorization header cannot carry these, so such a token could never match.
            if token
                .expose()
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    "http.admin_token",
                    "contains whitespace or control characters",
                ));
            }
        }
        Ok(())
    }
}

impl MonitorConfig {
    /// Checks every field; see [`Config::validate`].
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.interval_secs == 0 {
            return Err(invalid(
                "monitor.interval_secs",
                "must be at least 1 second",
            ));
        }
        if self.lag_warn_bytes == 0 {
            return Err(invalid("monitor.lag_warn_bytes", "must be above 0"));
        }
        if self.lag_warn_bytes >= self.lag_critical_bytes {
            return Err(invalid(
                "monitor.lag_warn_bytes",
                format!(
                    "{} must be below monitor.lag_critical_bytes ({})",
                    self.lag_warn_bytes, self.lag_critical_bytes
                ),
            ));
        }
        Ok(())
    }
}

impl SnapshotConfig {
    /// Checks every field; see [`Config::validate`].
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_SNAPSHOT_CHUNK_ROWS).contains(&self.chunk_rows) {
            return Err(invalid(
                "snapshot.chunk_rows",
                format!(
                    "{} is not between 1 and {MAX_SNAPSHOT_CHUNK_ROWS}",
                    self.chunk_rows
                ),
            ));
        }
        if !(1..=MAX_SNAPSHOT_MAX_CONCURRENT).contains(&self.max_concurrent) {
            return Err(invalid(
                "snapshot.max_concurrent",
                format!(
                    "{} is not between 1 and {MAX_SNAPSHOT_MAX_CONCURRENT}",
                    self.max_concurrent
                ),
            ));
        }
        if let Err(reason) = check_reply_prefix(&self.reply_prefix) {
            return Err(invalid("snapshot.reply_prefix", reason));
        }
        Ok(())
    }
}

impl StreamsConfig {
    /// Checks every field; see [`Config::validate`].
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        check_stream_name(&self.cdc).map_err(|r| invalid("streams.cdc", r))?;
        check_stream_name(&self.init).map_err(|r| invalid("streams.init", r))?;
        if self.cdc == self.init {
            return Err(invalid(
                "streams.init",
                format!(
                    "the CDC and INIT streams must differ, both are '{}'",
                    self.cdc
                ),
            ));
        }
        if self.cdc_duplicate_window_secs == 0 {
            return Err(invalid(
                "streams.cdc_duplicate_window_secs",
                "must be at least 1 second; de-duplication of republished changes depends on it",
            ));
        }
        // JetStream itself refuses a duplicate window longer than the retention.
        if self.cdc_max_age_secs != 0 && self.cdc_duplicate_window_secs > self.cdc_max_age_secs {
            return Err(invalid(
                "streams.cdc_duplicate_window_secs",
                format!(
                    "{} is longer than streams.cdc_max_age_secs ({})",
                    self.cdc_duplicate_window_secs, self.cdc_max_age_secs
                ),
            ));
        }
        if !(1..=MAX_STREAM_REPLICAS).contains(&self.replicas) {
            return Err(invalid(
                "streams.replicas",
                format!(
                    "{} is not between 1 and {MAX_STREAM_REPLICAS}",
                    self.replicas
                ),
            ));
        }
        Ok(())
    }
}

/// A configured file must exist, so that a typo shows at start (and in `check-config`) rather
/// than as a TLS failure later.
fn check_file(field: &'static str, path: Option<&PathBuf>) -> Result<(), ConfigError> {
    match path {
        Some(p) if p.as_os_str().is_empty() => Err(invalid(field, "is empty")),
        Some(p) if !p.is_file() => Err(invalid(
            field,
            format!("{} does not exist or is not a file", p.display()),
        )),
        _ => Ok(()),
    }
}

impl KafkaConfig {
    /// Checks every field; `sink` is the configured sink (see [`super::Config::validate`]).
    pub(crate) fn validate(&self, sink: SinkKind) -> Result<(), ConfigError> {
        if sink == SinkKind::Nats {
            if *self != KafkaConfig::default() {
                return Err(invalid(
                    "kafka.brokers",
                    "Kafka settings ([kafka], --kafka-*, KAFKA_*) are given but the sink is nats: \
                     add --sink kafka (BRIDGE_SINK=kafka) or remove them",
                ));
            }
            return Ok(());
        }
        if !cfg!(feature = "kafka") {
            return Err(invalid(
                "replication.sink",
                "this bridge was built without Kafka support (cargo feature `kafka`); use the \
                 image or build that includes it",
            ));
        }
        if self.brokers.is_empty() {
            return Err(invalid(
                "kafka.brokers",
                "is required with --sink kafka: the bootstrap brokers as host:port, comma separated",
            ));
        }
        for b in &self.brokers {
            if b.contains("://") || b.contains(char::is_whitespace) {
                return Err(invalid(
                    "kafka.brokers",
                    format!("'{b}' is not host:port (no scheme: set security.protocol with --kafka-property)"),
                ));
            }
        }
        check_topic_prefix(&self.topic_prefix).map_err(|r| invalid("kafka.topic_prefix", r))?;
        if self.partitions == Some(0) {
            return Err(invalid("kafka.partitions", "must be at least 1"));
        }
        if self.replication_factor == Some(0) {
            return Err(invalid("kafka.replication_factor", "must be at least 1"));
        }
        if let Some(key) = self
            .topic_config
            .0
            .keys()
            .find(|k| k.is_empty() || k.contains(char::is_whitespace))
        {
            return Err(invalid(
                "kafka.topic_config",
                format!("'{key}' is not a topic setting name (e.g. min.insync.replicas=2)"),
            ));
        }
        for (key, value) in &self.properties.0 {
            if key.is_empty() {
                return Err(invalid("kafka.properties", "a property name is empty"));
            }
            if let Some((_, why)) = RESERVED_PROPERTIES.iter().find(|(k, _)| k == key) {
                let allowed = match key.as_str() {
                    "enable.idempotence" => value == "true",
                    "acks" | "request.required.acks" => value == "all" || value == "-1",
                    _ => false,
                };
                if !allowed {
                    return Err(invalid(
                        "kafka.properties",
                        format!("{key} cannot be set: {why}"),
                    ));
                }
            }
        }
        if self.exactly_once {
            self.check_exactly_once()?;
        }
        Ok(())
    }

    /// Properties that contradict a transactional producer: a record may not outlive the
    /// transaction it belongs to.
    fn check_exactly_once(&self) -> Result<(), ConfigError> {
        let number = |key: &str| -> Result<Option<u64>, ConfigError> {
            self.properties
                .0
                .get(key)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        invalid("kafka.properties", format!("{key}={v} is not a number"))
                    })
                })
                .transpose()
        };
        let transaction =
            number("transaction.timeout.ms")?.unwrap_or(DEFAULT_TRANSACTION_TIMEOUT_MS);
        for key in ["message.timeout.ms", "delivery.timeout.ms"] {
            if let Some(m) = number(key)? {
                if m > transaction {
                    return Err(invalid(
                        "kafka.properties",
                        format!(
                            "{key}={m} is above transaction.timeout.ms={transaction}: with \
                             --kafka-exactly-once a record must not outlive its transaction; \
                             lower {key} or raise transaction.timeout.ms"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
