//! Throw-away nats-server processes (with or without JetStream, extra arguments, a fixed
//! port), restarts on the same port and store, and a NATS client on a throw-away runtime.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::proc::stop_child;
use crate::{free_port, which, TempDir, START_TIMEOUT, STOP_TIMEOUT};

/// Path of `nats-server`.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    which("nats-server")
        .expect("nats-server not found: run scripts/install-deps.sh or set NATS_SERVER_BIN")
}

/// A throw-away `nats-server -js` (or without `-js`, see [`NatsServer::start_without_jetstream`])
/// on a random loopback port with its own store directory.
pub struct NatsServer {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    jetstream: bool,
    extra_args: Vec<String>,
    child: Option<Child>,
    /// Where the server's pid is recorded (see [`NatsServer::start_in`]).
    pid_dir: Option<PathBuf>,
    pid_file: Option<PathBuf>,
}

impl NatsServer {
    /// Starts nats-server with JetStream enabled.
    pub fn start() -> Self {
        Self::launch(true, &[])
    }

    /// Starts nats-server without JetStream (no `-js`), e.g. to test the error it causes.
    pub fn start_without_jetstream() -> Self {
        Self::launch(false, &[])
    }

    /// Starts nats-server with JetStream and extra command-line arguments, e.g.
    /// `&["--user", "u", "--pass", "p"]`. They are kept for [`NatsServer::start_again`].
    pub fn start_with_args(args: &[&str]) -> Self {
        Self::launch(true, args)
    }

    /// Starts nats-server with JetStream on `port`, e.g. one a bridge already tries to reach.
    pub fn start_on_port(port: u16) -> Self {
        let mut s = NatsServer {
            dir: TempDir::new("nats"),
            bin: nats_server_bin(),
            port,
            jetstream: true,
            extra_args: Vec::new(),
            child: None,
            pid_dir: None,
            pid_file: None,
        };
        s.start_again();
        s
    }

    /// Starts nats-server with JetStream in `root/nats` (kept after drop, for its log), in a
    /// process group of its own whose pid is recorded under `root/pids` as
    /// [`crate::proc::Proc`] records its children: the benchmark's server.
    pub fn start_in(root: &Path) -> Self {
        let mut s = NatsServer {
            dir: TempDir::kept(&root.join("nats")),
            bin: nats_server_bin(),
            port: 0,
            jetstream: true,
            extra_args: Vec::new(),
            child: None,
            pid_dir: Some(root.join("pids")),
            pid_file: None,
        };
        s.start_again();
        s
    }

    fn launch(jetstream: bool, args: &[&str]) -> Self {
        let mut s = NatsServer {
            dir: TempDir::new("nats"),
            bin: nats_server_bin(),
            port: 0,
            jetstream,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            pid_dir: None,
            pid_file: None,
        };
        s.start_again();
        s
    }

    /// (Re)starts on the same port and store directory, e.g. after [`NatsServer::stop`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        for attempt in 0..5 {
            if self.port == 0 || (attempt > 0 && !self.has_store()) {
                self.port = free_port();
            }
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("nats.log"))
                .unwrap();
            let mut cmd = Command::new(&self.bin);
            cmd.args(["-a", "127.0.0.1", "-p"])
                .arg(self.port.to_string());
            if self.jetstream {
                cmd.arg("-js").arg("-sd").arg(self.dir.path().join("store"));
            }
            if self.pid_dir.is_some() {
                cmd.process_group(0);
            }
            let child = cmd
                .args(&self.extra_args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
            self.record_pid(child.id());
            self.child = Some(child);
            if self.wait_ready() {
                return;
            }
            if let Some(mut c) = self.child.take() {
                stop_child(&mut c, libc::SIGKILL, STOP_TIMEOUT);
                self.forget_pid();
            }
            // Same store, same port is what a restart test wants: retry a few times first.
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("nats-server did not start; log:\n{}", self.log());
    }

    /// Writes `{pid_dir}/nats-server-{pid}.pid` (pid and the signal to stop it with), when
    /// the server was started with [`NatsServer::start_in`].
    fn record_pid(&mut self, pid: u32) {
        if let Some(dir) = &self.pid_dir {
            fs::create_dir_all(dir).expect("pid dir");
            let file = dir.join(format!("nats-server-{pid}.pid"));
            fs::write(&file, format!("{pid} {}\n", libc::SIGTERM)).expect("pid file");
            self.pid_file = Some(file);
        }
    }

    fn forget_pid(&mut self) {
        if let Some(file) = self.pid_file.take() {
            let _ = fs::remove_file(file);
        }
    }

    fn has_store(&self) -> bool {
        self.dir.path().join("store").exists()
    }

    /// Ready when it accepts a TCP connection and greets with `INFO`.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    return false;
                }
            }
            if let Ok(s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO ") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Stops the server gracefully (SIGTERM), keeping the store.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGTERM, STOP_TIMEOUT);
            self.forget_pid();
        }
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The store directory's parent (store, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.path().join("nats.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGKILL, Duration::from_secs(10));
            self.forget_pid();
        }
    }
}

/// Runs `f` with a NATS client connected to `nats_url`, on a throw-away current-thread runtime.
pub fn with_nats<T, F, Fut>(nats_url: &str, f: F) -> T
where
    F: FnOnce(async_nats::Client) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(nats_url)
            .await
            .expect("connect to NATS");
        f(client).await
    })
}

/// Whether the server at `url` answers a JetStream account request (within a few seconds).
pub(crate) fn jetstream_answers(url: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let work = async {
            let client = async_nats::connect(url).await.ok()?;
            async_nats::jetstream::new(client)
                .query_account()
                .await
                .ok()
        };
        tokio::time::timeout(Duration::from_secs(5), work)
            .await
            .ok()
            .flatten()
            .is_some()
    })
}
