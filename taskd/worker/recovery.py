"""Surviving the broker: reconnect with back-off, and never run a task twice
because a connection dropped.

When the connection drops, the deliveries of the old channel can no longer be
acknowledged: the broker requeues them and delivers them again (flagged
``redelivered``), those whose ack was lost in the drop included. A task that
finished during the outage, or just before it, would then run a second time.
The supervisor keeps a bounded record of the deliveries it finished
(:class:`RecentlyDone`); a redelivered message found there is acknowledged
without running, and its result is published again for a caller that waits.

What keeps the record from mistaking a new message for an old one:

* the key (:func:`delivery_key`) is a digest of the body and of the headers
  that tell task messages apart (task id and name, retry number, ETA, expiry,
  and the copy id taskd puts on each copy it republishes), so a task id used
  again with other arguments, or a parked or retried copy, is a new message;
* an entry is consulted only for a delivery received on a later channel than
  its own: only a channel that was lost can hand its deliveries back;
* entries expire ``max_age`` after the task finished, or after the channel
  that received them was replaced, whichever is later: the broker redelivers
  what a lost channel held as soon as it notices the loss, and it notices
  within two heartbeats.

The record is bounded in bytes (results up to ``max_result`` are kept, the
rest counted as their key only) as well as in entries: a child forked from a
supervisor inherits its memory, so a large record would count against every
child's ``worker.max_memory_per_child``.

A redelivered copy of a task still running here (a *twin*) is held and
settled with its original (:class:`Duplicates`, which also answers from the
record).

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
import hashlib
import logging
import random
import time
from typing import Any, Awaitable, Callable, Iterable, Optional

from ..exceptions import ConfigError, ConnectionError as TaskdConnectionError
from .amqp import ChannelLost

log = logging.getLogger("taskd.supervisor")

COPY_HEADER = "x-taskd-copy"
ENTRY_OVERHEAD = 256        # bytes an entry costs besides its result: key, tuple, dict slot


def delivery_key(request: Any, body: bytes) -> bytes:
    """A digest that tells one task message from another (see the module's notes)."""
    ident = (request.id, request.name, request.retries, request.correlation_id,
             request.headers.get(COPY_HEADER), request.eta, request.expires)
    digest = hashlib.blake2b(repr(ident).encode("utf-8", "backslashreplace"), digest_size=16)
    digest.update(body)
    return digest.digest()


class Done:
    __slots__ = ("epoch", "result", "size", "expires_at")

    def __init__(self, epoch: int, result: Optional[tuple], size: int,
                 expires_at: float) -> None:
        self.epoch, self.result, self.size, self.expires_at = epoch, result, size, expires_at


class RecentlyDone:
    """The deliveries finished lately and, when there was one, their result.

    ``epoch`` numbers the consuming channels: a delivery is recorded with the
    number of the channel it came on, and :meth:`find` answers only for entries
    of earlier channels. Results larger than ``max_result`` bytes are not kept: a
    redelivered copy of such a task is still not run again, but its caller gets no
    second copy of the result.
    """

    def __init__(self, max_entries: int = 10000, max_bytes: int = 32 << 20,
                 max_result: int = 64 << 10, max_age: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.max_result, self.max_age, self.clock = max_result, max_age, clock
        self.epoch = 0
        self.bytes = 0
        self._done = collections.OrderedDict()     # key -> Done, oldest first

    def next_channel(self) -> None:
        """A new channel delivers: the entries of the old ones may now be looked up,
        for ``max_age`` from now at least."""
        self.epoch += 1
        self._prune()
        expires_at = self.clock() + self.max_age
        for entry in self._done.values():
            entry.expires_at = max(entry.expires_at, expires_at)

    def add(self, key: bytes, epoch: int, result: Optional[tuple] = None) -> None:
        """Record the delivery ``key`` received on channel ``epoch`` as finished."""
        if result is not None and len(result[0]) > self.max_result:
            result = None
        old = self._done.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        size = ENTRY_OVERHEAD + len(key) + (len(result[0]) if result is not None else 0)
        self._done[key] = Done(epoch, result, size, self.clock() + self.max_age)
        self.bytes += size
        self._prune()

    def find(self, key: bytes, epoch: int) -> Optional[Done]:
        """The entry of a delivery finished before channel ``epoch`` took over, or None."""
        self._prune()
        entry = self._done.get(key)
        if entry is None or entry.epoch >= epoch or entry.expires_at < self.clock():
            return None
        return entry

    def _prune(self) -> None:
        now = self.clock()
        done = self._done
        while done:
            entry = next(iter(done.values()))
            if len(done) <= self.max_entries and self.bytes <= self.max_bytes \
                    and entry.expires_at >= now:
                return
            self.bytes -= done.popitem(last=False)[1].size

    def __len__(self) -> int:
        return len(self._done)

class Duplicates:
    def __init__(self, counters: collections.Counter,
                 recent: Optional[RecentlyDone] = None) -> None:
        self.counters = counters
        self.recent = recent if recent is not None else RecentlyDone()
        self.twins: dict = {}           # delivery key -> redelivered copies of running tasks
        self.delivering: Any = None     # the channel of the last delivery

    def epoch_of(self, channel: Any) -> int:
        """The number of the consuming channel ``channel`` (a new one starts an epoch)."""
        if channel is not self.delivering:     # the first delivery on a new channel
            self.delivering = channel
            self.recent.next_channel()
            self.twins.clear()      # held for the old channel: the broker requeued them
        return self.recent.epoch

    def finished(self, job: Any) -> Optional[Done]:
        """The record of ``job`` if this worker finished it before its channel was lost."""
        done = self.recent.find(job.key, job.epoch)
        if done is not None:
            self.counters["duplicates"] += 1
            log.warning("task %s was finished before the connection dropped: acknowledging "
                        "the redelivered copy without running it", job.describe())
        return done

    def hold_twin(self, job: Any, busy: Iterable[Any]) -> bool:
        """True, and ``job`` held, if it is a redelivered copy of a task still running
        on one of the ``busy`` children, received on a channel since lost."""
        for child in busy:
            for running in (*child.running, *child.queued):
                if running.key == job.key and running.epoch < job.epoch:
                    log.warning("task %s is still running here: its redelivered copy will be "
                                "acknowledged when it finishes", job.describe())
                    self.counters["duplicates"] += 1
                    self.twins.setdefault(job.key, []).append(job)
                    return True
        return False

    def done(self, job: Any, result: Optional[tuple] = None) -> list:
        """Record ``job`` finished; returns its twins, to be settled with it."""
        if job.key is None:         # never decoded: no copy of it is held as a twin
            return []
        self.recent.add(job.key, job.epoch, result)
        return self.twins.pop(job.key, [])

    def unfinished(self, job: Any) -> list:
        """``job`` goes back to its queue unfinished: returns its twins, to go back too."""
        return self.twins.pop(job.key, []) if job.key is not None else []


def backoff(attempt: int, base: float = 0.5, cap: float = 10.0,
            rng: Callable[[], float] = random.random) -> float:
    """Capped exponential back-off with jitter: a delay in [d/2, d], d = base * 2**attempt."""
    delay = min(cap, base * (2 ** attempt))
    return delay / 2 + rng() * delay / 2


class ReconnectPacer:
    """How long to wait before reconnecting after a connection was lost: not at all
    after one that lived ``young`` seconds or more; after one that died younger, a
    back-off that grows with each such death in a row."""

    def __init__(self, young: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random) -> None:
        self.young, self.clock, self.rng = young, clock, rng
        self.connected_at = None
        self.quick_deaths = 0

    def connected(self) -> None:
        self.connected_at = self.clock()

    def lost(self) -> float:
        """Seconds to wait before the next attempt."""
        lived = self.connected_at is not None and self.clock() - self.connected_at >= self.young
        self.connected_at = None
        if lived:
            self.quick_deaths = 0
            return 0.0
        self.quick_deaths += 1
        return backoff(self.quick_deaths - 1, rng=self.rng)


async def connect_with_retry(connect: Callable[[], Awaitable[None]],
                             close: Callable[[], Awaitable[None]], shutdown: Any, notifier: Any,
                             retry_for: float, cap: float) -> bool:
    """Await ``connect()`` until it succeeds or ``retry_for`` seconds pass (``close()``
    after each failure); a shutdown (``shutdown.stopping``, ``shutdown.requested``)
    ends the wait.

    A declaration conflict (ConfigError) is not retried. Returns True when
    connected; False when it gave up or the worker is stopping.
    """
    deadline = time.monotonic() + retry_for
    attempt = 0
    while not shutdown.stopping:
        try:
            await connect()
            return True
        except ConfigError:
            raise
        except (TaskdConnectionError, ChannelLost, OSError) as exc:
            await close()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("%s; gave up after %gs (broker.retry_for)", exc, retry_for)
                return False
            delay = min(backoff(attempt, cap=cap), remaining)
            message = f"waiting for the broker: {exc}; next attempt in {delay:.1f}s"
            if attempt == 0 or attempt % 10 == 0:
                log.warning("%s", message)
            notifier.status(message)
            attempt += 1
            try:        # a shutdown cuts the pause short
                await asyncio.wait_for(shutdown.requested.wait(), delay)
            except asyncio.TimeoutError:
                pass
    return False
