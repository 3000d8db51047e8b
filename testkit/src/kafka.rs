//! A throw-away Apache Kafka broker (KRaft, one node, broker and controller in one JVM) on
//! random loopback ports, restartable on the same ports and data, and a reader of a topic's
//! records through rdkafka's consumer.
//!
//! The broker's jars come from `KAFKA_LIBS` (written to `.dev/env` by
//! `scripts/install-kafka.sh`), else `.dev/kafka/libs` of the repository.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::proc::stop_child;
use crate::{free_port, TempDir, START_TIMEOUT, STOP_TIMEOUT};

/// First starts of a broker tried on new ports when one was taken before it bound it.
const BIND_ATTEMPTS: u32 = 3;
/// What the broker logs when it cannot bind a port.
const ADDRESS_IN_USE: &str = "Address already in use";

/// Runs `start` (given the attempt, from 1) until it succeeds, again when it failed because
/// a port was taken before the broker bound it, at most [`BIND_ATTEMPTS`] times; panics with
/// the log of the failure otherwise. A port from `free_port` is free when asked for, not when
/// the JVM binds it a second later: an outgoing connection of another test can take it
/// meanwhile. `start` picks new ports for an attempt after the first.
pub(crate) fn start_on_free_ports<T>(
    what: &str,
    mut start: impl FnMut(u32) -> Result<T, String>,
) -> T {
    for attempt in 1.. {
        match start(attempt) {
            Ok(started) => return started,
            Err(log) if attempt < BIND_ATTEMPTS && log.contains(ADDRESS_IN_USE) => {
                eprintln!("{what}: a port was taken before it was bound; new ports");
            }
            Err(log) => panic!("{log}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}
/// The file under `dir` recording the broker process `pid` for a script's trap.
fn pid_file(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("kafka-{pid}.pid"))
}

/// Kafka's (and the KRaft cluster's) id of the test clusters; any base64 UUID works.
pub(crate) const CLUSTER_ID: &str = "cGdicmlkZ2UtdGVzdHMtMQ";

/// Directory of the broker's jars.
pub fn kafka_libs() -> PathBuf {
    if let Some(p) = std::env::var_os("KAFKA_LIBS") {
        return PathBuf::from(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let libs = repo.join(".dev/kafka/libs");
    assert!(
        libs.is_dir(),
        "no Kafka broker jars: run scripts/install-kafka.sh (or set KAFKA_LIBS)"
    );
    libs
}

/// A throw-away single-node Kafka broker.
pub struct KafkaServer {
    dir: TempDir,
    port: u16,
    controller_port: u16,
    extra: Vec<(String, String)>,
    child: Option<Child>,
    /// Where [`KafkaServer::start_in`] records the broker's pid for a cleanup trap.
    pid_dir: Option<PathBuf>,
    /// [`KafkaServer::start_with_sasl`]: the SASL/PLAIN listener's port and its users.
    sasl: Option<(u16, Vec<(String, String)>)>,
}

/// The super user of a broker started by [`KafkaServer::start_with_sasl`] (the harness's own
/// plaintext connections are super users too).
pub const SASL_ADMIN: (&str, &str) = ("admin", "admin-s3cret");

impl KafkaServer {
    /// Starts a broker with the settings one node needs.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a broker with extra `server.properties` settings, e.g.
    /// `("message.max.bytes", "20000")`.
    pub fn start_with(extra: &[(&str, &str)]) -> Self {
        Self::launch(extra, None, None)
    }

    /// Starts a broker that also listens with SASL/PLAIN ([`KafkaServer::sasl_brokers`]) for
    /// `users` (name, password) and [`SASL_ADMIN`], and authorizes with Kafka's ACLs:
    /// [`SASL_ADMIN`] and the plaintext listener's anonymous clients are super users, every
    /// other user may do only what an ACL grants it (none at first).
    pub fn start_with_sasl(users: &[(&str, &str)]) -> Self {
        let mut all: Vec<(String, String)> = vec![(SASL_ADMIN.0.into(), SASL_ADMIN.1.into())];
        all.extend(users.iter().map(|(u, p)| (u.to_string(), p.to_string())));
        Self::launch(&[], None, Some(all))
    }

    /// `host:port` of the SASL/PLAIN listener of [`KafkaServer::start_with_sasl`].
    pub fn sasl_brokers(&self) -> String {
        let (port, _) = self.sasl.as_ref().expect("a broker started with SASL");
        format!("127.0.0.1:{port}")
    }

    /// Like [`KafkaServer::start_with`], for scripts: the broker leads a process group of its
    /// own whose pid is recorded under `root/pids` (as `nats-server`'s by
    /// [`crate::NatsServer::start_in`]), so a trap can stop it even if this process aborts.
    pub fn start_in(root: &Path, extra: &[(&str, &str)]) -> Self {
        Self::launch(extra, Some(root.join("pids")), None)
    }

    fn launch(
        extra: &[(&str, &str)],
        pid_dir: Option<PathBuf>,
        sasl_users: Option<Vec<(String, String)>>,
    ) -> Self {
        let mut s = KafkaServer {
            dir: TempDir::new("kafka"),
            port: free_port(),
            controller_port: free_port(),
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            pid_dir,
            sasl: sasl_users.map(|users| (free_port(), users)),
        };
        s.write_properties();
        s.format();
        // The storage does not record the ports (static quorum): the first start may move.
        start_on_free_ports("kafka", |attempt| {
            if attempt > 1 {
                s.port = free_port();
                s.controller_port = free_port();
                if let Some((port, _)) = s.sasl.as_mut() {
                    *port = free_port();
                }
                s.write_properties();
            }
            s.try_start()
        });
        s
    }

    fn properties(&self) -> PathBuf {
        self.dir.path().join("server.properties")
    }

    fn write_properties(&self) {
        let (p, c) = (self.port, self.controller_port);
        let mut text = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{c}\n\
             listeners=PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{p}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
             log.dirs={}\n\
             num.partitions=3\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=1\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             auto.create.topics.enable=false\n",
            self.dir.path().join("data").display()
        );
        if let Some((sasl, users)) = &self.sasl {
            // Later keys win: the listeners again, with the SASL one.
            let accounts: String = users
                .iter()
                .map(|(u, pw)| format!(" user_{u}=\"{pw}\""))
                .collect();
            let (admin, admin_pw) = SASL_ADMIN;
            text.push_str(&format!(
                "listeners=PLAINTEXT://127.0.0.1:{p},SASL_PLAINTEXT://127.0.0.1:{sasl},CONTROLLER://127.0.0.1:{c}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{p},SASL_PLAINTEXT://127.0.0.1:{sasl}\n\
                 listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT\n\
                 sasl.enabled.mechanisms=PLAIN\n\
                 listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username=\"{admin}\" password=\"{admin_pw}\"{accounts};\n\
                 authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n\
                 super.users=User:ANONYMOUS;User:{admin}\n"
            ));
        }
        for (k, v) in &self.extra {
            text.push_str(&format!("{k}={v}\n"));
        }
        fs::write(self.properties(), text).expect("write server.properties");
    }

    /// Formats the storage (KRaft needs it once).
    fn format(&self) {
        let out = java("-Xmx384m", "kafka.tools.StorageTool")
            .args(["format", "-t", CLUSTER_ID, "-c"])
            .arg(self.properties())
            .stdin(Stdio::null())
            .output()
            .expect("run the Kafka storage tool (java on PATH?)");
        assert!(
            out.status.success(),
            "formatting the Kafka storage failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// (Re)starts the broker on the same ports and data, e.g. after [`KafkaServer::stop`].
    pub fn start_again(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// Starts the broker and waits until it answers; the failure with the broker's log when it
    /// exits first.
    fn try_start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "the Kafka broker is already running");
        let log_before = self.log().len();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("kafka.log"))
            .unwrap();
        let mut cmd = java("-Xmx384m", "kafka.Kafka");
        cmd.arg(self.properties())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if self.pid_dir.is_some() {
            cmd.process_group(0);
        }
        let child = cmd.spawn().expect("start the Kafka broker (java on PATH?)");
        if let Some(dir) = &self.pid_dir {
            fs::create_dir_all(dir).expect("pid dir");
            let pid = child.id();
            fs::write(pid_file(dir, pid), format!("{pid} {}\n", libc::SIGTERM)).expect("pid file");
        }
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let pid = c.id();
                    self.child = None;
                    if let Some(dir) = &self.pid_dir {
                        let _ = fs::remove_file(pid_file(dir, pid));
                    }
                    let log = self.log();
                    let this_start = log.get(log_before..).unwrap_or(&log);
                    return Err(format!(
                        "the Kafka broker exited ({status}); log:\n{this_start}"
                    ));
                }
            }
            if self.is_ready() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "the Kafka broker did not start in {START_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Ready once it answers a metadata request with itself as a broker.
    fn is_ready(&self) -> bool {
        let Ok(c) = self.client().config().create::<BaseConsumer>() else {
            return false;
        };
        c.fetch_metadata(None, Duration::from_secs(2))
            .is_ok_and(|md| !md.brokers().is_empty())
    }

    /// Stops the broker (SIGTERM, then SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGTERM, STOP_TIMEOUT);
            if let Some(dir) = &self.pid_dir {
                let _ = fs::remove_file(pid_file(dir, c.id()));
            }
        }
    }

    /// `127.0.0.1:PORT`, the bootstrap address.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.path().join("kafka.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// A reader of the broker's topics.
    pub fn client(&self) -> KafkaClient {
        KafkaClient::new(self.brokers())
    }

    /// The topics on the broker (internal ones left out).
    pub fn topics(&self) -> Vec<String> {
        self.client().topics()
    }

    /// Every record of `topic` now stored, partition by partition, in offset order.
    pub fn read_topic(&self, topic: &str) -> Vec<KafkaRecord> {
        self.client().read_topic(topic)
    }

    /// The end offset (high watermark) of each partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> BTreeMap<i32, i64> {
        self.client().end_offsets(topic)
    }
}

/// `java` with the broker's jars on the class path, a heap of at most `max_heap` (`-Xmx...`)
/// and a quick start (serial GC, C1 only), running `main`.
pub(crate) fn java(max_heap: &str, main: &str) -> Command {
    let mut cmd = Command::new("java");
    cmd.args([
        max_heap,
        "-Xms64m",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
    ])
    .arg("-Dlog4j2.level=warn")
    .arg("-cp")
    .arg(format!("{}/*", kafka_libs().display()))
    .arg(main);
    cmd
}

/// Reads topics of a broker or a cluster through rdkafka's consumer (no group, no commits).
pub struct KafkaClient {
    bootstrap: String,
}

impl KafkaClient {
    /// A reader of the brokers `bootstrap` (`host:port,...`).
    pub fn new(bootstrap: String) -> Self {
        KafkaClient { bootstrap }
    }

    pub(crate) fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap)
            .set("group.id", "pgbridge-tests")
            .set("enable.auto.commit", "false")
            .set("log_level", "0");
        c
    }

    pub(crate) fn consumer(&self) -> BaseConsumer {
        self.config().create().expect("consumer")
    }

    /// The topics (internal ones left out).
    pub fn topics(&self) -> Vec<String> {
        let c = self.consumer();
        let md = c
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata");
        let mut names: Vec<String> = md
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|n| !n.starts_with("__"))
            .collect();
        names.sort();
        names
    }

    /// Every record of `topic` now stored, partition by partition, in offset order.
    pub fn read_topic(&self, topic: &str) -> Vec<KafkaRecord> {
        let c = self.consumer();
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        let mut ends = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            let (low, high) = watermarks(&c, topic, *p);
            if high > low {
                ends.insert(*p, high);
                tpl.add_partition_offset(topic, *p, Offset::Offset(low))
                    .unwrap();
            }
        }
        let mut out = Vec::new();
        if ends.is_empty() {
            return out;
        }
        c.assign(&tpl).expect("assign");
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while ends
            .iter()
            .any(|(p, end)| next.get(p).copied().unwrap_or(0) < *end)
        {
            assert!(Instant::now() < deadline, "reading topic {topic} timed out");
            let Some(m) = c.poll(Duration::from_millis(500)) else {
                continue;
            };
            let m = m.expect("consume");
            next.insert(m.partition(), m.offset() + 1);
            out.push(KafkaRecord::of(&m));
        }
        out.sort_by_key(|r| (r.partition, r.offset));
        out
    }

    /// Every record of `topic` a consumer with `isolation.level` read_committed (`committed`)
    /// or read_uncommitted sees now, partition by partition, in offset order. Reads each
    /// partition to its end as the broker reports it (for read_committed, the last stable
    /// offset), so transaction markers, which no consumer is given, do not hold it up.
    pub fn read_topic_isolated(&self, topic: &str, committed: bool) -> Vec<KafkaRecord> {
        let mut config = self.config();
        config
            .set(
                "isolation.level",
                if committed {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            )
            .set("enable.partition.eof", "true");
        let c: BaseConsumer = config.create().expect("consumer");
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .unwrap();
        }
        let mut out = Vec::new();
        if partitions.is_empty() {
            return out;
        }
        c.assign(&tpl).expect("assign");
        let mut at_end = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while at_end.len() < partitions.len() {
            assert!(Instant::now() < deadline, "reading topic {topic} timed out");
            let m = match c.poll(Duration::from_millis(500)) {
                None => continue,
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                    continue;
                }
                Some(m) => m.expect("consume"),
            };
            out.push(KafkaRecord::of(&m));
        }
        out.sort_by_key(|r| (r.partition, r.offset));
        out
    }

    /// Opens a transaction as `transactional_id` (fencing any other producer of that id),
    /// writes one record to partition 0 of `topic` with header `id_header` = `id`, and aborts
    /// the transaction.
    pub fn abort_a_transaction(
        &self,
        transactional_id: &str,
        topic: &str,
        id_header: &str,
        id: &str,
    ) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("transactional.id", transactional_id)
            .set("log_level", "0");
        let p: BaseProducer = config.create().expect("producer");
        let timeout = Duration::from_secs(60);
        p.init_transactions(timeout).expect("init_transactions");
        p.begin_transaction().expect("begin_transaction");
        let headers = OwnedHeaders::new().insert(Header {
            key: id_header,
            value: Some(id.as_bytes()),
        });
        p.send(
            BaseRecord::<[u8], [u8]>::to(topic)
                .partition(0)
                .key(&b"{}"[..])
                .payload(&b"{\"aborted\":true}"[..])
                .headers(headers),
        )
        .map_err(|(e, _)| e)
        .expect("produce");
        p.flush(timeout).expect("flush");
        p.abort_transaction(timeout).expect("abort_transaction");
    }

    /// Writes one record, outside any transaction, to partition `partition` of `topic` (which
    /// must exist): key `key`, value `value` (`None`: a tombstone); waits for the broker's
    /// answer (a refusal shows when the topic is read back).
    pub fn produce(&self, topic: &str, partition: i32, key: &[u8], value: Option<&[u8]>) {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("enable.idempotence", "true")
            .set("log_level", "0");
        let p: BaseProducer = config.create().expect("producer");
        let mut record = BaseRecord::<[u8], [u8]>::to(topic)
            .partition(partition)
            .key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        p.send(record).map_err(|(e, _)| e).expect("produce");
        p.flush(Duration::from_secs(60)).expect("flush");
    }

    /// The end offset (high watermark) of each partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> BTreeMap<i32, i64> {
        let c = self.consumer();
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut out = BTreeMap::new();
        for t in md.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                let (_, high) = watermarks(&c, topic, p.id());
                out.insert(p.id(), high);
            }
        }
        out
    }
}

/// A partition's low and high watermarks, retried (bounded) while its leader is elected.
fn watermarks(c: &BaseConsumer, topic: &str, partition: i32) -> (i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok(w) => return w,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "watermarks of {topic}/{partition}: {e}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

impl Drop for KafkaServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGKILL, Duration::from_secs(10));
        }
    }
}

/// One stored record.
#[derive(Clone)]
pub struct KafkaRecord {
    /// Partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Key bytes (`None`: no key).
    pub key: Option<Vec<u8>>,
    /// Value bytes (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
}

/// Key and value as text (lossy, the value cut at 200 bytes).
impl std::fmt::Debug for KafkaRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = |b: &Option<Vec<u8>>, max: usize| {
            b.as_deref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(max)]).into_owned())
        };
        write!(
            f,
            "{}@{} key={:?} headers={:?} value={:?}",
            self.partition,
            self.offset,
            text(&self.key, 200),
            self.headers,
            text(&self.value, 200)
        )
    }
}

impl KafkaRecord {
    /// A copy of a consumed message.
    fn of(m: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        KafkaRecord {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value parsed as JSON (`--format json`); panics on anything else.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().expect("a value"))
            .unwrap_or_else(|e| panic!("record value is not JSON: {e}"))
    }

    /// The key parsed as JSON (`--format json`).
    pub fn key_json(&self) -> Option<serde_json::Value> {
        self.key
            .as_deref()
            .map(|k| serde_json::from_slice(k).expect("key is JSON"))
    }
}
