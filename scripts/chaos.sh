#!/usr/bin/env bash
# The chaos test in its full form: a continuous mixed workload while the bridge is killed
# with SIGKILL 20 times, nats-server restarts 3 times, PostgreSQL restarts twice (once fast,
# once immediate) and the mirror is killed 4 times; then every committed change must be in
# the CDC stream exactly once, in commit order, and the mirror must equal the source.
# Prints one summary line `chaos: seed=… …`. CHAOS_SEED=<seed> repeats a run; the other
# CHAOS_* variables (see tests/it/chaos.rs) override the fault counts and the duration.
# Runs the debug build (the same binary the test suite builds; no release build needed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

./scripts/install-deps.sh
# shellcheck source=/dev/null
. .dev/env

export CHAOS_BRIDGE_KILLS="${CHAOS_BRIDGE_KILLS:-20}"
export CHAOS_NATS_RESTARTS="${CHAOS_NATS_RESTARTS:-3}"
export CHAOS_PG_RESTARTS="${CHAOS_PG_RESTARTS:-2}"
export CHAOS_MIRROR_KILLS="${CHAOS_MIRROR_KILLS:-4}"
export CHAOS_SECS="${CHAOS_SECS:-180}"

log="$(mktemp "${TMPDIR:-/tmp}/chaos.XXXXXX.log")"
status=0
cargo test --locked --test it chaos:: -- --nocapture 2>&1 | tee "$log" || status=$?
echo
if grep -q '^chaos: seed=' "$log"; then
    grep '^chaos: seed=' "$log"
else
    grep -E '^chaos: (seed|FAILED)' "$log" || true
    echo "chaos: FAILED (full output in $log)" >&2
    [ "$status" -ne 0 ] || status=1
    exit "$status"
fi
rm -f "$log"
exit "$status"
