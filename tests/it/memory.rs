//! Memory is bounded by bytes, not by counts: with 100 KB rows and NATS down, the changes
//! waiting in the bridge stay within the ring's and the window's byte budgets (PostgreSQL keeps
//! the rest of the WAL), and every change arrives once NATS is back.

use std::time::Duration;

use testkit::{
    bridge_command, setup_app_db, stream_len, wait_for, BridgeProcess, TempDir, TestEnv,
};

const WAIT: Duration = Duration::from_secs(120);
const ROWS: i64 = 600;
const ROW_BYTES: usize = 100_000;

/// `VmHWM` (peak resident set) of `pid`, in kB.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

fn run(extra: &[&str]) -> u64 {
    let mut env = TestEnv::start();
    setup_app_db(
        &env.pg,
        // Random text compresses badly, so the rows stay wide in the WAL and on the wire;
        // EXTERNAL storage keeps PostgreSQL from compressing them at all.
        "CREATE TABLE wide (id bigint PRIMARY KEY, body text); \
         ALTER TABLE wide ALTER COLUMN body SET STORAGE EXTERNAL",
        "wide",
    );
    let dir = TempDir::new("bridge");
    let url = env.nats.url();
    let mut bridge = BridgeProcess::spawn(bridge_command(&env.pg, &url, dir.path()).args(extra));
    bridge.wait_for_line("streaming started", WAIT);
    env.nats.stop();
    for batch in 0..(ROWS / 50) {
        env.pg.sql(
            "app",
            &format!(
                "INSERT INTO wide SELECT g, (SELECT string_agg(md5(g::text || i::text), '') \
                 FROM generate_series(1, {}) i) FROM generate_series({}, {}) g",
                ROW_BYTES / 32,
                batch * 50 + 1,
                batch * 50 + 50
            ),
        );
    }
    // Long enough for the wal thread to fill whatever it is allowed to hold.
    std::thread::sleep(Duration::from_secs(8));
    let peak = peak_rss_kb(bridge.child.0.id());
    env.nats.start_again();
    wait_for("every wide row in CDC", WAIT, || {
        (stream_len(&url, "CDC") >= ROWS as u64).then_some(())
    });
    assert_eq!(stream_len(&url, "CDC"), ROWS as u64);
    assert_eq!(bridge.terminate(WAIT), Some(0), "{}", bridge.log());
    peak
}

#[test]
fn wide_rows_while_nats_is_down_stay_within_the_byte_budget() {
    let _heavy = testkit::heavy();
    let peak = run(&[]);
    eprintln!("peak RSS with 100 KB rows while NATS was down: {peak} kB");
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} kB with 100 KB rows while NATS was down (the budget is 16 MiB of \
         queued changes and 8 MiB of unacknowledged payloads)"
    );
}
