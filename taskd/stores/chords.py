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
