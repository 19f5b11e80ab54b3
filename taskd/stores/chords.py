"""Chord joins in Redis: each header task counts once, the last one publishes the body.

A chord is a group of *header* tasks and a *body* task called with the list of
their results. There is no ``chord_unlock`` task polling for the header: the
worker that finishes a header task records its result and counts it in one
atomic step (a Lua script), and the worker whose count completes the chord
*claims* it and publishes the body.

Keys, per chord (its group id ``G``; they expire with ``result_expires``, a day
when that is 0):

=============================  =================================================
``taskd-chord-G.m``            set of the header task ids counted (``SADD``):
                               a header task run again after a crash counts once
``taskd-chord-G.r``            hash ``group_index -> [task_id, state, result]``
``taskd-chord-G.c``            the claim: the id of the header task whose count
                               completed the chord (``SET NX``)
=============================  =================================================

Celery counts with ``INCR`` (or its own ``.j``/``.t`` list), so a header task
redelivered after a crash can count twice and fire the body early. Here the
count is the set's size. The claim is kept by the task that took it: if that
task's worker dies before the body's publish was confirmed, the redelivered
task (same id) claims again and publishes the body (same body task id); once
the publish is confirmed the claim says ``published`` and nobody claims again.
(A worker that dies between that confirm and that write leaves a window in
which the body is published twice, with one task id.)

The chord's size comes from the body signature's ``chord_size`` (taskd
clients put it there) or, for a stock Celery client, from the key Celery's
client writes (``celery-taskset-meta-G.s``).
"""
from __future__ import annotations

import asyncio
from typing import Any

from .. import serialization

PREFIX = "taskd-chord-"
#: Celery's key for the chord size (``RedisBackend.set_chord_size``).
CELERY_SIZE = "celery-taskset-meta-{}.s"
#: The claim's value once the body is published.
PUBLISHED = "published"
#: Seconds chord keys live when ``result_expires`` is 0 (never expire) - a day.
DEFAULT_TTL = 86400

# KEYS: members, results, claim, celery size; ARGV: task id, index, part, size, ttl.
# Returns {count, size, claimed}.
_JOIN = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
local ttl = tonumber(ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
local n = redis.call('SCARD', KEYS[1])
local size = tonumber(ARGV[4])
if size == 0 then
  size = tonumber(redis.call('GET', KEYS[4]) or '0')
end
if size == 0 or n < size then
  return {n, size, 0}
end
local owner = redis.call('GET', KEYS[3])
if not owner then
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ttl)
  return {n, size, 1}
end
if owner == ARGV[1] then
  return {n, size, 1}
end
return {n, size, 0}
"""


def keys(group_id: str) -> list[str]:
    base = PREFIX + group_id
    return [base + ".m", base + ".r", base + ".c", CELERY_SIZE.format(group_id)]


class ChordJoin:
    """The join on an asyncio Redis client (the supervisor's store connection)."""

    def __init__(self, client: Any, expires: int = 0) -> None:
        self.client = client
        self.ttl = int(expires) or DEFAULT_TTL
        self._join = client.register_script(_JOIN)

    async def count(self, group_id: str, task_id: str, index: int | None, state: str,
                    result: Any, size: int | None) -> tuple[int, int, bool]:
        """Record one header task's final state; ``(count, size, claimed)``. ``claimed``:
        this task completes the chord and must publish its body."""
        part = serialization.json_dumps([task_id, state, result])
        field = task_id if index is None else str(index)
        n, total, claimed = await self._join(
            keys=keys(group_id), args=[task_id, field, part, int(size or 0), self.ttl])
        return int(n), int(total), bool(claimed)

    async def published(self, group_id: str) -> None:
        """The body's publish was confirmed: no redelivered header task claims again."""
        await self.client.set(keys(group_id)[2], PUBLISHED, ex=self.ttl)

    async def parts(self, group_id: str) -> list[list]:
        """The header's ``[task_id, state, result]`` in header order."""
        raw = await self.client.hgetall(keys(group_id)[1])
        def order(item):
            field = item[0].decode() if isinstance(item[0], bytes) else item[0]
            return (0, int(field), "") if field.lstrip("-").isdigit() else (1, 0, field)
        return [serialization.json_loads(value) for _, value in sorted(raw.items(), key=order)]


class PostgresChordJoin:
    """The same join in PostgreSQL (``result_backend: postgresql://``), on its own
    connection. Two tables beside the results table ``T``: ``T_chords`` (one row per
    header task: ``PRIMARY KEY (group_id, task_id)``, so a task run again counts once)
    and ``T_chord_claims`` (who completed each chord). Each count runs in a
    transaction that first takes an advisory lock on the chord's id, so two header
    tasks finishing at once on two workers count one after the other. A chord's rows
    are deleted once its body is published; claims older than ``result_expires`` (a
    day when 0) are deleted then too."""

    def __init__(self, url: str, expires: int = 0) -> None:
        from psycopg import sql
        from .postgres import split_url
        self.conninfo, name = split_url(url)
        self.ttl = int(expires) or DEFAULT_TTL
        schema, base = name[:-1], name[-1]
        self.parts_t = sql.Identifier(*schema, f"{base}_chords"[:63])
        self.claims_t = sql.Identifier(*schema, f"{base}_chord_claims"[:63])
        self.sql = sql
        self._conn = None
        self._lock: asyncio.Lock | None = None   # one transaction at a time on the connection

    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _connection(self) -> Any:
        import psycopg
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True,
                                                               connect_timeout=5)
            q = self.sql.SQL(
                "CREATE TABLE IF NOT EXISTS {p} (group_id text, task_id text, idx text NOT "
                "NULL, part jsonb NOT NULL, PRIMARY KEY (group_id, task_id)); "
                "CREATE TABLE IF NOT EXISTS {c} (group_id text PRIMARY KEY, owner text NOT "
                "NULL, created timestamptz NOT NULL DEFAULT now())"
            ).format(p=self.parts_t, c=self.claims_t)
            try:
                async with self._conn.transaction():
                    await self._conn.execute(q)
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                pass
        return self._conn

    async def count(self, group_id: str, task_id: str, index: int | None, state: str,
                    result: Any, size: int | None) -> tuple[int, int, bool]:
        async with self.lock():
            return await self._count(group_id, task_id, index, state, result, size)

    async def _count(self, group_id: str, task_id: str, index: int | None, state: str,
                     result: Any, size: int | None) -> tuple[int, int, bool]:
        sql = self.sql
        part = serialization.json_dumps([task_id, state, result]).decode()
        field = task_id if index is None else str(index)
        conn = await self._connection()
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                               (PREFIX + group_id,))
            await conn.execute(sql.SQL(
                "INSERT INTO {p} (group_id, task_id, idx, part) VALUES (%s, %s, %s, %s::jsonb) "
                "ON CONFLICT (group_id, task_id) DO UPDATE SET idx = EXCLUDED.idx, "
                "part = EXCLUDED.part").format(p=self.parts_t), (group_id, task_id, field, part))
            cur = await conn.execute(sql.SQL("SELECT count(*) FROM {p} WHERE group_id = %s")
                                     .format(p=self.parts_t), (group_id,))
            n = (await cur.fetchone())[0]
            if not size or n < size:
                return n, int(size or 0), False
            await conn.execute(sql.SQL("INSERT INTO {c} (group_id, owner) VALUES (%s, %s) "
                                       "ON CONFLICT (group_id) DO NOTHING")
                               .format(c=self.claims_t), (group_id, task_id))
            cur = await conn.execute(sql.SQL("SELECT owner FROM {c} WHERE group_id = %s")
                                     .format(c=self.claims_t), (group_id,))
            owner = (await cur.fetchone())[0]
        return n, size, owner == task_id

    async def parts(self, group_id: str) -> list[list]:
        async with self.lock():
            conn = await self._connection()
            cur = await conn.execute(self.sql.SQL("SELECT idx, part::text FROM {p} WHERE "
                                                  "group_id = %s").format(p=self.parts_t),
                                     (group_id,))
            rows = await cur.fetchall()

        def order(row):
            return (0, int(row[0]), "") if row[0].lstrip("-").isdigit() else (1, 0, row[0])
        return [serialization.json_loads(part) for _, part in sorted(rows, key=order)]

    async def published(self, group_id: str) -> None:
        async with self.lock():
            await self._published(group_id)

    async def _published(self, group_id: str) -> None:
        sql = self.sql
        conn = await self._connection()
        async with conn.transaction():
            await conn.execute(sql.SQL("UPDATE {c} SET owner = %s WHERE group_id = %s")
                               .format(c=self.claims_t), (PUBLISHED, group_id))
            await conn.execute(sql.SQL("DELETE FROM {p} WHERE group_id = %s")
                               .format(p=self.parts_t), (group_id,))
            await conn.execute(sql.SQL(
                "DELETE FROM {c} WHERE group_id IN (SELECT group_id FROM {c} WHERE created < "
                "now() - make_interval(secs => %s) LIMIT 1000)").format(c=self.claims_t),
                (self.ttl,))
