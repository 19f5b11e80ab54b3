#!/usr/bin/env bash
# The test command: install everything, make sure RabbitMQ runs, run the suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k routing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/broker.sh
bash scripts/stores.sh
exec .venv/bin/python -m pytest "$@"
