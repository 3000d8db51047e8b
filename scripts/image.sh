#!/usr/bin/env bash
# Builds the FROM scratch images pgbridge:<version> (NATS only, cargo features off) and
# pgbridge:<version>-kafka (with the Kafka sink, cargo feature `kafka`) without Docker, and
# checks each (IMAGE_VARIANT=nats or kafka builds and checks one):
#   1. the static build (cargo profile `image`: release with fat LTO) of the Dockerfile's build stage (static glibc PIE, OpenSSL
#      linked statically), checked with ldd;
#   2. the image, with buildah (no daemon, no base image, no registry): deploy/rootfs.sh lays
#      out its files, and its configuration is the Dockerfile's own final stage;
#   3. its size (at most IMAGE_MAX_MIB, default 15 MiB; the Kafka image at most
#      KAFKA_IMAGE_MAX_MIB, default 18 MiB; the NATS-only image measured 14.45 MiB with
#      fat LTO, 14.98 MiB with the release profile's thin LTO), `bridge --version` and `bridge health`
#      run as user 65532 inside it, and its entrypoint streaming an inserted row into
#      JetStream from a throw-away PostgreSQL and nats-server on loopback.
# buildah's storage lives in a temporary directory, removed at the end with everything else
# the script started or created. IMAGE_ARCHIVE=FILE keeps the image as an OCI archive (the
# Kafka image as FILE with -kafka before its extension)
# (load it with `podman load` or `skopeo`). Needs root (buildah, and PostgreSQL run as the
# postgres user); installs buildah with apt-get when missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

started=$(date +%s)
# Both images, one after the other: a second release build (librdkafka and the bridge again).
if [ -z "${IMAGE_VARIANT:-}" ]; then
    IMAGE_VARIANT=nats "$0" "$@"
    IMAGE_VARIANT=kafka exec "$0" "$@"
fi
case "$IMAGE_VARIANT" in
nats) max_mib="${IMAGE_MAX_MIB:-15}" features="" suffix="" ;;
kafka) max_mib="${KAFKA_IMAGE_MAX_MIB:-18}" features="kafka" suffix="-kafka" ;;
*) printf 'image: IMAGE_VARIANT must be nats or kafka\n' >&2; exit 2 ;;
esac
say() { printf 'image: %s\n' "$*" >&2; }
die() { printf 'image: FAILED: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    say "run as root (buildah's chroot isolation and the throw-away PostgreSQL need it)"
    exit 2
fi

# The test command installs them first and runs this beside the tests, with .dev/env's
# settings in its environment: installing (or reading .dev/env) again could meet another
# step rewriting it.
if [ "${PGBRIDGE_DEPS_INSTALLED:-}" != 1 ]; then
    ./scripts/install-deps.sh
    # shellcheck source=/dev/null
    . .dev/env
fi
if ! command -v buildah >/dev/null 2>&1; then
    say "apt-get install buildah"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah >/dev/null
fi

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
[ -n "$version" ] || die "no version in Cargo.toml"
image="pgbridge:$version$suffix"

# --- the static binary, exactly as the Dockerfile's build stage ------------------------------
host="$(rustc -vV | sed -n 's/^host: //p')"
say "static release build for $host (features: ${features:-none})"
OPENSSL_STATIC=1 \
    RUSTFLAGS='-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom"' \
    cargo build --profile image --locked --quiet --target "$host" --bin bridge \
    --no-default-features --features "$features"
bin="target/$host/image/bridge"
ldd "$bin" 2>&1 | grep -q "statically linked" ||
    die "$bin is not statically linked: $(ldd "$bin" 2>&1 | head -n 3 | tr '\n' ' ')"
full_bytes=$(stat -c %s "$bin")

# --- everything below is temporary and removed on exit ---------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/pgbridge-image.XXXXXX")"
ba=(buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
bridge_pid=""
nats_pid=""
ctr=""
cleanup() {
    set +e
    if [ -n "$bridge_pid" ] && kill -0 "$bridge_pid" 2>/dev/null; then
        kill -TERM "$bridge_pid" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$bridge_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$bridge_pid" 2>/dev/null
    fi
    if [ -f "$work/pg/data/postmaster.pid" ]; then
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$work/pg/data" -m immediate -w stop >/dev/null 2>&1
    fi
    if [ -n "$nats_pid" ]; then kill -TERM "$nats_pid" 2>/dev/null; wait "$nats_pid" 2>/dev/null; fi
    if [ -d "$work/storage" ]; then
        "${ba[@]}" rm --all >/dev/null 2>&1
        "${ba[@]}" rmi --all --force >/dev/null 2>&1
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- the image ---------------------------------------------------------------------------------
ctx="$work/context"
mkdir -p "$ctx"
# Stripped, as in the Dockerfile: the release profile's line tables (for profiling and
# backtraces on the development machine) are three quarters of the file.
strip -o "$ctx/bridge" "$bin"
bin_bytes=$(stat -c %s "$ctx/bridge")
sh deploy/rootfs.sh "$work/rootfs"
# COPY --from=build keeps the owners the build stage set (/data is 65532's), COPY from a
# context resets them to root; ADD of a tar archive keeps them.
tar -C "$work/rootfs" --numeric-owner -cf "$ctx/rootfs.tar" .
# The final stage of the Dockerfile, with its two COPY --from=build lines reading the same
# files from this context: one definition of the image's configuration.
sed -n '/^FROM scratch$/,$p' Dockerfile > "$ctx/Containerfile"
grep -qx 'COPY --from=build /rootfs/ /' "$ctx/Containerfile" &&
    grep -qx 'COPY --from=build /bridge /bridge' "$ctx/Containerfile" &&
    [ "$(grep -c -- '--from=' "$ctx/Containerfile")" -eq 2 ] ||
    die "the Dockerfile's final stage no longer copies exactly /rootfs/ and /bridge from the build stage: update scripts/image.sh"
sed -i -e 's#^COPY --from=build /rootfs/ /$#ADD rootfs.tar /#' \
    -e 's#^COPY --from=build /bridge /bridge$#COPY bridge /bridge#' "$ctx/Containerfile"
say "buildah build $image"
# Docker format: OCI image configs have no HEALTHCHECK.
"${ba[@]}" build --quiet --isolation chroot --format docker --layers=false \
    -f "$ctx/Containerfile" -t "$image" "$ctx" >/dev/null
# The size as `docker images` shows it: the files of the image's root, uncompressed.
ctr="$("${ba[@]}" from --quiet "$image")"
rootfs="$("${ba[@]}" mount "$ctr")"
img_bytes=$(du -sb "$rootfs" | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
say "image $image: $(mib "$img_bytes") (stripped binary $(mib "$bin_bytes"), unstripped $(mib "$full_bytes"))"
limit=$((max_mib * 1048576))
if [ "$img_bytes" -gt "$limit" ]; then
    if [ "$bin_bytes" -gt "$limit" ]; then
        die "image $(mib "$img_bytes") is over $max_mib MiB: the stripped binary alone is $(mib "$bin_bytes"), $(mib $((bin_bytes - limit))) over"
    fi
    die "image $(mib "$img_bytes") is over $max_mib MiB (stripped binary $(mib "$bin_bytes"))"
fi
checks=("size <= $max_mib MiB")

# Standard input from /dev/null: with a pipe or terminal there, buildah 1.28 now and then
# lost the output of a process that exits at once (1 run in 20 here).
run() { "${ba[@]}" run --isolation chroot --network host --user 65532:65532 "$@" </dev/null; }
# It still lost one, rarely (once in a clean-clone CI run on a busy machine; 0 in 70 runs
# here, idle or beside two busy loops): the process ran and exited, its output did not come
# back (buildah's own lines about the exit status may still be there). So a run whose output
# lacks the line expected (an extended regular expression) is run again, at most three times
# in all, and said so; the last run's output and exit status are judged as before. Sets `out`
# and `rc`.
run_expecting() {
    local expected="$1" attempt
    shift
    for attempt in 1 2 3; do
        set +e
        out="$(run "$@" 2>&1)"
        rc=$?
        set -e
        grep -Eq -- "$expected" <<<"$out" && return 0
        say "buildah run gave no line matching '$expected' (exit $rc, attempt $attempt of 3)"
    done
}
[ "$(stat -c %u:%g "$rootfs/data")" = 65532:65532 ] || die "/data is not owned by 65532 in the image"
[ -s "$rootfs/etc/ssl/certs/ca-certificates.crt" ] || die "no CA certificates in the image"
checks+=("layout")

run_expecting "^bridge " "$ctr" -- /bridge --version
[ "$rc" -eq 0 ] || die "bridge --version failed in the image (exit $rc): $out"
[[ "$out" == *"$version"* ]] || die "bridge --version printed '$out', expected version $version"
say "as 65532: $out"
checks+=("--version")

dead_port="$(free_port)"
run_expecting "^bridge: health check failed: " --env BRIDGE_PORT="$dead_port" "$ctr" -- /bridge health
[ "$rc" -eq 1 ] || die "bridge health against a closed port exited $rc, expected 1: $out"
# buildah adds lines of its own about the exit status: keep the bridge's.
line="$(printf '%s\n' "$out" | grep -m 1 '^bridge: health check failed: ')" ||
    die "bridge health printed no clear line: $out"
say "as 65532, nothing on port $dead_port: exit 1, $line"
checks+=("health")

# --- the entrypoint streams a row into JetStream ----------------------------------------------
pg_port="$(free_port)"
nats_port="$(free_port)"
nats_mon="$(free_port)"
http_port="$(free_port)"
mkdir -p "$work/pg" "$work/nats"
chown postgres: "$work/pg"
chmod 755 "$work"
printf 'image_su\n' > "$work/pg/pwfile"
chmod 644 "$work/pg/pwfile"
runuser -u postgres -- "$PG_BIN/initdb" -D "$work/pg/data" -U postgres -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 --pwfile="$work/pg/pwfile" >/dev/null
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$work/pg/data" -w -l "$work/pg/postgres.log" \
    -o "-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_wal_senders=4 -c max_replication_slots=4" \
    start >/dev/null
"$NATS_SERVER_BIN" -js -a 127.0.0.1 -p "$nats_port" -m "$nats_mon" -sd "$work/nats/store" \
    -l "$work/nats/nats.log" </dev/null >/dev/null 2>&1 &
nats_pid=$!

export PGHOST=127.0.0.1 PGPORT="$pg_port" PGUSER=postgres PGPASSWORD=image_su
psql -X -q -d postgres -c "CREATE DATABASE app"
psql -X -q -d app -c "CREATE TABLE users (id bigint PRIMARY KEY, email text)"
PGDATABASE=app BRIDGE_PG_PASSWORD=image_reader ./deploy/init.sh >/dev/null
for _ in $(seq 1 100); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$nats_mon/healthz', timeout=1)" 2>/dev/null && break
    sleep 0.1
done

entrypoint="$("${ba[@]}" inspect --type image --format '{{.Docker.Config.Entrypoint}}' "$image")"
[ "$entrypoint" = '[/bridge]' ] || die "unexpected entrypoint $entrypoint (expected [/bridge])"
token="image-check-$RANDOM$RANDOM"
run --env PG_HOST=127.0.0.1 --env PG_PORT="$pg_port" --env PG_USER=bridge_reader \
    --env PG_PASSWORD=image_reader --env PG_DB=app --env NATS_URL="nats://127.0.0.1:$nats_port" \
    --env BRIDGE_PORT="$http_port" --env BRIDGE_ADMIN_TOKEN="$token" --env RUST_LOG=info \
    "$ctr" -- /bridge >"$work/bridge.log" 2>&1 &
bridge_pid=$!

http() { # METHOD PATH: prints the status code and body, nothing when unreachable
    python3 - "$1" "http://127.0.0.1:$http_port$2" "$token" <<'PY' 2>/dev/null
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[2], method=sys.argv[1],
                             headers={"Authorization": "Bearer " + sys.argv[3]})
try:
    with urllib.request.urlopen(req, timeout=2) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
PY
}
stream_messages() { # messages stored in the CDC stream, per nats-server's monitoring endpoint
    python3 - "http://127.0.0.1:$nats_mon/jsz?streams=true" <<'PY' 2>/dev/null || echo 0
import json, sys, urllib.request
jsz = json.load(urllib.request.urlopen(sys.argv[1], timeout=2))
print(sum(s["state"]["messages"] for a in jsz.get("account_details", [])
          for s in a.get("stream_detail", []) if s["name"] == "CDC"))
PY
}
wait_until() { # SECONDS DESCRIPTION COMMAND...: polls the command once every 0.25 s
    local deadline=$(($(date +%s) + $1)) what="$2"
    shift 2
    until "$@"; do
        if ! kill -0 "$bridge_pid" 2>/dev/null; then
            die "the bridge exited while waiting for $what; its log: $(tail -n 20 "$work/bridge.log")"
        fi
        [ "$(date +%s)" -lt "$deadline" ] ||
            die "timed out waiting for $what; the bridge's log: $(tail -n 20 "$work/bridge.log")"
        sleep 0.25
    done
}
healthy() { [[ "$(http GET /health)" == 200* ]]; }
one_message() { [ "$(stream_messages)" -ge 1 ]; }
wait_until 60 "/health 200 from the image's entrypoint" healthy
psql -X -q -d app -c "INSERT INTO users VALUES (1, 'image@example.com')"
wait_until 30 "the inserted row in the CDC stream" one_message
say "the entrypoint as 65532 streamed the row: $(stream_messages) message(s) in stream CDC"
# A clean stop through the admin endpoint: the bridge drains and exits 0.
out="$(http POST /shutdown)"
[[ "$out" == 2* ]] || die "POST /shutdown answered: $out"
for _ in $(seq 1 120); do kill -0 "$bridge_pid" 2>/dev/null || break; sleep 0.25; done
kill -0 "$bridge_pid" 2>/dev/null && die "the bridge did not stop within 30 s of POST /shutdown"
set +e
wait "$bridge_pid"
rc=$?
set -e
bridge_pid=""
[ "$rc" -eq 0 ] || die "the bridge exited $rc after POST /shutdown; its log: $(tail -n 20 "$work/bridge.log")"
# /data is a VOLUME: buildah run mounts a fresh volume there, seeded from the image, as
# Docker does. The state file must be in it, written by 65532.
state="$(find "$work/storage" -path '*/buildah-volumes/*' -name pgbridge-cdc_slot.lsn -size +0 | head -n 1)"
[ -n "$state" ] || die "no state file written to the /data volume; the bridge's log: $(tail -n 20 "$work/bridge.log")"
[ "$(stat -c %u "$state")" = 65532 ] || die "the state file in /data is not owned by 65532"
checks+=("streams to JetStream and stops cleanly")

if [ -n "${IMAGE_ARCHIVE:-}" ]; then
    archive="$IMAGE_ARCHIVE"
    [ -z "$suffix" ] || archive="${IMAGE_ARCHIVE%.*}$suffix.${IMAGE_ARCHIVE##*.}"
    "${ba[@]}" push --quiet "$image" "oci-archive:$archive:$image" >/dev/null
    say "saved $image to $archive"
fi

summary="$(IFS=,; echo "${checks[*]}" | sed 's/,/, /g')"
echo "image: $image $(mib "$img_bytes") (limit $max_mib MiB), checks passed: $summary ($(($(date +%s) - started)) s)"
