#!/usr/bin/env bash
# The test command: install everything, make sure RabbitMQ runs and chromium is
# installed (the dashboard's browser tests), run the suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k routing).
# The suite runs in TASKD_TEST_PROCESSES processes (pytest-xdist, default 3): most
# tests wait on a broker or a worker, not on the CPU, so three share two cores well.
# Tests that share an expensive fixture (a private cluster) carry
# @pytest.mark.xdist_group(...) and run in one process (--dist loadgroup).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/broker.sh
bash scripts/stores.sh
bash scripts/browser.sh
exec .venv/bin/python -m pytest -n "${TASKD_TEST_PROCESSES:-3}" --dist loadgroup "$@"
