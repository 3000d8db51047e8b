#!/usr/bin/env bash
# The test command: installs what the tests need, then checks formatting, lints and runs
# every test (unit tests and integration tests against real PostgreSQL and nats-server).
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
