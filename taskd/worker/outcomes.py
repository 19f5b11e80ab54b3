"""Outcomes: how a delivery ends, once its task has run or could not run.

Every delivery ends in one of these ways, each confirmed by the broker before
the delivery is acked (through :class:`~taskd.worker.acker.Acker`):

* **settled** with its reply, if it has one (:class:`~taskd.worker.replies.Replies`);
* **retried**: the child's retry message is published to the task's queue;
* **redelivered** (its child died): a copy with the delivery count + 1, or
  dead-lettered after ``worker.max_deliveries``;
* **dead-lettered** with a reason, and its caller told;
* **given back** to its queue (a copy could not be confirmed), after a pause.

Copies that replace a delivery (park, retry, redeliver, dead letter) go
through :class:`~taskd.worker.copies.Copies`: mandatory, headers made
encodable and small enough, a return counts as a failure (the original is
given back or held) and the topology is declared again.

A revoked task (:mod:`taskd.worker.revokes`) ends like an expired one:
:meth:`Outcomes.revoke` beside :meth:`Outcomes.expire`, and a child a revoke
terminated is not a crash: its task ends REVOKED, not redelivered.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from .. import protocol
from ..exceptions import TaskdError, TaskRevokedError, TimeLimitExceeded, WorkerLostError
from . import headers, jobs, lifecycle
from .framing import Outcome

log = logging.getLogger("taskd.supervisor")


class Outcomes:
    def __init__(self, loop: asyncio.AbstractEventLoop, acker: Any, replies: Any, copies: Any,
                 duplicates: Any, counters: collections.Counter, config: Any,
                 store: Any = None) -> None:
        self.loop, self.acker, self.replies, self.copies = loop, acker, replies, copies
        self.duplicates, self.counters, self.config = duplicates, counters, config
        self.revoked: Any = None    # a RevokedSet, when remote control is on
        self.lifecycle: lifecycle.Observer = lifecycle.NOBODY
        # Where results go: the result store if there is one, else the caller's reply queue
        # (copies always go through the broker, on the replies' publisher).
        self.results = store if store is not None else replies
        # The workflow steps that follow a task (canvas.Workflows), set by the supervisor.
        self.workflows: Any = None

    # == a task ran ========================================================================
    def ran(self, job: Any, outcome: Outcome) -> None:
        """A child reports ``job``'s outcome: publish its reply, or its retry, then ack."""
        if job.timer is not None:
            job.timer.cancel()
        status, runtime = outcome.status, outcome.runtime
        request = job.request
        if status == protocol.RETRY:
            self.counters["retried"] += 1
            self.lifecycle.retried(job, outcome)
            self.retry(job, outcome.retry)
        elif status == protocol.SUCCESS:
            self.counters["succeeded"] += 1
            self.lifecycle.succeeded(job, outcome)
            log.info("task %s succeeded in %.3fs", job.describe(), runtime)
        else:
            self.counters["failed"] += 1
            self.lifecycle.failed(job, outcome)
            log.info("task %s failed in %.3fs: %s", job.describe(), runtime, outcome.error)
        reply_to = None if request.ignore_result else self.results.reply_to(job)
        reply = (outcome.body, jobs.result_properties(
            request.correlation_id, outcome.content_type, outcome.content_encoding)) \
            if reply_to else None
        if status == protocol.RETRY:
            if reply:       # the state, for a caller that looks
                self.results.note(job, *reply)
        elif self.workflows is not None and request.embed and self.workflows.follow(
                job, status, outcome.body, outcome.content_type, outcome.content_encoding,
                lambda: self.settle(job, reply), self.fault):
            return          # settled once its next steps are confirmed
        else:
            self.settle(job, reply)

    def lost(self, job: Any, reason: str, count: bool = True) -> None:
        """``job``'s child died: a time limit's failure, or a redelivery."""
        if job.timer is not None:
            job.timer.cancel()
        if job.timed_out:
            self.counters["failed"] += 1
            self.fail(job, TimeLimitExceeded(f"hard time limit ({job.timed_out:g}s) exceeded"))
        elif job.terminated:
            log.warning("task %s: terminated by a revoke (%s)", job.describe(), job.terminated)
            self.counters["revoked"] += 1
            self.fail(job, TaskRevokedError(f"revoked, terminated ({job.terminated})"),
                      protocol.REVOKED)
        else:
            self.redeliver(job, reason, count=count)

    def expire(self, job: Any, now: Optional[datetime] = None) -> bool:
        """Settle ``job`` as REVOKED if it expired (before ``now``); True if it did."""
        expires = job.request.expires
        if expires is None or expires > (now or datetime.now(timezone.utc)):
            return False
        log.warning("task %s expired at %s: not run", job.describe(), expires.isoformat())
        self.counters["revoked"] += 1
        self.fail(job, TaskRevokedError(f"expired at {expires.isoformat()}"), protocol.REVOKED,
                  expired=True)
        return True

    def revoke(self, job: Any) -> bool:
        """Settle ``job`` as REVOKED if its id was revoked; True if it was."""
        if self.revoked is None or job.request.id not in self.revoked:
            return False
        log.warning("task %s was revoked: not run", job.describe())
        self.counters["revoked"] += 1
        self.fail(job, TaskRevokedError("revoked"), protocol.REVOKED)
        return True

    def fault(self, job: Any) -> None:
        """Handling ``job``'s outcome (or its child's death) raised. Unless its delivery is
        settled, it is redelivered with its count + 1 (dead-lettered after
        ``worker.max_deliveries``), so a bug that recurs on one message cannot loop; if even
        that raises, the delivery goes back to the broker a second later. It may run
        again; it is not lost."""
        if not self._unsettled(job):
            return
        try:
            self.redeliver(job, "ran it, but the supervisor failed to handle that "
                                "(internal error)")
        except Exception:
            log.exception("task %s: could not redeliver it; returning it to the broker in 1s",
                          job.describe())
            self.loop.call_later(1.0, self._give_back_unsettled, job)

    def _unsettled(self, job: Any) -> bool:
        conn = self.acker.conn
        return conn is not None and job.channel is conn.channel \
            and not self.acker.settled(job.tag)

    def _give_back_unsettled(self, job: Any) -> None:
        if self._unsettled(job):
            self.give_back(job, delay=0)

    # == settling ============================================================================
    def settle(self, job: Any, reply: Optional[tuple] = None) -> None:
        """``job`` is finished for good: publish its reply (confirmed) if it has one,
        then ack; its twins held here go with it."""
        for twin in self.duplicates.done(job, reply):
            self._finish(twin, reply)
        self._finish(job, reply)

    def _finish(self, job: Any, reply: Optional[tuple]) -> None:
        if reply is None:
            self.acker.complete(job)
        else:
            self.results.publish_result(job, *reply)

    def fail(self, job: Any, exc: BaseException, status: str = protocol.FAILURE,
             expired: bool = False) -> None:
        """Settle ``job`` with ``exc`` as its result (REVOKED, a time limit ...);
        ``expired``: a REVOKED because its ``expires`` passed. A workflow step's error
        callbacks (none for a revoke) and its chord go first."""
        if status == protocol.REVOKED:
            self.lifecycle.revoked(job, str(exc), expired=expired)
        else:
            self.lifecycle.failed(job, exc=exc)
        failure = jobs.failure_reply(job, exc, status)
        reply = failure if self.results.reply_to(job) else None
        request = job.request
        if self.workflows is not None and request is not None and request.embed and \
                self.workflows.follow(job, protocol.FAILURE, failure[0],
                                      failure[1].content_type, failure[1].content_encoding,
                                      lambda: self.settle(job, reply), self.fault,
                                      revoked=status == protocol.REVOKED):
            return
        self.settle(job, reply)

    def give_back(self, job: Any, delay: float = 1.0) -> None:
        """A copy could not be confirmed: return the original to its queue (after
        ``delay`` seconds, so that a publisher that keeps failing is no busy loop)."""
        for twin in self.duplicates.unfinished(job):
            self.give_back(twin, delay)
        if delay:
            self.loop.call_later(delay, self.acker.nack, job)
        else:
            self.acker.nack(job)

    # == copies that replace a delivery ====================================================
    def retry(self, job: Any, message: Any) -> None:
        """Publish the retry's message to the task's queue (confirmed), then ack."""
        log.info("task %s: retry %d published", job.describe(), message.retries)
        props = jobs.retry_properties(job, message)
        self.publish_copy("", job.queue, message.body, props, self._then_settle(job))

    def _then_settle(self, job: Any, reply: Optional[tuple] = None) -> Callable:
        """on_confirm for a copy that replaces ``job``: settle it, or give it back."""
        def confirmed(ok: Optional[bool]) -> None:
            if ok:
                self.settle(job, reply)
            else:
                self.give_back(job)
        return confirmed

    def redeliver(self, job: Any, reason: str, count: bool = True) -> None:
        """The child died mid-task: publish a copy (count + 1), or dead-letter it. A child
        killed by a shutdown (``count`` False) keeps the count: a cut is not a delivery."""
        max_deliveries = self.config["worker.max_deliveries"]
        if count and job.delivery_count >= max_deliveries:
            exc = WorkerLostError(f"the child running it {reason}, "
                                  f"{job.delivery_count} times (worker.max_deliveries)")
            self.counters["failed"] += 1
            self.dead_letter(job, f"WorkerLostError: {exc}", exc)
            return
        if count:
            log.warning("task %s: child %s; redelivering (delivery %d of %d)", job.describe(),
                        reason, job.delivery_count + 1, max_deliveries)
        else:
            log.warning("task %s: child %s by the shutdown; redelivering (not counted as a "
                        "delivery)", job.describe(), reason)
        self.counters["redelivered"] += 1
        spec = self.config.queue(job.queue)
        if spec is not None and spec.quorum:
            self.give_back(job, delay=0)   # the broker counts deliveries (x-delivery-count)
            return
        self.publish_copy("", job.queue, job.body, jobs.redelivery(job, keep_count=not count),
                          self._then_settle(job))

    def dead_letter(self, job: Any, reason: str, exc: Optional[BaseException] = None) -> None:
        """Move the message to the dead-letter queue (confirmed), then tell the caller
        (confirmed) and ack it."""
        reason = headers.bounded(reason)
        log.error("dead-lettering task %s from queue %s: %s", job.describe(), job.queue, reason)
        self.counters["dead_lettered"] += 1
        self.lifecycle.dead_lettered(job, reason)
        reply = (jobs.failure_reply(job, exc or TaskdError(reason))
                 if self.results.reply_to(job) else None)
        self.publish_copy("", self.config["worker.dead_letter_queue"], job.body,
                          jobs.dead_letter(job, reason), self._then_settle(job, reply))

    def publish_copy(self, exchange: str, routing_key: str, body: bytes, properties: Any,
                     on_confirm: Callable) -> None:
        """Publish a copy that replaces a delivery (see :class:`~taskd.worker.copies.Copies`)."""
        self.copies.publish(self.replies.publisher, exchange, routing_key, body, properties,
                            on_confirm)
