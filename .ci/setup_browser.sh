#!/usr/bin/env bash
# Headless Chromium for the trajectory viewer's browser tests (tests/viewer/).
# Playwright drives the Debian chromium binary through CDP, so no browser download is needed:
# never run `playwright install`. Idempotent: skips work already done.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if ! command -v chromium >/dev/null 2>&1; then
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi

PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c "import playwright" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q "playwright>=1.45"
fi

chromium --version
