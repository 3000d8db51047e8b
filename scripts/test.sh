#!/usr/bin/env bash
# The test command: installs what the tests need, then checks formatting, lints and runs
# every test (unit tests and integration tests against real PostgreSQL 15 and nats-server), the
# core integration tests again on PostgreSQL 18 (scripts/test-matrix.sh 18), that
# the Elixir example parses, the alert rules' unit tests, and builds and checks the container image (scripts/image.sh; one
# release build; SKIP_IMAGE=1 skips it for a quicker local run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

./scripts/install-deps.sh
# shellcheck source=/dev/null
. .dev/env

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked "$@"
echo "== core integration tests on PostgreSQL 18 (scripts/test-matrix.sh 18)"
./scripts/test-matrix.sh 18
echo "== scripts/check-elixir.sh"
./scripts/check-elixir.sh
echo "== promtool test rules"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
[ "${SKIP_WALKTHROUGH:-}" = 1 ] && echo "== scripts/walkthrough.sh skipped (SKIP_WALKTHROUGH=1)" || { echo "== scripts/walkthrough.sh"; ./scripts/walkthrough.sh; }
if [ "${SKIP_IMAGE:-}" = 1 ]; then
    echo "== scripts/image.sh skipped (SKIP_IMAGE=1)"
else
    echo "== scripts/image.sh"
    ./scripts/image.sh
fi
