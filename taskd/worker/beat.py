"""Beat: the ``schedule:`` fired by one worker at a time, elected through RabbitMQ.

Every worker with ``worker.beat: true`` and at least one entry opens a third
connection and consumes ``worker.beat_queue``, a durable queue declared with
``x-single-active-consumer``: the broker delivers its messages to one consumer
at a time and moves to the next when that consumer's channel closes (a stop, a
crash, a cut connection). The queue holds two kinds of message:

* a **cursor** per entry, ``{"entry", "last"}``, persistent: the last slot the
  schedule has handled. The active consumer holds every cursor unacknowledged
  and, when an entry falls due, in **one AMQP transaction** publishes the task,
  publishes the entry's next cursor and acknowledges the old one. The broker
  applies all three at ``tx.commit`` or none, so a leader that dies before the
  commit leaves the old cursor to be redelivered to the next leader, and one
  that committed leaves only the new one: a slot is published once, however
  leadership moves. Only the channel the broker delivers to can acknowledge a
  cursor, so a worker that merely *believes* it leads cannot fire.
* **ticks**, transient: each worker publishes one a second. Whoever is active
  receives them all; a worker knows it is active when a delivery reaches it,
  and it leads once a *marker* it publishes then comes back: every message
  queued before it, the cursors a dead leader left included, has reached it.
  Only then does it create the cursors of entries that have none, and drop
  those of entries its configuration does not have. It keeps leading while its
  own ticks come back (within ``LEASE``); a leader that loses its connection
  stops at once.

Cursors are published again every ``REFRESH`` seconds, so that no delivery is
held long enough for the broker's ``consumer_timeout`` to close the channel.
The connection and its transactions live in :mod:`taskd.worker.beatlink`; the
schedule's arithmetic in :mod:`taskd.periodic`. The whole design, what it
guarantees and costs: ``docs/periodic.md``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from .. import periodic
from ..options import SendOptions
from . import beatlink
from .amqp import ChannelLost
from .beatlink import BeatLink

log = logging.getLogger("taskd.beat")

TICK = 1.0          # seconds between ticks
LEASE = 3.0         # a leader whose own tick has not come back for this long stops firing
REFRESH = 60.0      # seconds a cursor is held before it is published again
TICK_TTL = "10000"  # ms a tick waits in the queue for a consumer
CURSOR, TICK_TYPE, MARKER = "taskd.cursor", "taskd.tick", "taskd.marker"

OFF, CONNECTING, STANDBY, SETTLING, LEADING = "off", "connecting", "standby", "settling", "leading"


@dataclass
class Held:
    """A cursor held unacknowledged: its delivery tag, its position, since when."""
    tag: int
    last: datetime
    since: float


class Beat:
    """``shutdown`` is read for ``requested``/``stopping``; ``clock`` gives the wall time
    (seconds) and ``monotonic`` the lease clock: both are passed in for the tests."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Any,
                 counters: collections.Counter, shutdown: Any,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.loop, self.counters, self.shutdown = loop, counters, shutdown
        self.clock, self.monotonic = clock, monotonic
        self.node = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.role = OFF
        self.leading_since: Optional[float] = None
        self.cursors: dict[str, Held] = {}
        self.coming: set = set()            # entries whose new cursor is on its way back
        self.to_ack: list = []              # delivery tags acked with the next commit
        self.fired: dict = {}               # entry -> {"slot", "at", "task_id"} fired here
        self.own_tick_at = float("-inf")
        self.marker: Optional[str] = None
        self._wake: Optional[asyncio.TimerHandle] = None
        self._firing = False
        self._lapsed = False                # the lease ran out (logged once)
        self.link = BeatLink(loop, self, shutdown)
        self.configure(config)

    # -- configuration ------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.config["worker.beat"] and self.entries)

    def configure(self, config: Any) -> None:
        """A new configuration (at start, or applied by a reload)."""
        old = getattr(self, "config", None)
        self.config = config
        self.entries = {e.name: e for e in config["schedule"]}
        self.queue = config["worker.beat_queue"]
        if old is None:
            return
        self.link.declared.clear()
        if old["worker.beat_queue"] != self.queue or not self.enabled:
            self.link.restart.set()     # the session ends; the link starts over (or stops)
        if self.enabled:
            self.start()
        if self.role == LEADING:
            self.loop.create_task(self._reconcile())

    def start(self) -> None:
        if self.enabled:
            if self.role == OFF:
                self.role = CONNECTING
            self.link.start()

    async def close(self) -> None:
        await self.link.close()

    # -- the link's events ------------------------------------------------------------
    async def standing_by(self) -> None:
        """Consuming the beat queue: wait to be the active consumer; tick meanwhile."""
        if self.role == CONNECTING:     # (a delivery may have come first: then it settles)
            self.role = STANDBY
        log.info("beat: standing by for the schedule (%d entries) on queue %s",
                 len(self.entries), self.queue)
        await self._ticks()

    def lost(self, reason: Any) -> None:
        if self.role == LEADING:
            log.error("beat: lost the broker connection while leading (%s): no longer "
                      "firing the schedule", reason)
        self.forget()

    def forget(self, off: bool = False) -> None:
        """The channel is gone: so are the cursors it held (the broker requeues them)."""
        if self.role == LEADING:
            self.counters["beat_lost_lead"] += 1
        self.role = OFF if off or self.shutdown.stopping else CONNECTING
        self.leading_since = None
        self.cursors.clear()
        self.coming.clear()
        self.to_ack.clear()
        self.marker = None
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None

    def on_return(self, method: Any, properties: Any) -> None:
        headers = properties.headers or {}
        log.error("beat: entry %s: the task of slot %s reached no queue (exchange %r, routing "
                  "key %r): check the entry's options", headers.get("x-taskd-periodic"),
                  headers.get("x-taskd-slot"), method.exchange, method.routing_key)
        self.counters["periodic_unroutable"] += 1

    # -- transactions --------------------------------------------------------------
    def _commit(self, work: Callable[[Any], None]) -> Any:
        """``work(channel)`` and the acks pending, committed as one transaction."""
        return self.link.commit(work, self.to_ack)

    def _publish(self, channel: Any, kind: str, body: bytes, persistent: bool = False,
                 expiration: Optional[str] = None) -> None:
        beatlink.publish(channel, self.queue, kind, body, persistent, expiration)

    async def _ticks(self) -> None:
        """Once a second: a tick (and stale cursors published again), then the lease
        checked, whether or not the broker answered the last tick."""
        while self.link.channel is not None:
            if not self.link.lock.locked():     # a commit that hangs is not piled onto
                self.loop.create_task(self._tick())
            lapsed = self.role == LEADING and not self.holds_lease()
            if lapsed and not self._lapsed:
                log.warning("beat: no tick of this worker came back in %gs: not firing until "
                            "one does", LEASE)
            self._lapsed = lapsed
            self._schedule_wake()
            await asyncio.sleep(TICK)

    async def _tick(self) -> None:
        now = self.clock()

        def work(channel: Any) -> None:
            self._publish(channel, TICK_TYPE, self.node.encode(), expiration=TICK_TTL)
            self._refresh(channel, now)
        try:
            await self._commit(work)
        except ChannelLost:
            pass

    def _refresh(self, channel: Any, now: float) -> None:
        mono = self.monotonic()
        for name, held in list(self.cursors.items()):
            if mono - held.since >= REFRESH and name not in self.coming:
                self._publish(channel, CURSOR, periodic.encode_cursor(name, held.last), True)
                channel.basic_ack(held.tag)
                del self.cursors[name]
                self.coming.add(name)

    def holds_lease(self) -> bool:
        return self.monotonic() - self.own_tick_at < LEASE

    # -- deliveries --------------------------------------------------------------------
    def on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """pika calls this for each delivery from the beat queue."""
        if channel is None or channel is not self.link.channel:
            return
        if self.role in (CONNECTING, STANDBY):  # a delivery: this consumer is the active one
            self.role = SETTLING
            self.marker = uuid.uuid4().hex
            log.info("beat: this worker's consumer is active; taking over the schedule")
            self.loop.create_task(self._send_marker(self.marker))
        kind = properties.type
        if kind == CURSOR:
            self._on_cursor(method.delivery_tag, body)
            return
        self.to_ack.append(method.delivery_tag)
        if kind == TICK_TYPE:
            if body == self.node.encode():
                self.own_tick_at = self.monotonic()
        elif kind == MARKER:
            if self.role == SETTLING and body.decode("utf-8", "replace") == self.marker:
                self.role, self.leading_since = LEADING, self.clock()
                self.own_tick_at = self.monotonic()
                self.counters["beat_took_lead"] += 1
                log.info("beat: leading the schedule (%d entries)", len(self.entries))
                self.loop.create_task(self._reconcile())
        else:
            log.warning("beat: dropping a message of unknown type %r from %s", kind, self.queue)

    async def _send_marker(self, marker: str) -> None:
        try:
            await self._commit(lambda ch: self._publish(ch, MARKER, marker.encode()))
        except ChannelLost:
            pass

    def _on_cursor(self, tag: int, body: bytes) -> None:
        try:
            name, last = periodic.decode_cursor(body)
        except ValueError as exc:
            log.warning("beat: dropping a malformed message from %s: %s", self.queue, exc)
            self.to_ack.append(tag)
            return
        self.coming.discard(name)
        held = self.cursors.get(name)
        if held is not None:    # two cursors of one entry: keep the one further on
            keep, drop = (held, tag) if held.last >= last else (Held(tag, last, 0), held.tag)
            log.warning("beat: entry %s had two cursors; keeping the one at %s", name,
                        periodic.iso(keep.last))
            self.to_ack.append(drop)
            held = keep
        else:
            held = Held(tag, last, 0)
        held.since = self.monotonic()
        self.cursors[name] = held
        if self.role == LEADING and name not in self.entries:
            self._drop(name)
        self._schedule_wake()

    def _drop(self, name: str) -> None:
        held = self.cursors.pop(name)
        self.to_ack.append(held.tag)
        log.info("beat: entry %s is not in the schedule any more: its cursor is dropped", name)

    async def _reconcile(self) -> None:
        """Leading: cursors for new entries, none for removed ones."""
        if self.role != LEADING:
            return
        for name in [n for n in self.cursors if n not in self.entries]:
            self._drop(name)
        missing = [n for n in self.entries if n not in self.cursors and n not in self.coming]
        now = datetime.fromtimestamp(self.clock(), timezone.utc)

        def work(channel: Any) -> None:
            for name in missing:
                self._publish(channel, CURSOR, periodic.encode_cursor(name, now), True)
                self.coming.add(name)
        try:
            await self._commit(work)
        except ChannelLost:
            return
        for name in missing:
            log.info("beat: entry %s starts: %s, next run %s", name,
                     self.entries[name].describe(),
                     periodic.iso(periodic.next_slot(self.entries[name], now)))
        self._schedule_wake()

    # -- firing ------------------------------------------------------------------------
    def due_at(self, name: str) -> Optional[datetime]:
        held, entry = self.cursors.get(name), self.entries.get(name)
        if held is None or entry is None:
            return None
        return periodic.next_slot(entry, held.last)

    def _schedule_wake(self) -> None:
        if self.role != LEADING:
            return
        dues = [d for d in (self.due_at(n) for n in self.cursors) if d is not None]
        if not dues:
            return
        delay = max(0.0, min(dues).timestamp() - self.clock())
        if self._wake is not None:
            self._wake.cancel()
        self._wake = self.loop.call_later(min(delay, TICK),
                                          lambda: self.loop.create_task(self.fire_due()))

    async def fire_due(self) -> None:
        """Fire every entry whose slot has come (leading, with the lease held)."""
        if self.role != LEADING or not self.holds_lease() or self._firing:
            return
        self._firing = True
        try:
            now = datetime.fromtimestamp(self.clock(), timezone.utc)
            for name in list(self.cursors):
                due = self.due_at(name)
                if due is None or due > now or self.role != LEADING:
                    continue
                await self._fire(name, self.entries[name], self.cursors[name], due, now)
        except ChannelLost:
            return
        finally:
            self._firing = False
        self._schedule_wake()

    async def _fire(self, name: str, entry: periodic.Entry, held: Held, due: datetime,
                    now: datetime) -> None:
        decision = periodic.decide(entry, due, now)
        message = route = None
        if decision.fire is not None:
            message, route = self.message(entry, decision.fire, now)
            await self.link.declare(route, self.config)

        def work(channel: Any) -> None:
            if message is not None:
                channel.basic_publish(route.exchange, route.routing_key, message.body,
                                      beatlink.task_properties(message), mandatory=True)
            self._publish(channel, CURSOR, periodic.encode_cursor(name, decision.last), True)
            channel.basic_ack(held.tag)
        del self.cursors[name]
        self.coming.add(name)
        await self._commit(work)
        if decision.missed:
            self.counters["periodic_missed"] += decision.missed
            log.warning("beat: entry %s: %d slot(s) missed before %s (misfire: %s)", name,
                        decision.missed, periodic.iso(decision.last), entry.misfire)
        if message is not None:
            self.counters["periodic_fired"] += 1
            self.fired[name] = {"slot": periodic.iso(decision.fire), "at": self.clock(),
                                "task_id": message.task_id}
            log.info("beat: fired %s[%s] for %s (entry %s)", entry.task, message.task_id,
                     periodic.iso(decision.fire), name)

    def message(self, entry: periodic.Entry, slot: datetime, now: datetime) -> tuple:
        """The task message of ``entry``'s ``slot`` and its route."""
        opts = entry.options
        options = SendOptions(
            queue=opts.get("queue"), exchange=opts.get("exchange"),
            routing_key=opts.get("routing_key"), expires=opts.get("expires"),
            priority=opts.get("priority"), ignore_result=True,
            task_id=periodic.task_id(entry.name, slot),
            headers={"x-taskd-periodic": entry.name, "x-taskd-slot": periodic.iso(slot)},
        ).resolved(self.config, now=now)
        return (options.encode(entry.task, list(entry.args), dict(entry.kwargs)),
                options.route(self.config, entry.task))

    # -- status ----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """For ``taskd status``: the role and, per entry, the last and next run."""
        now = datetime.fromtimestamp(self.clock(), timezone.utc)
        entries = []
        for name, entry in self.entries.items():
            due = self.due_at(name)
            held = self.cursors.get(name)
            entries.append({
                "name": name, "task": entry.task, "schedule": entry.describe(),
                "misfire": entry.misfire, "last": self.fired.get(name),
                "handled_until": periodic.iso(held.last) if held else None,
                "next": periodic.iso(due or periodic.next_slot(entry, now)),
            })
        return {"enabled": self.enabled, "queue": self.queue, "role": self.role,
                "leading": self.role == LEADING and self.holds_lease(),
                "leading_since": self.leading_since, "node": self.node, "entries": entries}
