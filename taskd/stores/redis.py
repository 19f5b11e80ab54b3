"""The Redis result store, in Celery's layout (see :mod:`taskd.stores`).

A write is one ``MULTI``: ``SETEX celery-task-meta-<id> result_expires body``
(``SET`` when ``result_expires`` is 0) and ``PUBLISH celery-task-meta-<id>
body``, as Celery's ``RedisBackend.set``. A final state is never replaced by
a later write (Celery's rule: a SUCCESS stays).

``wait()`` subscribes to the key's channel, *then* reads the key (a write
between the two is not missed), then sleeps on the subscription: no polling.
Each thread keeps its subscription connection between waits.
If the connection drops (a Redis restart), it reconnects with back-off,
subscribes again and reads the key again, so a result written while it was
away is found (celery#4857 hung here).
"""
from __future__ import annotations

import hashlib
import threading
import time
from typing import Iterable

import redis
import redis.asyncio
import redis.backoff
import redis.retry

from .. import protocol
from ..exceptions import TimeoutError as TaskdTimeoutError
from . import KEY_PREFIX, decode, encode, ready

ERRORS = (redis.ConnectionError, redis.TimeoutError)
#: Reconnection back-off of ``wait()``: first pause, longest pause (seconds).
BACKOFF = (0.05, 2.0)
#: ``get_message`` slice: how often a waiter checks its deadline while idle.
SLICE = 1.0
COUNTER_PREFIX = "taskd-counter-"

# Write unless a final state is there already; then publish what the key holds.
_WRITE = """
local old = redis.call('GET', KEYS[1])
if old then
  local ok, meta = pcall(cjson.decode, old)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


WRITE_SHA = hashlib.sha1(_WRITE.encode()).hexdigest()


def key(task_id: str) -> str:
    return KEY_PREFIX + task_id


def _options(fail_fast: bool = False) -> dict:
    if fail_fast:
        return {"socket_connect_timeout": 1, "socket_timeout": 2,
                "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0)}
    return {"socket_connect_timeout": 5, "socket_timeout": 10, "health_check_interval": 30}


class RedisStore:
    """Synchronous: for clients (``AsyncResult``) and worker children."""

    def __init__(self, url: str, expires: int = 0, fail_fast: bool = False) -> None:
        self.url, self.expires = url, expires
        self.client = redis.Redis.from_url(url, **_options(fail_fast))
        self._write = self.client.register_script(_WRITE)
        self._local = threading.local()

    def get_meta(self, task_id: str, accept: set | None = None) -> dict | None:
        body = self.client.get(key(task_id))
        return None if body is None else decode(body, accept)

    def store(self, task_id: str, meta: dict) -> None:
        meta = dict(meta, task_id=task_id)
        self._write(keys=[key(task_id)], args=[encode(meta), self.expires])

    def forget(self, task_id: str) -> None:
        self.client.delete(key(task_id))

    def incr(self, name: str, by: int = 1, expires: int | None = None) -> int:
        """An atomic counter (for chord joins): its value after adding ``by``."""
        pipe = self.client.pipeline()
        pipe.incrby(COUNTER_PREFIX + name, by)
        ttl = self.expires if expires is None else expires
        if ttl:
            pipe.expire(COUNTER_PREFIX + name, ttl)
        return int(pipe.execute()[0])

    def wait(self, task_id: str, timeout: float | None, accept: set | None = None) -> dict:
        """The task's final meta; waits on pub/sub (reconnecting as needed) up to
        ``timeout`` seconds (None: for ever), then raises taskd's TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = BACKOFF[0]
        meta = None
        channel = key(task_id).encode()
        while True:
            pubsub = None
            try:
                pubsub = self._pubsub()
                pubsub.subscribe(channel)
                # Only once Redis confirmed the subscription is every later write
                # published to us: then read the key.
                meta = self._confirmed(pubsub, channel, deadline, accept) or meta
                meta = self.get_meta(task_id, accept) or meta
                while not ready(meta):
                    left = _left(deadline)
                    if left is not None and left <= 0:
                        break
                    message = pubsub.get_message(timeout=SLICE if left is None
                                                 else min(SLICE, left))
                    # (a message of a channel left earlier may still come: skipped)
                    if message and message["type"] == "message" and \
                            message["channel"] == channel:
                        meta = decode(message["data"], accept)
                    pause = BACKOFF[0]
                if ready(meta):
                    return meta
                state = (meta or {}).get("status", protocol.PENDING)
                raise TaskdTimeoutError(f"task {task_id}: no result within {timeout:g}s "
                                        f"(state: {state})")
            except ERRORS:
                self._drop_pubsub()
                pubsub = None
                left = _left(deadline)
                if left is not None and left <= 0:
                    raise TaskdTimeoutError(
                        f"task {task_id}: no result within {timeout:g}s (the result store "
                        f"at {self.url.split('@')[-1]} did not answer)") from None
                time.sleep(pause if left is None else min(pause, left))
                pause = min(pause * 2, BACKOFF[1])
            finally:
                if pubsub is not None:
                    try:
                        pubsub.unsubscribe(channel)
                    except ERRORS:
                        self._drop_pubsub()

    def _confirmed(self, pubsub: redis.client.PubSub, channel: bytes,
                   deadline: float | None, accept: set | None) -> dict | None:
        """Wait for Redis to confirm the subscription to ``channel`` (a message on it that
        comes first is returned)."""
        meta = None
        while True:
            left = _left(deadline)
            if left is not None and left <= 0:
                return meta
            message = pubsub.get_message(ignore_subscribe_messages=False,
                                         timeout=SLICE if left is None else min(SLICE, left))
            if message is None or message["channel"] != channel:
                continue
            if message["type"] == "subscribe":
                return meta
            if message["type"] == "message":
                meta = decode(message["data"], accept)

    def _pubsub(self) -> redis.client.PubSub:
        """This thread's subscription connection, kept between waits (a wait then costs
        no connection set-up); subscribed only to the channel it waits on."""
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is None:
            pubsub = self._local.pubsub = self.client.pubsub()
        return pubsub

    def _drop_pubsub(self) -> None:
        pubsub, self._local.pubsub = getattr(self._local, "pubsub", None), None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:       # the connection is gone already
                pass

    def close(self) -> None:
        self._drop_pubsub()
        self.client.close()


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class AsyncRedisStore:
    """asyncio: the supervisor's writer. One pipeline per batch of results."""

    def __init__(self, url: str, expires: int = 0) -> None:
        self.url, self.expires = url, expires
        self.client = redis.asyncio.Redis.from_url(url, **_options())

    async def write_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Write ``(task_id, json_body)`` items in one pipeline (one round trip); raises
        on any failure (then all are written again: a write is idempotent)."""
        items = list(items)
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for task_id, body in items:
                pipe.evalsha(WRITE_SHA, 1, key(task_id), body, self.expires)
            try:
                await pipe.execute()
                return
            except redis.exceptions.NoScriptError:
                # First use, or a restarted Redis forgot the script: load it, once.
                # (redis-py's Script in a pipeline would ask SCRIPT EXISTS every time.)
                if attempt == 2:
                    raise
                await self.client.script_load(_WRITE)

    async def prune(self) -> int:
        return 0        # Redis expires keys itself (SETEX)

    async def close(self) -> None:
        await self.client.aclose()
