#!/usr/bin/env bash
# Installs the Apache Kafka broker the Kafka tests and `scripts/dev.sh --sink kafka` run: the
# broker's jars and their runtime dependencies from Maven Central (scripts/kafka/pom.xml),
# resolved by Maven into .dev/kafka/libs, and Java 17 and Maven (Debian packages) when missing.
# Safe to run any number of times. Appends KAFKA_LIBS (the jar directory) to .dev/env.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dev="$root/.dev"
pom="$root/scripts/kafka/pom.xml"
libs="$dev/kafka/libs"
mkdir -p "$dev"

say() { printf 'install-kafka: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        say "need root to run: $*"; exit 1
    fi
}

missing=()
java_major() { java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]; exit}'; }
if ! command -v java >/dev/null 2>&1 || [ "$(java_major)" -lt 17 ]; then
    missing+=(openjdk-17-jre-headless)
fi
command -v mvn >/dev/null 2>&1 || missing+=(maven)
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The stamp names the pom's content: a changed version resolves again.
stamp="$libs/.pom-$(sha256sum "$pom" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    say "resolving the Kafka broker and its dependencies with Maven into $libs"
    rm -rf "$libs"
    mkdir -p "$libs"
    mvn -q -B -f "$pom" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$libs" >&2
    touch "$stamp"
fi
ls "$libs"/kafka_2.13-*.jar >/dev/null

# install-deps.sh writes .dev/env anew; this adds its line once.
env_file="$dev/env"
touch "$env_file"
grep -v '^export KAFKA_LIBS=' "$env_file" > "$env_file.tmp" || true
printf 'export KAFKA_LIBS="%s"\n' "$libs" >> "$env_file.tmp"
mv "$env_file.tmp" "$env_file"
say "ok: $(basename "$(ls "$libs"/kafka_2.13-*.jar)") and $(ls "$libs"/*.jar | wc -l) jars in $libs"
