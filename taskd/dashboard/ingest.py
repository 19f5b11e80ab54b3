"""The event ingest: a durable queue on ``celeryev``, read in batches, acked after commit.

The dashboard declares its own durable queue (``dashboard.event_queue``) bound
to Celery's ``celeryev`` topic exchange with ``#``, so events that workers send
while the dashboard is stopped wait in the broker and are recorded when it
starts again. ``x-max-length`` bounds what waits (oldest dropped first), so a
dashboard that stays down cannot fill the broker.

One thread reads deliveries until it has :data:`BATCH` of them or the queue has
been quiet for :data:`LINGER` seconds, folds them (:mod:`.events`), writes the
batch in one transaction and only then acknowledges every delivery in it with
one ``multiple`` ack: a crash before the ack redelivers the batch; the upserts
and the timeline's unique index make the second write change nothing but the
per-minute counters. A message that is not a Celery event
is logged (routing key and why) and acknowledged: there is nothing to record.
The connection is opened again, with back-off, whenever it is lost.
"""
from __future__ import annotations

import logging
import threading
import time

import pika
import pika.exceptions

from ..broker.connection import connect_blocking
from ..exceptions import TaskdError
from . import events

log = logging.getLogger(__name__)

EXCHANGE = "celeryev"           # Celery's event exchange (topic)
BATCH = 2000
LINGER = 0.25
PRUNE_EVERY = 60.0


def declare(channel, queue: str, max_length: int) -> None:
    """The durable event queue, bound to every event on ``celeryev``."""
    channel.exchange_declare(EXCHANGE, "topic", durable=True)
    args = {"x-max-length": max_length} if max_length else None
    channel.queue_declare(queue, durable=True, arguments=args)
    channel.queue_bind(queue, EXCHANGE, routing_key="#")


class Ingest:
    """Consumes the event queue into a :class:`~.store.Store` on its own thread."""

    def __init__(self, config, store, queue=None):
        self.config, self.store = config, store
        self.queue = queue or config["dashboard.event_queue"]
        self.stopping = threading.Event()
        self.recorded = self.rejected = 0
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskd-dashboard-ingest",
                                        daemon=True)
        self._last_prune = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        pause = 0.5
        while not self.stopping.is_set():
            try:
                self._consume()
                pause = 0.5
            except (pika.exceptions.AMQPError, OSError, TaskdError) as exc:
                self.connected.clear()
                log.warning("dashboard: event queue %s unavailable (%s); retrying in %.1f s",
                            self.queue, exc or type(exc).__name__, pause)
                self.stopping.wait(pause)
                pause = min(pause * 2, 10.0)
            except Exception:   # noqa: BLE001 - e.g. the database is gone: log and retry
                self.connected.clear()
                log.exception("dashboard: recording events failed; retrying in %.1f s", pause)
                self.stopping.wait(pause)
                pause = min(pause * 2, 10.0)

    def _consume(self) -> None:
        c = self.config
        conn = connect_blocking(c.broker_url, c["broker.connect_timeout"], c["broker.heartbeat"],
                                "taskd-dashboard", c["broker.tls"])
        try:
            channel = conn.channel()
            declare(channel, self.queue, c["dashboard.event_queue_max_length"])
            channel.basic_qos(prefetch_count=BATCH * 2)
            self.connected.set()
            log.info("dashboard: recording events from queue %s", self.queue)
            pending = []
            for delivery in channel.consume(self.queue, inactivity_timeout=LINGER):
                if delivery[0] is not None:
                    pending.append(delivery)
                if pending and (delivery[0] is None or len(pending) >= BATCH):
                    self._commit(channel, pending)
                    pending = []
                    self._maybe_prune()
                elif delivery[0] is None:
                    self._maybe_prune()
                if self.stopping.is_set():
                    break
            if pending:
                self._commit(channel, pending)
        finally:
            if conn.is_open:
                conn.close()

    def _commit(self, channel, deliveries) -> None:
        decoded = []
        for method, props, body in deliveries:
            try:
                decoded.extend(events.decode(body, props.content_type))
            except events.BadEvent as exc:
                self.rejected += 1
                log.warning("dashboard: not a Celery event on %s (routing key %r): %s",
                            EXCHANGE, method.routing_key, exc)
        batch = events.fold(decoded)
        self.store.write(batch)
        channel.basic_ack(deliveries[-1][0].delivery_tag, multiple=True)
        self.recorded += batch.events

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = now
        deleted = self.store.prune(self.config["dashboard.retention"],
                                   self.config["dashboard.max_tasks"])
        if deleted:
            log.info("dashboard: pruned %d task(s) from history", deleted)
