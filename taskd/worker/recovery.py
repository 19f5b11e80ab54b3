"""Surviving the broker: reconnect with back-off, and never run a task twice
because a connection dropped.

When the connection drops, the deliveries of the old channel can no longer be
acknowledged: the broker requeues them and delivers them again (flagged
``redelivered``). A task that finished during the outage would then run a
second time. The supervisor keeps a bounded record of the deliveries it
finished (:class:`RecentlyDone`), keyed by task id, retry number and copy id
(taskd marks each copy it republishes, so a parked or retried copy is never
mistaken for its original); a redelivered message found there is acknowledged
without running, and its result is published again for a caller that waits.

Results that could not be published while the broker was away are kept and
published again after reconnecting, before their deliveries are acknowledged.

A connection that dies within seconds of opening (the broker refuses what the
worker publishes, closes the connection, and the same publish comes again) must
not become a reconnect storm: :class:`ReconnectPacer` backs off between such
short-lived connections.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import time

from ..exceptions import ConfigError, ConnectionError as TaskdConnectionError
from .amqp import ChannelLost

log = logging.getLogger("taskd.supervisor")

COPY_HEADER = "x-taskd-copy"


def delivery_key(headers, correlation_id=None):
    headers = headers or {}
    retries = headers.get("retries") or 0
    return (headers.get("id") or correlation_id, retries, headers.get(COPY_HEADER))


class RecentlyDone:
    """The last ``size`` finished deliveries and, when there was one, their result.

    Results larger than ``max_result`` bytes are not kept (memory stays bounded at
    about ``size * max_result``): a redelivered copy of such a task is still not run
    again, but its caller gets no second copy of the result.
    """

    def __init__(self, size=10000, max_result=64 * 1024):
        self.size = size
        self.max_result = max_result
        self._done = collections.OrderedDict()

    def add(self, key, result=None):
        if result is not None and len(result[0]) > self.max_result:
            result = None
        self._done[key] = result
        self._done.move_to_end(key)
        while len(self._done) > self.size:
            self._done.popitem(last=False)

    def get(self, key, default=None):
        return self._done.get(key, default)

    def __contains__(self, key):
        return key in self._done

    def __len__(self):
        return len(self._done)


def backoff(attempt, base=0.5, cap=10.0, rng=random.random):
    """Capped exponential back-off with jitter: a delay in [d/2, d], d = base * 2**attempt."""
    delay = min(cap, base * (2 ** attempt))
    return delay / 2 + rng() * delay / 2


class ReconnectPacer:
    """How long to wait before reconnecting after a connection was lost: not at all
    after one that lived ``young`` seconds or more; after one that died younger, a
    back-off that grows with each such death in a row."""

    def __init__(self, young=5.0, clock=time.monotonic, rng=random.random):
        self.young, self.clock, self.rng = young, clock, rng
        self.connected_at = None
        self.quick_deaths = 0

    def connected(self):
        self.connected_at = self.clock()

    def lost(self):
        """Seconds to wait before the next attempt."""
        lived = self.connected_at is not None and self.clock() - self.connected_at >= self.young
        self.connected_at = None
        if lived:
            self.quick_deaths = 0
            return 0.0
        self.quick_deaths += 1
        return backoff(self.quick_deaths - 1, rng=self.rng)


async def connect_with_retry(sup, retry_for, cap):
    """Call ``sup.connect()`` until it succeeds or ``retry_for`` seconds pass.

    A declaration conflict (ConfigError) is not retried. Returns True when
    connected; False when it gave up or the worker is stopping.
    """
    deadline = time.monotonic() + retry_for
    attempt = 0
    while not sup.stopping:
        try:
            await sup.connect()
            return True
        except ConfigError:
            raise
        except (TaskdConnectionError, ChannelLost, OSError) as exc:
            await sup.close_connections()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("%s; gave up after %gs (broker.retry_for)", exc, retry_for)
                return False
            delay = min(backoff(attempt, cap=cap), remaining)
            message = f"waiting for the broker: {exc}; next attempt in {delay:.1f}s"
            if attempt == 0 or attempt % 10 == 0:
                log.warning("%s", message)
            sup.notifier.status(message)
            attempt += 1
            try:        # a shutdown cuts the pause short
                await asyncio.wait_for(sup.stop_requested.wait(), delay)
            except asyncio.TimeoutError:
                pass
    return False
