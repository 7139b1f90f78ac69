#!/usr/bin/env bash
# Headless Chromium for the dashboard's browser test (Debian package `chromium`).
# A no-op when it is there; installs it with apt as root; otherwise says what to do.
set -euo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_chromium: not root; install the Debian package chromium" \
        "(tests/test_dashboard.py renders the run page with it)" >&2
    exit 1
fi
echo "install_chromium: installing chromium"
DEBIAN_FRONTEND=noninteractive apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
chromium --version
