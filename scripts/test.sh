#!/usr/bin/env bash
# The test command: install everything, make sure RabbitMQ runs and chromium is
# installed (the dashboard's browser tests), run the suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k routing).
# The suite runs in TASKD_TEST_PROCESSES processes (pytest-xdist, default 3): most
# tests wait on a broker or a worker, not on the CPU, so three share two cores well.
# Each test file runs whole in one process (--dist loadfile), so a module-scoped
# fixture (the private cluster, the dashboard's browser) is made once and a file's
# tests keep their order. (--dist loadgroup would be finer, but with pytest 9 and
# pytest-xdist 3.8 it spreads a group's tests over all processes.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/broker.sh
bash scripts/stores.sh
bash scripts/browser.sh
exec .venv/bin/python -m pytest -n "${TASKD_TEST_PROCESSES:-3}" --dist loadfile "$@"
