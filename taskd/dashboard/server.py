"""Run the dashboard: the store, the ingest thread and the web server in one process."""
from __future__ import annotations

import logging
import os
import socket

import sqlalchemy.exc
import uvicorn

from ..masking import mask_url
from .ingest import Ingest
from .security import Guard
from .store import Store
from .web import Dashboard

log = logging.getLogger(__name__)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def build(config, listen: str, environ=None):
    """The store, the ingest (not started) and the application for ``config``."""
    environ = os.environ if environ is None else environ
    host, _port = split_listen(listen)
    token = environ.get("TASKD_DASHBOARD_TOKEN") or config["dashboard.admin_token"]
    store = Store(config["dashboard.database"])
    ingest = Ingest(config, store)
    return store, ingest, Dashboard(config, store, Guard(token, host), ingest)


def serve(config, listen: str) -> int:
    try:
        store, ingest, dashboard = build(config, listen)
    except (OSError, sqlalchemy.exc.SQLAlchemyError) as exc:
        log.error("dashboard: cannot open dashboard.database %s: %s",
                  mask_url(config["dashboard.database"]), getattr(exc, "orig", None) or exc)
        return 78
    host, port = split_listen(listen)
    if not dashboard.guard.open_reading and not dashboard.guard.admin_token:
        log.error("dashboard: listening on %s needs an admin token (dashboard.admin_token or "
                  "$TASKD_DASHBOARD_TOKEN): off loopback every page asks for it", host)
        return 78
    try:
        sock = _bind(host, port)
    except OSError as exc:
        log.error("dashboard: cannot listen on %s: %s", listen, exc.strerror or exc)
        store.close()
        return 1
    ingest.start()          # only once it can serve: a failed start leaves no event queue
    log.info("dashboard: serving on http://%s:%d/ (history in %s)", host, port,
             mask_url(config["dashboard.database"]))
    try:
        uvicorn.Server(uvicorn.Config(dashboard.app, host=host, port=port, log_level="warning",
                                      access_log=False, proxy_headers=False)).run(sockets=[sock])
    finally:
        ingest.stop()
        store.close()
    return 0
