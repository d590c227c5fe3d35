#!/usr/bin/env bash
# CI step of the code sandbox (run as root on a fresh Debian machine): installs bubblewrap and
# docker, starts dockerd in the background, waits until it answers, builds the sandbox image.
# Idempotent. Never fails the CI run: whatever cannot be set up here makes the docker tests skip
# with their reason, and the step says so.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
    echo "setup_sandbox: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null \
        || echo "setup_sandbox: apt-get install ${need[*]} failed" >&2
fi

docker_answers() { timeout 5 docker version >/dev/null 2>&1; }

if ! docker_answers && command -v dockerd >/dev/null; then
    echo "setup_sandbox: starting dockerd (log: /var/log/miles-dockerd.log)"
    # Sandbox containers use network_mode=none, so no bridge or iptables rules are needed; this
    # also lets dockerd start on machines without iptables.
    nohup dockerd --bridge=none --iptables=false --ip6tables=false \
        >/var/log/miles-dockerd.log 2>&1 </dev/null &
    for _ in $(seq 1 60); do docker_answers && break; sleep 1; done
fi

if docker_answers; then
    bash "$here/scripts/build_sandbox_image.sh" || echo "setup_sandbox: image build failed; docker tests will skip" >&2
else
    echo "setup_sandbox: dockerd does not answer; docker tests will skip" >&2
    tail -n 20 /var/log/miles-dockerd.log 2>/dev/null >&2 || true
fi
exit 0
