#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers AMQP at $TASKD_BROKER_URL
# (default amqp://guest:guest@127.0.0.1:5672/%2F). Idempotent:
#   - one answers: do nothing;
#   - none answers and the URL is local: install rabbitmq-server from Debian's
#     packages if missing (needs root), start it with `rabbitmq-server -detached`,
#     and wait until it accepts AMQP connections;
#   - it never does: say why and exit 1.
set -euo pipefail
URL=${TASKD_BROKER_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}
WAIT=${TASKD_BROKER_WAIT:-90}

read -r HOST PORT < <(python3 - "$URL" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
print(u.hostname or "localhost", u.port or (5671 if u.scheme == "amqps" else 5672))
PY
)

amqp_answers() {
    # Send the AMQP 0-9-1 protocol header; a broker answers with a method frame.
    python3 - "$HOST" "$PORT" <<'PY'
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    s.settimeout(3)
    s.sendall(b"AMQP\x00\x00\x09\x01")
    sys.exit(0 if s.recv(1) == b"\x01" else 1)
except OSError:
    sys.exit(1)
PY
}

if amqp_answers; then
    echo "broker: RabbitMQ answers at $HOST:$PORT"
    exit 0
fi
case "$HOST" in
    127.*|localhost|::1) ;;
    *) echo "broker: nothing answers AMQP at $HOST:$PORT, and it is not this machine:" \
            "start it there or fix TASKD_BROKER_URL" >&2; exit 1 ;;
esac
if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "broker: rabbitmq-server is not installed and this is not root:" \
             "run 'sudo apt-get install rabbitmq-server'" >&2
        exit 1
    fi
    echo "broker: installing rabbitmq-server from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq rabbitmq-server >/dev/null
fi
if [ "$PORT" != 5672 ]; then
    export RABBITMQ_NODE_PORT=$PORT
fi
echo "broker: starting RabbitMQ (rabbitmq-server -detached)"
if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then
    # Run as the package's own user when we can, like its service does.
    su -s /bin/sh rabbitmq -c 'rabbitmq-server -detached' 2>/dev/null || rabbitmq-server -detached
else
    rabbitmq-server -detached
fi
for _ in $(seq "$WAIT"); do
    if amqp_answers; then
        echo "broker: RabbitMQ answers at $HOST:$PORT"
        exit 0
    fi
    sleep 1
done
echo "broker: RabbitMQ did not accept AMQP connections at $HOST:$PORT within ${WAIT}s;" \
     "see /var/log/rabbitmq/ for why" >&2
exit 1
