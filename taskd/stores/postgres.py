"""The PostgreSQL result store: one ``jsonb`` row per task (see :mod:`taskd.stores`).

``postgresql://USER:PASS@HOST:PORT/DB?table=NAME`` (``table`` may be
``schema.name``; default ``taskd_results``). The table is created if missing::

    task_id text PRIMARY KEY, status text, meta jsonb, date_done timestamptz,
    expires_at timestamptz            -- NULL: kept (result_expires: 0)

A write is an upsert (a SUCCESS already there stays) and ``pg_notify(<table>,
task_id)`` in the same transaction. ``wait()`` runs ``LISTEN`` on a connection
of its thread's, *then* reads the row, then sleeps until a notification names its
task: no polling (and ``UNLISTEN`` after, so an idle client holds back no
notifications). A lost connection is opened again (with back-off), and the
row read again. JSON only: nothing is pickled.

Expired rows are deleted by the workers (:meth:`AsyncPostgresStore.prune`, a
bounded ``DELETE`` on the ``expires_at`` index), so no extra daemon or beat
task is needed.
"""
from __future__ import annotations

import threading
import time
import urllib.parse
from typing import Iterable

import psycopg
from psycopg import sql

from .. import protocol
from ..exceptions import TimeoutError as TaskdTimeoutError
from . import DEFAULT_TABLE, decode, encode, ready

ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
BACKOFF = (0.05, 2.0)
SLICE = 1.0
#: Rows deleted by one prune at most (the next prune takes the rest).
PRUNE_BATCH = 5000


def split_url(url: str) -> tuple[str, list[str]]:
    """``(conninfo URL without taskd's parameters, [schema,] table)``."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    table = [v for k, v in query if k == "table"]
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "table"])
    name = (table[-1] if table else DEFAULT_TABLE).split(".")
    if not 1 <= len(name) <= 2 or not all(name):
        raise ValueError(f"result_backend: table={table[-1]!r} must be NAME or SCHEMA.NAME")
    scheme = "postgresql"
    return urllib.parse.urlunsplit(parts._replace(scheme=scheme, query=rest)), name


class _Sql:
    """The statements, for one table."""

    def __init__(self, name: list[str]) -> None:
        self.table = sql.Identifier(*name)
        self.channel = "_".join(name)[:63]
        index = sql.Identifier(f"{name[-1]}_expires_at"[:63])
        self.create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {t} (task_id text PRIMARY KEY, status text NOT NULL, "
            "meta jsonb NOT NULL, date_done timestamptz, expires_at timestamptz); "
            "CREATE INDEX IF NOT EXISTS {i} ON {t} (expires_at) WHERE expires_at IS NOT NULL"
        ).format(t=self.table, i=index)
        self.upsert = sql.SQL(
            "INSERT INTO {t} AS r (task_id, status, meta, date_done, expires_at) "
            "VALUES (%(id)s, (%(meta)s::jsonb)->>'status', %(meta)s::jsonb, "
            "CASE WHEN (%(meta)s::jsonb)->>'status' IN ('SUCCESS', 'FAILURE', 'REVOKED') "
            "THEN now() END, "
            "CASE WHEN %(ttl)s > 0 THEN now() + make_interval(secs => %(ttl)s) END) "
            "ON CONFLICT (task_id) DO UPDATE SET status = EXCLUDED.status, meta = EXCLUDED.meta, "
            "date_done = EXCLUDED.date_done, expires_at = EXCLUDED.expires_at "
            "WHERE r.status <> 'SUCCESS'").format(t=self.table)
        self.notify = sql.SQL("SELECT pg_notify({c}, %(id)s)").format(c=sql.Literal(self.channel))
        self.select = sql.SQL(
            "SELECT meta::text FROM {t} WHERE task_id = %s "
            "AND (expires_at IS NULL OR expires_at > now())").format(t=self.table)
        self.delete = sql.SQL("DELETE FROM {t} WHERE task_id = %s").format(t=self.table)
        self.prune = sql.SQL(
            "DELETE FROM {t} WHERE task_id IN (SELECT task_id FROM {t} WHERE expires_at < now() "
            "LIMIT %s)").format(t=self.table)
        self.listen = sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))
        self.unlisten = sql.SQL("UNLISTEN {}").format(sql.Identifier(self.channel))
        self.counters = sql.Identifier(*name[:-1], f"{name[-1]}_counters"[:63])
        self.create_counters = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {c} (name text PRIMARY KEY, value bigint NOT NULL)"
        ).format(c=self.counters)
        self.incr = sql.SQL(
            "INSERT INTO {c} (name, value) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
            "SET value = {c}.value + EXCLUDED.value RETURNING value").format(c=self.counters)


def _params(task_id: str, body: bytes, ttl: int) -> dict:
    return {"id": task_id, "meta": body.decode("utf-8"), "ttl": ttl}


def _create(conn: psycopg.Connection, q: _Sql) -> None:
    """Create the table; two processes racing to create it is no error."""
    try:
        with conn.transaction():
            conn.execute(q.create)
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
        pass


class PostgresStore:
    """Synchronous: for clients (``AsyncResult``) and worker children."""

    def __init__(self, url: str, expires: int = 0, fail_fast: bool = False) -> None:
        self.url, self.expires = url, expires
        self.conninfo, name = split_url(url)
        self.q = _Sql(name)
        self.connect_timeout = 2 if fail_fast else 5      # (libpq's least is 2)
        self._conn: psycopg.Connection | None = None
        self._created = False
        self._local = threading.local()

    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.conninfo, autocommit=True,
                                         connect_timeout=self.connect_timeout)
            if not self._created:
                _create(self._conn, self.q)
                self._created = True
        return self._conn

    def _run(self, fn):
        """``fn(conn)``, once more on a new connection if the old one was lost."""
        try:
            return fn(self.conn())
        except ERRORS:
            if self._conn is not None:
                self._conn.close()
            return fn(self.conn())

    def get_meta(self, task_id: str, accept: set | None = None) -> dict | None:
        row = self._run(lambda c: c.execute(self.q.select, (task_id,)).fetchone())
        return None if row is None else decode(row[0], accept)

    def store(self, task_id: str, meta: dict) -> None:
        body = encode(dict(meta, task_id=task_id))

        def write(c: psycopg.Connection) -> None:
            with c.transaction():
                params = _params(task_id, body, self.expires)
                c.execute(self.q.upsert, params)
                c.execute(self.q.notify, params)
        self._run(write)

    def forget(self, task_id: str) -> None:
        self._run(lambda c: c.execute(self.q.delete, (task_id,)))

    def incr(self, name: str, by: int = 1, expires: int | None = None) -> int:
        """An atomic counter (for chord joins): its value after adding ``by``."""
        def add(c: psycopg.Connection) -> int:
            _create_counters(c, self.q)
            return int(c.execute(self.q.incr, (name, by)).fetchone()[0])
        return self._run(add)

    def wait(self, task_id: str, timeout: float | None, accept: set | None = None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = BACKOFF[0]
        meta = None
        while True:
            try:
                conn = self._listener()
                conn.execute(self.q.listen)
                try:
                    meta = self._read(conn, task_id, accept) or meta
                    while not ready(meta):
                        left = _left(deadline)
                        if left is not None and left <= 0:
                            break
                        # (no query inside the generator: it holds the connection)
                        notes = list(conn.notifies(timeout=SLICE if left is None
                                                   else min(SLICE, left), stop_after=1))
                        if any(note.payload == task_id for note in notes):
                            meta = self._read(conn, task_id, accept) or meta
                        pause = BACKOFF[0]
                finally:
                    # An idle listener would hold back the server's notification queue.
                    conn.execute(self.q.unlisten)
                if ready(meta):
                    return meta
                state = (meta or {}).get("status", protocol.PENDING)
                raise TaskdTimeoutError(f"task {task_id}: no result within {timeout:g}s "
                                        f"(state: {state})")
            except ERRORS:
                self._drop_listener()
                left = _left(deadline)
                if left is not None and left <= 0:
                    raise TaskdTimeoutError(f"task {task_id}: no result within {timeout:g}s "
                                            "(the result store did not answer)") from None
                time.sleep(pause if left is None else min(pause, left))
                pause = min(pause * 2, BACKOFF[1])

    def _listener(self) -> psycopg.Connection:
        """This thread's connection for waits, kept between them (no connection set-up
        per wait); it listens only while a wait runs."""
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = self._local.conn = psycopg.connect(self.conninfo, autocommit=True,
                                                      connect_timeout=5)
            if not self._created:
                _create(conn, self.q)
                self._created = True
        return conn

    def _drop_listener(self) -> None:
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is not None:
            conn.close()

    def _read(self, conn: psycopg.Connection, task_id: str, accept: set | None) -> dict | None:
        row = conn.execute(self.q.select, (task_id,)).fetchone()
        return None if row is None else decode(row[0], accept)

    def close(self) -> None:
        self._drop_listener()
        if self._conn is not None:
            self._conn.close()


def _create_counters(conn: psycopg.Connection, q: _Sql) -> None:
    try:
        with conn.transaction():
            conn.execute(q.create_counters)
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
        pass


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class AsyncPostgresStore:
    """asyncio: the supervisor's writer. One transaction per batch of results."""

    def __init__(self, url: str, expires: int = 0) -> None:
        self.url, self.expires = url, expires
        self.conninfo, name = split_url(url)
        self.q = _Sql(name)
        self._conn: psycopg.AsyncConnection | None = None

    async def conn(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                await self._conn.close()
            self._conn = await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, connect_timeout=5)
            try:
                async with self._conn.transaction():
                    await self._conn.execute(self.q.create)
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                pass
        return self._conn

    async def write_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Write ``(task_id, json_body)`` items in one transaction; raises on failure."""
        rows = [_params(task_id, body, self.expires) for task_id, body in items]
        conn = await self.conn()
        async with conn.transaction():
            async with conn.cursor() as cur:
                await cur.executemany(self.q.upsert, rows)
                await cur.executemany(self.q.notify, rows)

    async def prune(self) -> int:
        """Delete up to PRUNE_BATCH expired rows; how many went."""
        conn = await self.conn()
        cur = await conn.execute(self.q.prune, (PRUNE_BATCH,))
        return cur.rowcount

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
