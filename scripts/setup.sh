#!/usr/bin/env bash
# Install taskd and its test dependencies into ./.venv (idempotent).
# Needs python3 >= 3.11 with venv; on a bare Debian machine it installs
# python3-venv first (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "setup: installing python3-venv" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The distribution was called "taskd" before it became "taskd-queue": drop the old
# editable install, or both would provide the taskd package and command.
if .venv/bin/python -m pip show -q taskd >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -q -y taskd >/dev/null 2>&1 || true
fi
log=$(mktemp -t taskd-setup.XXXXXX.log)
if ! .venv/bin/python -m pip install -e '.[test]' >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip install failed (output above)" >&2
    exit 1
fi
rm -f "$log"
echo "setup: taskd installed in $(pwd)/.venv"
