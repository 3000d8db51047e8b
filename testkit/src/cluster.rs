//! JetStream clusters of local nats-server processes, with nodes killed and restarted.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::nats::{jetstream_answers, nats_server_bin};
use crate::proc::stop_child;
use crate::{free_port, TempDir, START_TIMEOUT, STOP_TIMEOUT};

/// A JetStream cluster of local nats-server processes (`n1`, `n2`, ...), each with its own
/// store and a route to every other, on random loopback ports. Killed and removed on drop.
pub struct NatsCluster {
    dir: TempDir,
    bin: PathBuf,
    /// (client port, cluster port) of each node.
    ports: Vec<(u16, u16)>,
    children: Vec<Option<Child>>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until each greets and answers JetStream requests (the
    /// cluster has a meta leader).
    pub fn start(n: usize) -> Self {
        let ports = (0..n).map(|_| (free_port(), free_port())).collect();
        let mut cluster = NatsCluster {
            dir: TempDir::new("nats-cluster"),
            bin: nats_server_bin(),
            ports,
            children: (0..n).map(|_| None).collect(),
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_ready(i);
        }
        cluster
    }

    /// Server name of node `i`.
    pub fn name(&self, i: usize) -> String {
        format!("n{}", i + 1)
    }

    /// Index of the node named `name`.
    pub fn index_of(&self, name: &str) -> usize {
        (0..self.ports.len())
            .find(|&i| self.name(i) == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// `nats://127.0.0.1:PORT` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i].0)
    }

    /// Every node's URL, comma-joined (as `NATS_URL` takes them).
    pub fn urls(&self) -> String {
        (0..self.ports.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "node {i} is already running");
        let node = self.dir.path().join(self.name(i));
        fs::create_dir_all(&node).unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.join("nats.log"))
            .unwrap();
        let routes: Vec<String> = (0..self.ports.len())
            .filter(|&j| j != i)
            .map(|j| format!("nats://127.0.0.1:{}", self.ports[j].1))
            .collect();
        let child = Command::new(&self.bin)
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.ports[i].0.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(node.join("store"))
            .args(["--name", &self.name(i), "--cluster_name", "pgbridge-test"])
            .arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", self.ports[i].1))
            .arg("--routes")
            .arg(routes.join(","))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.children[i] = Some(child);
    }

    /// Waits until node `i` greets with `INFO` and answers a JetStream account request.
    fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = self.url(i);
        while Instant::now() < deadline {
            if let Some(c) = self.children[i].as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    panic!("nats-server {} exited; log:\n{}", self.name(i), self.log(i));
                }
            }
            if jetstream_answers(&url) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "nats-server {} not ready with JetStream; log:\n{}",
            self.name(i),
            self.log(i)
        );
    }

    /// Kills node `i` with SIGKILL, keeping its store.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            stop_child(&mut c, libc::SIGKILL, STOP_TIMEOUT);
        }
    }

    /// Starts node `i` again on the same ports and store; waits until it answers JetStream.
    pub fn start_again(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready(i);
    }

    /// Information on `stream`, asked through each running node in turn; `None` while none
    /// answers.
    pub fn stream_info(&self, stream: &str) -> Option<async_nats::jetstream::stream::Info> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let running = (0..self.ports.len()).filter(|&i| self.children[i].is_some());
        running.map(|i| self.url(i)).find_map(|url| {
            rt.block_on(async {
                let work = async {
                    let client = async_nats::connect(url.as_str()).await.ok()?;
                    let js = async_nats::jetstream::new(client);
                    let mut s = js.get_stream(stream).await.ok()?;
                    s.info().await.ok().cloned()
                };
                tokio::time::timeout(Duration::from_secs(5), work)
                    .await
                    .ok()
                    .flatten()
            })
        })
    }

    /// Name of the current leader of `stream` (`None` while it has none).
    pub fn stream_leader(&self, stream: &str) -> Option<String> {
        self.stream_info(stream)?.cluster?.leader
    }

    /// Messages in `stream` (`None` while nobody answers).
    pub fn stream_messages(&self, stream: &str) -> Option<u64> {
        self.stream_info(stream).map(|i| i.state.messages)
    }

    /// Node `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        let path = self.dir.path().join(self.name(i)).join("nats.log");
        fs::read_to_string(path).unwrap_or_default()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            if let Some(mut c) = c.take() {
                stop_child(&mut c, libc::SIGKILL, Duration::from_secs(10));
            }
        }
    }
}
