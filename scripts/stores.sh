#!/usr/bin/env bash
# Make sure the result stores the suite uses answer: Redis at $TASKD_TEST_REDIS
# (default redis://127.0.0.1:6379/0) and PostgreSQL at $TASKD_TEST_POSTGRES
# (default postgresql://postgres@127.0.0.1/test). Idempotent, like broker.sh:
#   - one answers: do nothing;
#   - none answers on this machine: install it from Debian's packages if missing
#     (needs root), start it, and wait until it answers (PostgreSQL: also make the
#     `test` database, trust auth on 127.0.0.1 as the package's default cluster has);
#   - it never does: say why and exit 1.
# The suite also needs the redis-server binary itself (a fault test starts a private one).
set -euo pipefail
REDIS_URL=${TASKD_TEST_REDIS:-redis://127.0.0.1:6379/0}
PG_URL=${TASKD_TEST_POSTGRES:-postgresql://postgres@127.0.0.1/test}
WAIT=${TASKD_STORES_WAIT:-60}

read -r RHOST RPORT < <(python3 - "$REDIS_URL" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or 6379)
PY
)
read -r PHOST PPORT < <(python3 - "$PG_URL" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or 5432)
PY
)

redis_answers() {
    python3 - "$RHOST" "$RPORT" <<'PY'
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    s.settimeout(3)
    s.sendall(b"PING\r\n")
    sys.exit(0 if s.recv(7).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}

pg_answers() {
    pg_isready -q -h "$PHOST" -p "$PPORT" 2>/dev/null
}

install() {     # install Debian packages $@ (needs root)
    if [ "$(id -u)" != 0 ]; then
        echo "stores: $* not installed and this is not root: run 'sudo apt-get install $*'" >&2
        exit 1
    fi
    echo "stores: installing $* from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$@" >/dev/null
}

local_host() {
    case "$1" in 127.*|localhost|::1) return 0 ;; *) return 1 ;; esac
}

# -- Redis ----------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
    install redis-server
fi
if redis_answers; then
    echo "stores: Redis answers at $RHOST:$RPORT"
else
    local_host "$RHOST" || { echo "stores: no Redis at $RHOST:$RPORT, and it is not this" \
        "machine: start it there or set TASKD_TEST_REDIS" >&2; exit 1; }
    echo "stores: starting Redis on port $RPORT"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$RPORT" --save "" \
        --appendonly no --dir /tmp --logfile /tmp/taskd-redis.log
    for _ in $(seq "$WAIT"); do redis_answers && break; sleep 1; done
    redis_answers || { echo "stores: Redis did not answer within ${WAIT}s;" \
        "see /tmp/taskd-redis.log" >&2; exit 1; }
    echo "stores: Redis answers at $RHOST:$RPORT"
fi

# -- PostgreSQL -----------------------------------------------------------------
if ! command -v pg_isready >/dev/null 2>&1 || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    if pg_answers 2>/dev/null; then :; else install postgresql; fi
fi
if pg_answers; then
    echo "stores: PostgreSQL answers at $PHOST:$PPORT"
else
    local_host "$PHOST" || { echo "stores: no PostgreSQL at $PHOST:$PPORT, and it is not" \
        "this machine: start it there or set TASKD_TEST_POSTGRES" >&2; exit 1; }
    VERSION=$(ls /etc/postgresql | sort -n | tail -1)
    echo "stores: starting PostgreSQL $VERSION (pg_ctlcluster $VERSION main start)"
    pg_ctlcluster --skip-systemctl-redirect "$VERSION" main start
    for _ in $(seq "$WAIT"); do pg_answers && break; sleep 1; done
    pg_answers || { echo "stores: PostgreSQL did not answer within ${WAIT}s;" \
        "see /var/log/postgresql/" >&2; exit 1; }
    echo "stores: PostgreSQL answers at $PHOST:$PPORT"
fi
# The suite connects as in $PG_URL over TCP; a fresh cluster only lets the postgres
# user in through the socket: allow local TCP (trust, loopback only) and make the
# database, once.
if ! python3 - "$PG_URL" <<'PY' 2>/dev/null
import subprocess, sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
cmd = ["psql", "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 5432),
       "-U", u.username or "postgres", "-d", (u.path or "/test").lstrip("/") or "test",
       "-tAc", "SELECT 1"]
sys.exit(subprocess.run(cmd, capture_output=True).returncode)
PY
then
    if [ "$(id -u)" != 0 ] || ! local_host "$PHOST"; then
        echo "stores: cannot connect as $PG_URL; grant that user access (trust on" \
             "127.0.0.1) and create its database" >&2
        exit 1
    fi
    VERSION=$(ls /etc/postgresql | sort -n | tail -1)
    HBA=/etc/postgresql/$VERSION/main/pg_hba.conf
    if ! grep -q "taskd-suite" "$HBA"; then
        echo "stores: allowing trust on 127.0.0.1 in $HBA (for the suite)"
        sed -i '1i host all all 127.0.0.1/32 trust # taskd-suite\nhost all all ::1/128 trust # taskd-suite' "$HBA"
        su postgres -c "psql -qc 'SELECT pg_reload_conf()'" >/dev/null
    fi
    DB=$(python3 -c 'import sys,urllib.parse; print((urllib.parse.urlsplit(sys.argv[1]).path or "/test").lstrip("/") or "test")' "$PG_URL")
    su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname = '$DB'\"" | grep -q 1 \
        || su postgres -c "createdb '$DB'"
    echo "stores: PostgreSQL database $DB ready"
fi
