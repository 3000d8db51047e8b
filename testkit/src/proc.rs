//! Child processes: running a program as the PostgreSQL account, stopping a child with a
//! signal and a deadline, children killed on drop, and the benchmark's process-group children
//! with what /proc says about them.
//!
//! A [`Proc`] runs in a process group of its own, and its pid (the group's id) is written to
//! `{dir}/pids/{name}-{pid}.pid` as soon as it is spawned, so `scripts/bench` can stop
//! whatever is left if the benchmark dies without cleaning up. Signals go to the whole group,
//! so a wrapper such as a profiler does not leave the bridge behind. Normally the [`Proc`]
//! guards stop their process on drop.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// uid/gid to run PostgreSQL as: ourselves, or the `postgres` account when we are root.
pub(crate) fn pg_run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("running as root needs the unprivileged 'postgres' account (install postgresql)");
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
}

pub(crate) fn chown_tree(path: &Path, ids: Option<(u32, u32)>) {
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown test dir");
    }
}

pub(crate) fn command_as(program: &Path, ids: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
        // The postgres account cannot read root's home or cwd.
        cmd.current_dir("/").env("HOME", "/tmp");
    }
    cmd
}

/// Sends `sig` to a child and waits for it, escalating to SIGKILL after the timeout.
pub(crate) fn stop_child(child: &mut Child, sig: i32, timeout: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, sig) };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process (e.g. the bridge under test) killed when the handle is dropped, so a
/// failing test leaves nothing running.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, sig) };
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child process, stopped (signal, then SIGKILL after a grace period) on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Name for messages and its pid file.
    pub name: String,
    stop_signal: i32,
    pid_file: PathBuf,
}

impl Proc {
    /// Spawns `cmd`, recording its pid under `dir/pids`.
    pub fn spawn(dir: &Path, name: &str, cmd: &mut Command, stop_signal: i32) -> Proc {
        let child = cmd
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let pids = dir.join("pids");
        fs::create_dir_all(&pids).expect("pid dir");
        let pid_file = pids.join(format!("{name}-{}.pid", child.id()));
        // The signal the cleanup trap should send first (postmaster: SIGQUIT).
        fs::write(&pid_file, format!("{} {}\n", child.id(), stop_signal)).expect("pid file");
        Proc {
            child,
            name: name.to_string(),
            stop_signal,
            pid_file,
        }
    }

    /// Process id (and process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the child's process group.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the process group our own child leads.
        unsafe { libc::kill(-(self.child.id() as i32), sig) };
    }

    /// Waits up to `timeout` for the exit; the exit status and the child's resource usage.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<(i32, Rusage)> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut status = 0;
            // SAFETY: an all-zero rusage is valid; wait4 on our own child's pid.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            let r =
                unsafe { libc::wait4(self.child.id() as i32, &mut status, libc::WNOHANG, &mut ru) };
            if r == self.child.id() as i32 {
                let _ = fs::remove_file(&self.pid_file);
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
                return Some((code, Rusage::from(&ru)));
            }
            if r < 0 || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `sig` and waits for the exit, with SIGKILL after `grace`.
    pub fn stop(&mut self, sig: i32, grace: Duration) -> Option<(i32, Rusage)> {
        self.signal(sig);
        if let Some(r) = self.wait_timeout(grace) {
            return Some(r);
        }
        eprintln!("bench: {} did not stop in {grace:?}; killing it", self.name);
        self.signal(libc::SIGKILL);
        self.wait_timeout(Duration::from_secs(10))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if fs::metadata(&self.pid_file).is_ok() {
            self.stop(self.stop_signal, Duration::from_secs(10));
        }
    }
}

/// CPU time of a process or thread, from wait4 or /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rusage {
    /// User CPU time.
    pub user: Duration,
    /// System CPU time.
    pub sys: Duration,
}

impl Rusage {
    /// User and system time.
    pub fn total(&self) -> Duration {
        self.user + self.sys
    }
}

impl From<&libc::rusage> for Rusage {
    fn from(ru: &libc::rusage) -> Self {
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        Rusage {
            user: tv(ru.ru_utime),
            sys: tv(ru.ru_stime),
        }
    }
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// `(comm, utime+stime)` of `/proc/.../stat`.
fn parse_stat(text: &str) -> Option<(String, Rusage)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    // Fields after the comm start at field 3 (state); utime is field 14, stime 15.
    let rest: Vec<&str> = text[close + 2..].split_whitespace().collect();
    let ticks = clock_ticks();
    let to_dur = |s: &str| {
        let t: u64 = s.parse().unwrap_or(0);
        Duration::from_micros(t * 1_000_000 / ticks)
    };
    Some((
        comm,
        Rusage {
            user: to_dur(rest.get(11)?),
            sys: to_dur(rest.get(12)?),
        },
    ))
}

/// CPU time used so far by process `pid` (all its threads).
pub fn cpu_of(pid: u32) -> Option<Rusage> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).map(|(_, r)| r)
}

/// CPU time used so far by each thread of `pid`, by thread name.
pub fn cpu_by_thread(pid: u32) -> Vec<(String, Rusage)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in rd.flatten() {
        if let Ok(text) = fs::read_to_string(e.path().join("stat")) {
            if let Some(x) = parse_stat(&text) {
                out.push(x);
            }
        }
    }
    out.sort_by_key(|t| std::cmp::Reverse(t.1.total()));
    out
}

/// A `kB` field of /proc/<pid>/status, e.g. `VmHWM` (peak RSS) or `VmRSS`.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Runs a command to completion; panics with its output when it fails.
pub fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}
