#!/usr/bin/env bash
# Runs the README's walk-through ("See it work"): the sh block between the markers
# <!-- walkthrough:start --> and <!-- walkthrough:end -->, as it is, with bash -euo pipefail,
# so the README cannot drift from what works. Fails when any command of the block fails or
# the whole block takes longer than WALKTHROUGH_TIMEOUT seconds (default 1800: the first run
# builds the release binary). Whatever happens, it stops what the block started and deletes
# the dev servers' data, so it can run again at once and leaves nothing running.
#
# The block uses scripts/dev.sh, whose servers and data live in .dev/. So that it never
# deletes a developer's own dev data, it refuses to start while .dev/ holds some
# (run scripts/dev.sh clean first, or skip it in scripts/test.sh with SKIP_WALKTHROUGH=1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

timeout_secs="${WALKTHROUGH_TIMEOUT:-1800}"
say() { printf 'walkthrough: %s\n' "$*" >&2; }

for f in .dev/pg .dev/nats .dev/bridge.pid .dev/bridge.lsn; do
    if [ -e "$f" ]; then
        say "$f exists: scripts/dev.sh has data or a bridge here, which the walk-through would delete."
        say "Run scripts/dev.sh clean first (it deletes them), or set SKIP_WALKTHROUGH=1 for scripts/test.sh."
        exit 1
    fi
done

# The documented ports, unless something listens there already (a server another run left
# behind for a moment): then a free one, so the block still runs as written.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
for spec in DEV_PG_PORT:25432 DEV_NATS_PORT:24222 BRIDGE_PORT:9090; do
    var="${spec%%:*}"
    port="${!var:-${spec#*:}}"
    if listening "$port"; then
        new="$(free_port)"
        say "port $port ($var) is in use: using $new"
        port="$new"
    fi
    export "$var=$port"
done

# The block without its fence lines.
block="$(awk '/<!-- walkthrough:end -->/ { on = 0 }
              on && !/^```/ { print }
              /<!-- walkthrough:start -->/ { on = 1 }' README.md)"
if [ -z "$block" ]; then
    say "no walk-through block between the markers in README.md"
    exit 1
fi

group=""
cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        say "failed (exit $rc); the dev log follows"
        cat /tmp/pgbridge-dev.log >&2 2>/dev/null || true
    fi
    # The bridge and the servers first, gracefully; then whatever else the block left (a
    # build, a command that hung), by its process group.
    if [ -e .dev/pg ] || [ -e .dev/nats ] || [ -e .dev/bridge.pid ]; then
        ./scripts/dev.sh clean >/dev/null 2>&1 || true
    fi
    if [ -n "$group" ] && kill -0 -- "-$group" 2>/dev/null; then
        kill -TERM -- "-$group" 2>/dev/null || true
        sleep 2
        kill -KILL -- "-$group" 2>/dev/null || true
        ./scripts/dev.sh clean >/dev/null 2>&1 || true
    fi
    rm -f /tmp/pgbridge-walkthrough.sqlite* /tmp/pgbridge-dev.log
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# timeout runs the block in a process group of its own (so everything it starts can be found
# and stopped) and signals that whole group when the time is up.
timeout -k 10 "$timeout_secs" bash -euo pipefail -c "$block" </dev/null &
group=$!
rc=0
wait "$group" || rc=$?
if [ "$rc" -eq 124 ]; then say "timed out after $timeout_secs s"; fi
if [ "$rc" -ne 0 ]; then exit "$rc"; fi
say "passed"
