"""``taskd dashboard``: a web dashboard on durable task history (docs/dashboard.md).

The parts, one job each:

* :mod:`.events` (pure): Celery's worker events folded into rows;
* :mod:`.ingest`: the durable event queue on ``celeryev``, batches acked after commit;
* :mod:`.store`: SQLAlchemy Core tables on SQLite or PostgreSQL, queries, pruning;
* :mod:`.mailbox`: remote control over Celery's ``celery.pidbox`` mailbox;
* :mod:`.security`: sessions, the admin token, CSRF and Origin checks;
* :mod:`.web` and ``templates/``: the pages (Starlette, Jinja2); :mod:`.actions`: the POSTs;
* :mod:`.charts`: inline SVG drawn on the server.

It needs the ``dashboard`` extra (``pip install 'taskd-queue[dashboard]'``).
"""
from __future__ import annotations

import importlib.util

EXTRA = ("starlette", "uvicorn", "jinja2", "sqlalchemy", "multipart")


def missing_extra() -> str | None:
    """An error naming the extra to install, or None when everything is there."""
    absent = [m for m in EXTRA if importlib.util.find_spec(m) is None]
    if absent:
        return ("taskd dashboard needs the 'dashboard' extra (missing: " + ", ".join(absent)
                + "): pip install 'taskd-queue[dashboard]'")
    return None


def missing_driver(url: str) -> str | None:
    if url.startswith("postgresql") and importlib.util.find_spec("psycopg") is None:
        return ("dashboard.database is a PostgreSQL URL but psycopg 3 is not installed: "
                "pip install 'taskd-queue[dashboard,postgres]'")
    return None
