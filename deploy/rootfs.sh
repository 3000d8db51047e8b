#!/bin/sh
# Lays out the files of the FROM scratch image (everything but the binary) under DIR: the
# writable state and temp directories, the unprivileged user 65532, CA certificates.
# The Dockerfile's build stage and scripts/image.sh both run it, so the two images match.
#
#   deploy/rootfs.sh DIR [CA_BUNDLE]     (CA_BUNDLE: /etc/ssl/certs/ca-certificates.crt)
set -eu
dir="${1:?usage: deploy/rootfs.sh DIR [CA_BUNDLE]}"
ca="${2:-/etc/ssl/certs/ca-certificates.crt}"
if [ ! -f "$ca" ]; then
    echo "rootfs: no CA bundle at $ca (install the ca-certificates package)" >&2
    exit 2
fi
mkdir -p "$dir/data" "$dir/tmp" "$dir/etc/ssl/certs"
# Spool files of large transactions go to /tmp; any user may write there, as on a host.
chmod 1777 "$dir/tmp"
# The state file is written to /data (the working directory) by the unprivileged user.
chown 65532:65532 "$dir/data"
echo "nonroot:x:65532:65532:pgbridge:/data:/sbin/nologin" > "$dir/etc/passwd"
echo "nonroot:x:65532:" > "$dir/etc/group"
cp "$ca" "$dir/etc/ssl/certs/ca-certificates.crt"
