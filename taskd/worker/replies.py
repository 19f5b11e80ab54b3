"""Replies: results and failures published to the caller's ``reply_to`` queue.

Results, and the failures of revoked, timed-out and dead-lettered tasks, are
published here: confirmed before the delivery is acked; kept in ``unsent``
while the connection is down (published again after the reconnect); tried
again a bounded number of times when the broker refuses one (a nack: a full
reply queue); larger than the broker takes, replaced by a FAILURE saying so. A
``reply_to`` outside ``worker.reply_to_pattern`` gets no reply at all: the
worker is not a relay into other applications' queues.

With a result store (``result_backend`` redis:// or postgresql://), results go to
:class:`~taskd.worker.store.ResultStore` instead, which has the same three result
calls (``reply_to``, ``publish_result``, ``note``).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import re
from typing import Any, Callable, Optional

from ..exceptions import EncodeError
from . import headers, jobs

log = logging.getLogger("taskd.supervisor")

# Publishes of one result before it is given up (logged) and its delivery acked
# anyway: a reply queue that refuses every message must not hold a prefetch slot
# for ever, nor a result the broker cannot take cause a reconnect after every other.
RESULT_ATTEMPTS = 3
RESULT_RETRY_DELAY = 1.0


class Replies:
    """``complete(job)``: ack the delivery (the acker); ``counters``: the worker's."""

    def __init__(self, loop: asyncio.AbstractEventLoop, complete: Callable[[Any], None],
                 counters: collections.Counter, pattern: re.Pattern,
                 max_result_size: int = 0) -> None:
        self.loop, self.complete, self.counters = loop, complete, counters
        self.pattern = pattern                  # worker.reply_to_pattern
        self.max_result_size = max_result_size  # worker.max_result_size
        self.broker_max_size = 0                # max_message_size, once the broker named it
        self.publisher: Any = None              # the publishing AsyncChannel
        self.unsent: list = []                  # (job, body, props, attempt): publish again
                                                # after a reconnect

    def reply_to(self, job: Any) -> Optional[str]:
        """Where ``job``'s reply goes: its ``reply_to``, if ``worker.reply_to_pattern``
        allows it; else None (logged)."""
        reply_to = job.properties.reply_to
        if not reply_to:
            return None
        if self.pattern.fullmatch(reply_to):
            return reply_to
        log.warning("task %s: reply_to %r does not match worker.reply_to_pattern: no result "
                    "is sent there", job.describe(), headers.bounded(reply_to, 300))
        return None

    def publish_result(self, job: Any, body: bytes, props: Any, attempt: int = 1) -> None:
        """Publish a reply (confirmed), then ack. While the broker is away it waits in
        ``unsent``; refused (nacked), it is tried again; after RESULT_ATTEMPTS it is
        given up, logged, and the delivery acked."""
        reply_to = self.reply_to(job)
        if reply_to is None:
            self.complete(job)
            return
        if self.publisher is None or not self.publisher.is_open:
            self.unsent.append((job, body, props, attempt))
            return
        body, props = self._within_limit(job, body, props)

        def confirmed(ok: Optional[bool]) -> None:
            if ok:
                self.complete(job)
            elif attempt >= RESULT_ATTEMPTS:
                why = "the broker refused it" if ok is False else "the connection was lost"
                log.error("task %s: result not published in %d attempts (%s); the result is "
                          "lost, the delivery is acknowledged", job.describe(), attempt, why)
                self.counters["results_lost"] += 1
                self.complete(job)
            elif ok is None:        # the connection went away: again after reconnecting
                self.unsent.append((job, body, props, attempt + 1))
            else:
                log.warning("task %s: the broker refused its result (nack; a full reply "
                            "queue?); trying again in %gs", job.describe(), RESULT_RETRY_DELAY)
                self.loop.call_later(RESULT_RETRY_DELAY, self.publish_result, job, body, props,
                                     attempt + 1)
        self.publish("", reply_to, body, props, confirmed)

    def note(self, job: Any, body: bytes, props: Any) -> None:
        """A state that ends nothing (RETRY), for a caller that looks: unconfirmed."""
        self.publish("", job.properties.reply_to, body, props, None)

    def publish(self, exchange: str, routing_key: str, body: bytes, properties: Any,
                on_confirm: Optional[Callable[[Optional[bool]], None]]) -> None:
        publisher = self.publisher
        if publisher is None or not publisher.is_open:
            if on_confirm is not None:
                on_confirm(None)
            return
        publisher.publish(exchange, routing_key, body, properties,
                          on_confirm or (lambda ok: None))

    def resend(self) -> None:
        """Reconnected: publish what waited in ``unsent``."""
        unsent, self.unsent = self.unsent, []
        for job, body, props, attempt in unsent:
            self.publish_result(job, body, props, attempt)

    def report_unsent(self) -> None:
        """At exit: name the tasks whose results never reached the broker. Their deliveries
        went back to the queue when the connection dropped; they will run again."""
        if self.unsent:
            log.warning("stopping while the broker is away: %d finished task(s) could not "
                        "report their result and will run again: %s", len(self.unsent),
                        ", ".join(job.describe() for job, *_ in self.unsent))

    def _within_limit(self, job: Any, body: bytes, props: Any) -> tuple:
        """The reply, or a FAILURE saying it is larger than the broker takes."""
        limit = self.result_limit()
        if not limit or len(body) <= limit:
            return body, props
        exc = EncodeError(f"result too large: {len(body)} bytes, broker limit {limit} "
                          "(worker.max_result_size, or the broker's max_message_size)")
        log.error("task %s: %s; the caller gets a FAILURE instead", job.describe(), exc)
        return jobs.failure_reply(job, exc)

    def result_limit(self) -> int:
        limits = [n for n in (self.max_result_size, self.broker_max_size) if n]
        return min(limits) if limits else 0
