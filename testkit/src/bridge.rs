//! The `bridge` binary under test: where it is, its command line for a test database, and a
//! running bridge whose log is collected.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use pgbridge::pg::Lsn;

use crate::pg::{PgServer, READER_PASSWORD};
use crate::proc::KillOnDrop;
use crate::{free_port, wait_for};

/// Path of the `bridge` binary: `PGBRIDGE_BRIDGE_BIN` when set, else the one Cargo built next
/// to the running program (`target/<profile>/bridge` for a test in `target/<profile>/deps` or
/// an example in `target/<profile>/examples`), which is what an integration test's
/// `CARGO_BIN_EXE_bridge` names. Only integration tests get that variable at compile time,
/// hence the search for the testkit, which is a library.
pub fn bridge_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PGBRIDGE_BRIDGE_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("path of the running program");
        let found = exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(|d| d.join("bridge"))
            .find(|p| p.is_file());
        found.unwrap_or_else(|| {
            panic!(
                "no bridge binary next to {}: build it (cargo build) or set PGBRIDGE_BRIDGE_BIN",
                exe.display()
            )
        })
    })
}

/// The `bridge` binary set up for database `app` of `pg` as `bridge_reader`, publishing to
/// `nats_url`, with its state file in `state_dir` and its HTTP endpoints on a free loopback
/// port (`BRIDGE_PORT`; a `--port` flag wins). Add flags with `.args(...)`.
pub fn bridge_command(pg: &PgServer, nats_url: &str, state_dir: &Path) -> Command {
    let mut cmd = Command::new(bridge_bin());
    cmd.env_clear()
        .env("BRIDGE_PORT", free_port().to_string())
        .env("PG_HOST", pg.host())
        .env("PG_PORT", pg.port().to_string())
        .env("PG_USER", "bridge_reader")
        .env("PG_PASSWORD", READER_PASSWORD)
        .env("PG_DB", "app")
        .env("NATS_URL", nats_url)
        .env("RUST_LOG", "info")
        .env("TMPDIR", state_dir)
        .args(["--reconnect-backoff-secs", "1"])
        .arg("--state-file")
        .arg(state_dir.join("bridge.lsn"));
    cmd
}

/// A running bridge whose stderr lines are collected; killed on drop.
pub struct BridgeProcess {
    /// The process.
    pub child: KillOnDrop,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl BridgeProcess {
    /// Starts the command with stderr captured.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bridge");
        let stderr = child.stderr.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        BridgeProcess {
            child: KillOnDrop(child),
            lines,
        }
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (bounded) for a log line containing `needle` and returns it; on timeout the
    /// panic shows the bridge's log, so a failure says what the bridge was doing.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            if std::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for log line {needle:?}; bridge log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        self.child.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Waits (bounded) for the process to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let status = wait_for("bridge to exit", timeout, || self.child.try_wait().unwrap());
        // Let the reader thread collect the last lines.
        std::thread::sleep(Duration::from_millis(100));
        status.code()
    }
}

/// The parts of a change's message id `{namespace}:{timeline}:{commit_lsn}-{seq}`; panics on
/// anything else.
pub fn split_msg_id(id: &str) -> (String, u32, Lsn, u32) {
    let parts = pgbridge::wire::id::parse_message_id(id).unwrap_or_else(|| {
        panic!("message id {id:?} is not {{namespace}}:{{timeline}}:{{commit_lsn}}-{{seq}}")
    });
    (
        parts.namespace.to_string(),
        parts.timeline,
        parts.commit_lsn,
        parts.seq,
    )
}

/// The position in the bridge's state file at `path` (either format), `None` when there is no
/// file.
pub fn state_file_lsn(path: &Path) -> Option<Lsn> {
    let text = fs::read_to_string(path).ok()?;
    let recorded = pgbridge::pipeline::position::parse_state(&text)
        .unwrap_or_else(|e| panic!("state file {}: {e}: {text}", path.display()));
    Some(recorded.lsn)
}
