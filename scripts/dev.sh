#!/usr/bin/env bash
# Runs the bridge against a local throw-away PostgreSQL 15 and nats-server (JetStream), kept
# under .dev/ and installed first if missing. Safe to run again: what is running stays running.
#
#   scripts/dev.sh [bridge flags...]   start the servers (if needed) and run the bridge
#   scripts/dev.sh --sink kafka [...]  the same into a local Apache Kafka broker (KRaft, one
#                                      node, under .dev/kafka-server) instead of nats-server
#   scripts/dev.sh psql [psql args]    a psql shell on the demo database as the superuser
#   scripts/dev.sh stop                stop the bridge and the servers (data stays in .dev/)
#   scripts/dev.sh clean               stop everything and delete .dev/pg, .dev/nats and the
#                                      bridge's state file, spool and pid file (a new cluster
#                                      must not resume from the old one's position)
#
# Ports: DEV_PG_PORT (default 25432), DEV_NATS_PORT (default 24222), DEV_KAFKA_PORT (default
# 29192, and the next one for its controller), loopback only. The defaults lie below Linux's
# ephemeral range (32768-60999), where any outgoing connection's local port could hold them.
# The binary is built into ${CARGO_TARGET_DIR:-target}/release/bridge.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

pg_port="${DEV_PG_PORT:-25432}"
nats_port="${DEV_NATS_PORT:-24222}"
dev="$root/.dev"
pgdir="$dev/pg"
natsdir="$dev/nats"
kafka_port="${DEV_KAFKA_PORT:-29192}"
kafkadir="$dev/kafka-server"
bridge_pid="$dev/bridge.pid"
bridge_state="$dev/bridge.lsn"
bridge_tmp="$dev/tmp"
# cargo's target directory; a relative CARGO_TARGET_DIR is relative to the repository root,
# where cargo runs.
target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac
bridge_bin="$target_dir/release/bridge"
db=app
su_password=dev_superuser
reader_password=dev_reader

say() { printf 'dev: %s\n' "$*" >&2; }

# PostgreSQL refuses to run as root: use the postgres account the Debian package creates.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# True when the pid file names a running bridge of this checkout (the file may be stale and
# its number reused by another process). Told by its state file, which is this checkout's
# whatever CARGO_TARGET_DIR was when it started.
bridge_running() {
    [ -f "$bridge_pid" ] || return 1
    local pid
    pid="$(cat "$bridge_pid")"
    kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--state-file $bridge_state"
}

stop_bridge() {
    [ -f "$bridge_pid" ] || return 0
    local pid
    pid="$(cat "$bridge_pid")"
    if bridge_running; then
        kill -TERM "$pid"
        for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; say "bridge killed"; else say "bridge stopped"; fi
    fi
    rm -f "$bridge_pid"
}

stop_all() {
    stop_bridge
    if [ -f "$pgdir/data/postmaster.pid" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$pgdir/data" -m fast -w stop >/dev/null && say "PostgreSQL stopped"
    fi
    if [ -f "$natsdir/nats.pid" ] && kill "$(cat "$natsdir/nats.pid")" 2>/dev/null; then
        rm -f "$natsdir/nats.pid"
        say "nats-server stopped"
    fi
    if [ -f "$kafkadir/kafka.pid" ] && kill "$(cat "$kafkadir/kafka.pid")" 2>/dev/null; then
        for _ in $(seq 1 300); do kill -0 "$(cat "$kafkadir/kafka.pid")" 2>/dev/null || break; sleep 0.1; done
        rm -f "$kafkadir/kafka.pid"
        say "Kafka broker stopped"
    fi
}

# The sink the bridge flags (or BRIDGE_SINK) ask for.
sink="${BRIDGE_SINK:-nats}"
prev=""
for arg in "$@"; do
    [ "$prev" = "--sink" ] && sink="$arg"
    case "$arg" in --sink=*) sink="${arg#--sink=}" ;; esac
    prev="$arg"
done

# A single-node KRaft broker (broker and controller in one JVM) on loopback.
start_kafka() {
    ./scripts/install-kafka.sh
    # shellcheck source=/dev/null
    . "$dev/env"
    mkdir -p "$kafkadir"
    if [ -f "$kafkadir/kafka.pid" ] && kill -0 "$(cat "$kafkadir/kafka.pid")" 2>/dev/null; then
        return
    fi
    local props="$kafkadir/server.properties" ctl=$((kafka_port + 1))
    cat >"$props" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$ctl
listeners=PLAINTEXT://127.0.0.1:$kafka_port,CONTROLLER://127.0.0.1:$ctl
advertised.listeners=PLAINTEXT://127.0.0.1:$kafka_port
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$kafkadir/data
num.partitions=3
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
    local java=(java -Xmx512m -XX:+UseSerialGC -cp "$KAFKA_LIBS/*")
    if [ ! -f "$kafkadir/data/meta.properties" ]; then
        "${java[@]}" kafka.tools.StorageTool format -t cGdicmlkZ2UtZGV2LTAwMQ -c "$props" >/dev/null 2>&1
    fi
    setsid "${java[@]}" kafka.Kafka "$props" </dev/null >"$kafkadir/kafka.log" 2>&1 &
    echo $! >"$kafkadir/kafka.pid"
    for _ in $(seq 1 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$kafka_port") 2>/dev/null; then
            say "Kafka broker on 127.0.0.1:$kafka_port (log: $kafkadir/kafka.log)"
            return
        fi
        kill -0 "$(cat "$kafkadir/kafka.pid")" 2>/dev/null || break
        sleep 0.1
    done
    say "the Kafka broker did not start on 127.0.0.1:$kafka_port (set DEV_KAFKA_PORT); its log ends:"
    tail -n 5 "$kafkadir/kafka.log" >&2 2>/dev/null || true
    exit 1
}

./scripts/install-deps.sh
# shellcheck source=/dev/null
. "$dev/env"

case "${1:-}" in
stop) stop_all; exit 0 ;;
clean)
    stop_all
    # The spool directory is pgbridge-spool-{slot} beside the state file.
    rm -rf "$pgdir" "$natsdir" "$kafkadir" "$bridge_tmp" "$bridge_pid" "$bridge_state" \
        "$bridge_state.tmp" "$dev"/pgbridge-spool-*
    say "removed .dev/pg, .dev/nats, .dev/kafka-server and the bridge's state and spool"
    exit 0 ;;
esac

# --- PostgreSQL ------------------------------------------------------------------------------
if [ ! -f "$pgdir/data/PG_VERSION" ]; then
    rm -rf "$pgdir"
    mkdir -p "$pgdir"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$pgdir"
    printf '%s\n' "$su_password" > "$pgdir/pwfile"
    chmod 644 "$pgdir/pwfile"
    as_pg "$PG_BIN/initdb" -D "$pgdir/data" -U postgres -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 --pwfile="$pgdir/pwfile" >/dev/null
    say "initialised a PostgreSQL cluster in $pgdir/data"
fi
if ! as_pg "$PG_BIN/pg_ctl" -D "$pgdir/data" status >/dev/null 2>&1; then
    as_pg "$PG_BIN/pg_ctl" -D "$pgdir/data" -w -l "$pgdir/postgres.log" \
        -o "-p $pg_port -k $pgdir -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10" \
        start >/dev/null
    say "PostgreSQL listening on 127.0.0.1:$pg_port (log: $pgdir/postgres.log)"
else
    # Already running, maybe started with another DEV_PG_PORT (or an older default): its port
    # is the fourth line of postmaster.pid.
    running_port="$(sed -n 4p "$pgdir/data/postmaster.pid" 2>/dev/null || true)"
    if [ -n "$running_port" ] && [ "$running_port" != "$pg_port" ]; then
        say "PostgreSQL in $pgdir/data runs on port $running_port, not $pg_port: run scripts/dev.sh stop first, or set DEV_PG_PORT=$running_port"
        exit 1
    fi
fi

export PGHOST=127.0.0.1 PGPORT="$pg_port" PGUSER=postgres PGPASSWORD="$su_password"
if [ "${1:-}" = psql ]; then shift; exec psql -d "$db" "$@"; fi

psql -X -q -d postgres -tc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
    psql -X -q -d postgres -c "CREATE DATABASE $db"
psql -X -q -d "$db" -v ON_ERROR_STOP=1 <<'SQL'
CREATE TABLE IF NOT EXISTS users (id bigserial PRIMARY KEY, email text NOT NULL, name text, created_at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS orders (id bigserial PRIMARY KEY, user_id bigint REFERENCES users, total numeric(12,2), items jsonb);
SQL
PGDATABASE="$db" BRIDGE_PG_PASSWORD="$reader_password" ./deploy/init.sh >/dev/null

# --- nats-server (or the Kafka broker) ---------------------------------------------------------
if [ "$sink" = kafka ]; then
    start_kafka
    export KAFKA_BROKERS="127.0.0.1:$kafka_port"
fi
mkdir -p "$natsdir"
if [ "$sink" != kafka ] && ! { [ -f "$natsdir/nats.pid" ] && kill -0 "$(cat "$natsdir/nats.pid")" 2>/dev/null; }; then
    setsid "$NATS_SERVER_BIN" -js -a 127.0.0.1 -p "$nats_port" -sd "$natsdir/store" \
        -P "$natsdir/nats.pid" -l "$natsdir/nats.log" </dev/null >/dev/null 2>&1 &
    # Up only once it accepts connections; it exits at once when the port is taken.
    up=""
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && [ -f "$natsdir/nats.pid" ] &&
            kill -0 "$(cat "$natsdir/nats.pid")" 2>/dev/null; then
            up=1
            break
        fi
        sleep 0.1
    done
    if [ -z "$up" ]; then
        say "nats-server did not start on 127.0.0.1:$nats_port (another process may use the port: set DEV_NATS_PORT); its log ends:"
        tail -n 3 "$natsdir/nats.log" >&2 2>/dev/null || true
        exit 1
    fi
    say "nats-server with JetStream on 127.0.0.1:$nats_port (log: $natsdir/nats.log)"
fi

# --- the bridge ------------------------------------------------------------------------------
if bridge_running; then
    say "a bridge is already running (pid $(cat "$bridge_pid")); scripts/dev.sh stop stops it"
    exit 1
fi
if [ ! -x "$bridge_bin" ]; then
    say "building the bridge into $bridge_bin (the first build takes a few minutes)..."
fi
# cargo's own progress shows; it is quick when nothing changed.
CARGO_TARGET_DIR="$target_dir" cargo build --release --locked
say "environment of this bridge, to run it or bridge mirror by hand:"
say "  export PG_HOST=127.0.0.1 PG_PORT=$pg_port PG_USER=bridge_reader PG_PASSWORD=$reader_password PG_DB=$db NATS_URL=nats://127.0.0.1:$nats_port"
say "try: scripts/dev.sh psql, then INSERT INTO users (email) VALUES ('a@example.com');"
say "stop the bridge with Ctrl-C; the servers keep running until scripts/dev.sh stop"
export PG_HOST=127.0.0.1 PG_PORT="$pg_port" PG_USER=bridge_reader PG_PASSWORD="$reader_password" PG_DB="$db"
export NATS_URL="nats://127.0.0.1:$nats_port"
unset PGHOST PGPORT PGUSER PGPASSWORD
# The bridge's spool of large transactions goes under .dev/ too, so clean removes it.
mkdir -p "$bridge_tmp"
# exec keeps this process id: the pid file names the bridge, for stop and clean.
echo $$ >"$bridge_pid"
TMPDIR="$bridge_tmp" exec "$bridge_bin" --state-file "$bridge_state" "$@"
