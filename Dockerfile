# The bridge as a FROM scratch image: one static binary, CA certificates, a passwd entry for
# the unprivileged user, and two writable directories. Nothing else: no shell, no libraries.
#
#   docker build -t pgbridge .                                        (NATS only: within 15 MiB)
#   docker build --build-arg FEATURES=kafka -t pgbridge:kafka .       (also the Kafka sink)
#   docker compose -f deploy/docker-compose.prod.yml up -d     (PostgreSQL, NATS and the bridge)
#
# Without Docker, scripts/image.sh builds the same image with buildah (no daemon, no base
# image: the same static build and deploy/rootfs.sh) and checks it.
#
# Static, not "binary plus shared libraries". A normal build needs libssl.so.3,
# libcrypto.so.3, libgcc_s.so.1, libc.so.6 and ld-linux-x86-64.so.2 (ldd target/release/bridge).
# musl cannot be used (its Rust target is not installable where this project is developed), so
# the binary is linked statically against glibc as a static PIE (-C target-feature=+crt-static)
# with OpenSSL's static libraries (OPENSSL_STATIC=1; libpq is built from source by pq-sys and
# uses them for TLS). Checked on Debian 12 (glibc 2.36) with exactly these commands: `ldd`
# reports "statically linked", and the binary, run as 65532 in an empty root holding only
# what this image holds plus /etc/hosts and /etc/resolv.conf (which Docker provides), resolves
# host names through both (glibc >= 2.34 carries its "files" and "dns" lookups inside libc,
# so no NSS module is needed), streams, and answers `bridge health`. The build fails if the
# result is not static.
#
# The development machine has no Docker engine, so this file itself is not built there. Its
# commands are the scripts' own: the packages scripts/install-deps.sh installs, and the static
# release build and final layout (deploy/rootfs.sh) of scripts/image.sh, which builds the same
# image with buildah in CI and checks it (size, --version and health as 65532, streaming).

FROM rust:1-bookworm AS build
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        build-essential pkg-config libssl-dev ca-certificates cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# RUSTFLAGS apply to the --target build only, not to build scripts and proc macros. The
# getrandom backend: a static binary cannot look up glibc's getrandom() with dlsym, and
# getrandom's fallback would then need /dev/urandom; this calls the system call directly.
ENV OPENSSL_STATIC=1 \
    RUSTFLAGS="-C target-feature=+crt-static --cfg getrandom_backend=\"linux_getrandom\""
# Cargo features of the binary: none for the NATS-only image; `kafka` adds the Kafka sink
# (librdkafka, built from source with cmake and linked statically), a few MiB more.
ARG FEATURES=""
# Stripped (as scripts/image.sh does): the release profile's line tables are three quarters
# of the binary and only serve profiling.
RUN target="$(rustc -vV | sed -n 's/^host: //p')" \
    && cargo build --profile image --locked --target "$target" --bin bridge \
        --no-default-features --features "$FEATURES" \
    && strip -o /bridge "target/$target/image/bridge" \
    && ldd /bridge 2>&1 | grep -q "statically linked" \
    && /bridge --version
# The final image's files (directories, user, CA certificates): the same script as
# scripts/image.sh runs, so the two images cannot drift.
RUN sh deploy/rootfs.sh /rootfs

FROM scratch
COPY --from=build /rootfs/ /
COPY --from=build /bridge /bridge
USER 65532:65532
# The state file (pgbridge-{slot}.lsn) is written to the working directory: mount a volume.
WORKDIR /data
VOLUME ["/data"]
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
EXPOSE 9090
# `bridge health` asks GET /health on the configured address (loopback when bound to 0.0.0.0).
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 CMD ["/bridge", "health"]
# SIGTERM drains and exits 0; give it time (docker stop -t, stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/bridge"]
