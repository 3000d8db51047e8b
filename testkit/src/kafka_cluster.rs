//! A Kafka cluster of three local JVMs (KRaft; each node a broker and a controller, the three
//! a static controller quorum) on random loopback ports, with nodes killed (SIGKILL) and
//! started again on the same ports and data. Removed on drop.
//!
//! The cluster is set up as a producer with `acks=all` needs it to be: internal topics
//! (consumer offsets, transaction state, share-group state) with replication factor 3 and
//! `min.insync.replicas` 2, new topics with replication factor 3 by default. The brokers'
//! own `min.insync.replicas` stays at Kafka's default of 1, so the tests set it per topic
//! (and see the bridge warn when a topic keeps 1).

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::kafka::{java, start_on_free_ports, KafkaClient, CLUSTER_ID};
use crate::proc::stop_child;
use crate::{free_port, TempDir, START_TIMEOUT, STOP_TIMEOUT};

/// Heap of each node: three of them share the test machine with PostgreSQL and the bridge.
const NODE_HEAP: &str = "-Xmx256m";
/// A node that stops heart-beating is fenced (and its partitions get new leaders) after this
/// long; Kafka's default is 9 s.
const SESSION_TIMEOUT_MS: u32 = 4_000;
/// Lines of a node's log shown when it fails.
const LOG_TAIL: usize = 60;

/// One node: its ports and its process.
struct Node {
    port: u16,
    controller_port: u16,
    child: Option<Child>,
}

/// A three-node KRaft Kafka cluster (see the module docs). Node `i` has `node.id` `i + 1`.
pub struct KafkaCluster {
    dir: TempDir,
    nodes: Vec<Node>,
    started_in: Duration,
}

impl KafkaCluster {
    /// Starts three nodes and waits (at most [`START_TIMEOUT`]) until each answers metadata
    /// requests naming all three brokers; panics with the failing node's log tail otherwise.
    /// A port taken by another process before a node bound it is given up for new ports, for
    /// the whole cluster (the voters' addresses name every node's ports).
    pub fn start() -> Self {
        start_on_free_ports("kafka cluster", |_| Self::try_start())
    }

    /// One start on new free ports; the failing node's log on failure (the nodes started are
    /// killed when the cluster is dropped).
    fn try_start() -> Result<Self, String> {
        let began = Instant::now();
        let nodes = (0..3)
            .map(|_| Node {
                port: free_port(),
                controller_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = KafkaCluster {
            dir: TempDir::new("kafka-cluster"),
            nodes,
            started_in: Duration::ZERO,
        };
        for i in 0..cluster.nodes.len() {
            cluster.write_properties(i);
        }
        cluster.format();
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i);
        }
        let deadline = began + START_TIMEOUT;
        for i in 0..cluster.nodes.len() {
            cluster.wait_ready(i, deadline)?;
        }
        cluster.started_in = began.elapsed();
        Ok(cluster)
    }

    /// How long [`KafkaCluster::start`] took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Kafka's `node.id` (and broker id) of node `i`.
    pub fn node_id(&self, i: usize) -> i32 {
        i as i32 + 1
    }

    /// The node whose broker id is `id`.
    pub fn index_of(&self, id: i32) -> Option<usize> {
        usize::try_from(id - 1)
            .ok()
            .filter(|&i| i < self.nodes.len())
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{}", self.node_id(i)))
    }

    fn properties(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("server.properties")
    }

    fn write_properties(&self, i: usize) {
        let dir = self.node_dir(i);
        fs::create_dir_all(&dir).expect("create the node's directory");
        let voters: Vec<String> = (0..self.nodes.len())
            .map(|j| {
                format!(
                    "{}@127.0.0.1:{}",
                    self.node_id(j),
                    self.nodes[j].controller_port
                )
            })
            .collect();
        let (p, c) = (self.nodes[i].port, self.nodes[i].controller_port);
        let text = format!(
            "process.roles=broker,controller\n\
             node.id={id}\n\
             controller.quorum.voters={voters}\n\
             listeners=PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{p}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
             log.dirs={data}\n\
             num.partitions=3\n\
             default.replication.factor=3\n\
             offsets.topic.replication.factor=3\n\
             offsets.topic.num.partitions=1\n\
             transaction.state.log.replication.factor=3\n\
             transaction.state.log.min.isr=2\n\
             transaction.state.log.num.partitions=1\n\
             share.coordinator.state.topic.replication.factor=3\n\
             share.coordinator.state.topic.min.isr=2\n\
             group.initial.rebalance.delay.ms=0\n\
             auto.create.topics.enable=false\n\
             broker.session.timeout.ms={SESSION_TIMEOUT_MS}\n\
             broker.heartbeat.interval.ms=500\n\
             num.network.threads=2\n\
             num.io.threads=2\n\
             num.replica.fetchers=1\n\
             background.threads=2\n\
             log.cleaner.enable=false\n",
            id = self.node_id(i),
            voters = voters.join(","),
            data = dir.join("data").display(),
        );
        fs::write(self.properties(i), text).expect("write server.properties");
    }

    /// Formats every node's storage (KRaft needs it once), the three at once.
    fn format(&self) {
        let children: Vec<(usize, Child)> = (0..self.nodes.len())
            .map(|i| {
                let child = java(NODE_HEAP, "kafka.tools.StorageTool")
                    .args(["format", "-t", CLUSTER_ID, "-c"])
                    .arg(self.properties(i))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("run the Kafka storage tool (java on PATH?)");
                (i, child)
            })
            .collect();
        for (i, child) in children {
            let out = child.wait_with_output().expect("wait for the storage tool");
            assert!(
                out.status.success(),
                "formatting the storage of Kafka node {} failed: {}{}",
                self.node_id(i),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn spawn(&mut self, i: usize) {
        assert!(
            self.nodes[i].child.is_none(),
            "Kafka node {} is already running",
            self.node_id(i)
        );
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.node_dir(i).join("kafka.log"))
            .expect("open the node's log");
        let child = java(NODE_HEAP, "kafka.Kafka")
            .arg(self.properties(i))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start a Kafka node (java on PATH?)");
        self.nodes[i].child = Some(child);
    }

    /// Waits until node `i` answers a metadata request that names every running node; the
    /// log of a node that exited meanwhile (any node: node `i` waits for all of them), or of
    /// node `i` when the deadline passed.
    fn wait_ready(&mut self, i: usize, deadline: Instant) -> Result<(), String> {
        let want = self.nodes.iter().filter(|n| n.child.is_some()).count();
        loop {
            for j in 0..self.nodes.len() {
                if let Some(c) = self.nodes[j].child.as_mut() {
                    if let Ok(Some(status)) = c.try_wait() {
                        self.nodes[j].child = None;
                        return Err(format!(
                            "Kafka node {} exited ({status}); its log ends:\n{}",
                            self.node_id(j),
                            self.log_tail(j)
                        ));
                    }
                }
            }
            if self.brokers_seen_by(i).is_some_and(|n| n >= want) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "Kafka node {} was not ready in {START_TIMEOUT:?}; its log ends:\n{}",
                    self.node_id(i),
                    self.log_tail(i)
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The number of brokers node `i` lists in its metadata (`None`: it does not answer).
    fn brokers_seen_by(&self, i: usize) -> Option<usize> {
        let c: BaseConsumer = KafkaClient::new(self.address(i)).config().create().ok()?;
        let md = c.fetch_metadata(None, Duration::from_secs(2)).ok()?;
        Some(md.brokers().len())
    }

    /// `127.0.0.1:PORT` of node `i`.
    pub fn address(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].port)
    }

    /// Every node's address, comma-joined: the bootstrap list.
    pub fn brokers(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.address(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A reader of the cluster's topics (through every node still answering).
    pub fn client(&self) -> KafkaClient {
        KafkaClient::new(self.brokers())
    }

    /// Kills node `i` with SIGKILL, keeping its data.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            stop_child(&mut c, libc::SIGKILL, STOP_TIMEOUT);
        }
    }

    /// True while node `i`'s process runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Starts node `i` again on the same ports and data and waits (at most
    /// [`START_TIMEOUT`]) until it answers with every running node in its metadata.
    pub fn start_again(&mut self, i: usize) {
        self.spawn_again(i);
        self.wait_node_ready(i);
    }

    /// Starts node `i` again on the same ports and data, without waiting for it (see
    /// [`KafkaCluster::wait_node_ready`]).
    pub fn spawn_again(&mut self, i: usize) {
        self.spawn(i);
    }

    /// Waits (at most [`START_TIMEOUT`]) until node `i` answers with every running node in
    /// its metadata; panics with its log tail otherwise.
    pub fn wait_node_ready(&mut self, i: usize) {
        if let Err(log) = self.wait_ready(i, Instant::now() + START_TIMEOUT) {
            panic!("{log}");
        }
    }

    /// The leader (broker id) and in-sync replicas of each partition of `topic`, asked
    /// through the running nodes; a partition without a leader shows leader -1.
    pub fn partitions(&self, topic: &str) -> BTreeMap<i32, (i32, Vec<i32>)> {
        let running: Vec<String> = (0..self.nodes.len())
            .filter(|&i| self.is_running(i))
            .map(|i| self.address(i))
            .collect();
        let Ok(c) = KafkaClient::new(running.join(","))
            .config()
            .create::<BaseConsumer>()
        else {
            return BTreeMap::new();
        };
        let Ok(md) = c.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
            return BTreeMap::new();
        };
        md.topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions())
            .map(|p| (p.id(), (p.leader(), p.isr().to_vec())))
            .collect()
    }

    /// The node leading `topic`'s `partition` now (`None` while it has no leader).
    pub fn leader_of(&self, topic: &str, partition: i32) -> Option<usize> {
        let (leader, _) = self.partitions(topic).remove(&partition)?;
        self.index_of(leader)
    }

    /// The value of topic setting `name` of `topic`, as the cluster reports it (`None` when
    /// it cannot be read).
    pub fn topic_setting(&self, topic: &str, name: &str) -> Option<String> {
        let admin: AdminClient<DefaultClientContext> =
            self.client().config().create().expect("admin client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let spec = ResourceSpecifier::Topic(topic);
        let configs = rt.block_on(admin.describe_configs([&spec], &opts)).ok()?;
        configs
            .into_iter()
            .flatten()
            .find_map(|r| r.get(name).and_then(|e| e.value.clone()))
    }

    /// Creates `topic` with `partitions` partitions, replication factor 3 and the settings
    /// `config` (e.g. `("min.insync.replicas", "1")`).
    pub fn create_topic(&self, topic: &str, partitions: i32, config: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> =
            self.client().config().create().expect("admin client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(3));
        for (k, v) in config {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = rt
            .block_on(admin.create_topics([&new], &opts))
            .unwrap_or_else(|e| panic!("create topic {topic}: {e}"));
        for r in results {
            r.unwrap_or_else(|(t, code)| panic!("create topic {t}: {code}"));
        }
    }

    /// Node `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(self.node_dir(i).join("kafka.log")).unwrap_or_default()
    }

    /// The last lines of node `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        let log = self.log(i);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                stop_child(&mut c, libc::SIGKILL, Duration::from_secs(10));
            }
        }
    }
}
