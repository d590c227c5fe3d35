#!/usr/bin/env bash
# Builds the default docker image of the code sandbox without any image registry: debootstrap a
# minimal Debian root that has python3, then `docker import` it. Idempotent: an existing image is
# kept unless FORCE=1.
#   IMAGE   image tag to create   (default miles-envs-sandbox:latest)
#   SUITE   Debian suite          (default: the host's, else bookworm)
#   MIRROR  Debian mirror         (default: the first deb line of the host's apt sources)
set -euo pipefail

IMAGE="${IMAGE:-miles-envs-sandbox:latest}"
SUITE="${SUITE:-$( (. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || true)}"
SUITE="${SUITE:-bookworm}"

host_mirror() {
    local line
    line=$(grep -rhoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1) || true
    echo "${line:-http://deb.debian.org/debian}"
}
MIRROR="${MIRROR:-$(host_mirror)}"

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "image $IMAGE already present (FORCE=1 rebuilds it)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install -y debootstrap" >&2; exit 1; }

root=$(mktemp -d /var/tmp/miles-sandbox-root.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap $SUITE from $MIRROR into $root"
debootstrap --variant=minbase --include=python3 "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# Trim what a code sandbox never needs: package caches, docs, locales.
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/locale/*
mkdir -p "$root/work"
chmod 1777 "$root/work"
tar -C "$root" -c . | docker import \
    --change 'USER 65534:65534' --change 'WORKDIR /work' --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/usr/bin/python3"]' - "$IMAGE"
echo "built $IMAGE"
