#!/usr/bin/env bash
# The demo: install everything, make sure RabbitMQ runs, start `taskd worker`
# with the sample configuration, run the seed page's examples against it and
# print their results, then stop the worker with SIGTERM (warm shutdown).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/broker.sh
export TASKD_CONFIG=${TASKD_CONFIG:-$(pwd)/etc/taskd.yaml}
export PYTHONPATH=$(pwd)/examples${PYTHONPATH:+:$PYTHONPATH}
LOG=$(mktemp -t taskd-demo-worker.XXXXXX.log)
.venv/bin/taskd worker -c 2 >"$LOG" 2>&1 &
WORKER=$!
stop_worker() {
    if kill -0 "$WORKER" 2>/dev/null; then
        kill -TERM "$WORKER"
        wait "$WORKER" || true
    fi
}
trap stop_worker EXIT
echo "demo: worker started (pid $WORKER, log $LOG)"
.venv/bin/python examples/demo.py --worker-pid "$WORKER"
stop_worker
trap - EXIT
echo "demo: worker stopped; its log:"
sed 's/^/  | /' "$LOG"
