#!/usr/bin/env bash
# Make sure Debian's chromium is installed for the dashboard's browser tests
# (driven headless by Playwright with executable_path=/usr/bin/chromium; Playwright
# never downloads a browser of its own). Idempotent: does nothing when it is there.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "browser: /usr/bin/chromium is missing; install Debian's 'chromium' package as root" >&2
    exit 1
fi
echo "browser: installing chromium from Debian's packages" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version >&2
