#!/usr/bin/env bash
# The test command: installs what the tests need, then checks formatting, lints and runs
# every test (unit tests and integration tests against real PostgreSQL 15, nats-server and
# Kafka), the core integration tests again on PostgreSQL 18 (scripts/test-matrix.sh 18), that
# the Elixir example parses, the alert rules' unit tests, the README walk-through, and builds
# and checks the container images (scripts/image.sh; SKIP_IMAGE=1 skips it for a quicker
# local run).
#
# The image build (two static release builds) runs in the background, at a lower CPU
# priority, while the tests run: the tests mostly wait on their servers, and the build takes
# the CPU they leave. Its output is printed at the end, and its failure fails the command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

./scripts/install-deps.sh
# shellcheck source=/dev/null
. .dev/env

# The integration tests wait on servers far more than they compute, and those that must not
# overlap hold a lock (testkit::heavy); more threads than cores keep the light ones moving
# while a heavy one runs.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo doc (library, warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --lib

image_pid=""
image_log=""
if [ "${SKIP_IMAGE:-}" != 1 ]; then
    image_log="$(mktemp "${TMPDIR:-/tmp}/pgbridge-image-log.XXXXXX")"
    echo "== scripts/image.sh started in the background (log printed at the end)"
    # Its own process group (setsid), so that a failure here stops all of it.
    PGBRIDGE_DEPS_INSTALLED=1 setsid nice -n 10 ./scripts/image.sh >"$image_log" 2>&1 &
    image_pid=$!
fi
# Stop the background build if the tests fail or the command is interrupted.
cleanup() {
    if [ -n "$image_pid" ] && kill -0 "$image_pid" 2>/dev/null; then
        kill -TERM -- "-$image_pid" 2>/dev/null || true
        wait "$image_pid" 2>/dev/null || true
    fi
    [ -z "$image_log" ] || rm -f "$image_log"
}
trap cleanup EXIT

echo "== cargo test"
cargo test --locked "$@"
echo "== core integration tests on PostgreSQL 18 (scripts/test-matrix.sh 18)"
./scripts/test-matrix.sh 18
echo "== scripts/check-elixir.sh"
./scripts/check-elixir.sh
echo "== promtool test rules"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
if [ -z "$image_pid" ]; then
    echo "== scripts/image.sh skipped (SKIP_IMAGE=1)"
else
    echo "== scripts/image.sh (waiting for the background build)"
    status=0
    wait "$image_pid" || status=$?
    image_pid=""
    cat "$image_log"
    if [ "$status" -ne 0 ]; then
        echo "== scripts/image.sh FAILED (exit $status)"
        exit "$status"
    fi
fi
# After the image build: the walk-through's dev servers listen on fixed ports, which the
# image checks' own servers and connections could otherwise hold at that moment.
[ "${SKIP_WALKTHROUGH:-}" = 1 ] && echo "== scripts/walkthrough.sh skipped (SKIP_WALKTHROUGH=1)" || { echo "== scripts/walkthrough.sh"; ./scripts/walkthrough.sh; }
