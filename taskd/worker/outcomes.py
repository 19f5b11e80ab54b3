"""Outcomes: what the supervisor does once a task has run, or could not run.

The second half of a task's path (after :mod:`taskd.worker.intake`): publish
the result and acknowledge; publish a retry; redeliver the task of a child
that died, or dead-letter it after ``worker.max_deliveries``; report a hard
time limit. Every acknowledgement waits for the broker's confirm of whatever
replaces the message, and goes through :class:`~taskd.worker.acker.Acker`
so that acks are batched.

Two publishing paths, one for each kind of message:

* **Copies** that replace a delivery (park, retry, redeliver, dead letter) go
  through :meth:`Outcomes.publish_copy` and :class:`~taskd.worker.copies.Copies`:
  mandatory, headers made encodable and small enough, a return counts as a
  failure (the original is given back or held) and the topology is declared
  again.
* **Replies** to the caller (results, and the failures of revoked, timed-out
  and dead-lettered tasks) go through :meth:`Outcomes.publish_result`: confirmed
  before the delivery is acked; kept in ``unsent`` while the connection is
  down; tried again a bounded number of times when the broker refuses one
  (a nack: a full reply queue); larger than the broker takes, replaced by a
  FAILURE saying so. A ``reply_to`` outside ``worker.reply_to_pattern`` gets no
  reply at all: the worker is not a relay into other applications' queues.

A mixin of :class:`~taskd.worker.supervisor.Supervisor`.
"""
from __future__ import annotations

import logging

from .. import protocol
from ..exceptions import EncodeError, TaskdError, TimeLimitExceeded, WorkerLostError
from . import headers, jobs

log = logging.getLogger("taskd.supervisor")

# Publishes of one result before it is given up (logged) and its delivery acked
# anyway: a reply queue that refuses every message must not hold a prefetch slot
# for ever, nor a result the broker cannot take cause a reconnect after every other.
RESULT_ATTEMPTS = 3
RESULT_RETRY_DELAY = 1.0


class Outcomes:
    def on_child_ready(self, child, task_limits):
        self.task_names = frozenset(task_limits)
        self.task_limits = task_limits
        self.announce_ready()
        self.dispatch()

    def limits_for(self, request):
        """(hard, soft) seconds: the call's, else the task's, else the config's."""
        task_hard, task_soft = self.task_limits.get(request.name, (None, None))
        return (request.time_limit or task_hard or self.config["worker.time_limit"],
                request.soft_time_limit or task_soft or self.config["worker.soft_time_limit"])

    def on_outcome(self, child, job, outcome):
        status, runtime = outcome.status, outcome.runtime
        if job.timer is not None:
            job.timer.cancel()
        request = job.request
        if status == protocol.RETRY:
            self.counters["retried"] += 1
            self.retry(job, outcome.retry)
        elif status == protocol.SUCCESS:
            self.counters["succeeded"] += 1
            log.info("task %s succeeded in %.3fs", job.describe(), runtime)
        else:
            self.counters["failed"] += 1
            log.info("task %s failed in %.3fs: %s", job.describe(), runtime, outcome.error)
        reply_to = None if request.ignore_result else self.reply_to(job)
        reply = (outcome.body, jobs.result_properties(
            request.correlation_id, outcome.content_type, outcome.content_encoding)) \
            if reply_to else None
        if status == protocol.RETRY:
            if reply:       # the state, for a caller that looks
                self.publish("", reply_to, *reply, None)
        else:
            self.settle(job, reply)
        self._check_recycle(child)
        self.manage_children()
        self.dispatch()

    def _check_recycle(self, child):
        cfg = self.config
        max_tasks, max_memory = cfg["worker.max_tasks_per_child"], cfg["worker.max_memory_per_child"]
        if max_tasks and child.tasks_done >= max_tasks:
            log.info("child %d ran %d tasks: replacing it", child.index, child.tasks_done)
            self.pool.retire(child)
        elif max_memory and child.rss > max_memory:
            log.info("child %d uses %d MiB (limit %d MiB): replacing it",
                     child.index, child.rss >> 20, max_memory >> 20)
            self.pool.retire(child)

    def on_child_lost(self, child, job, reason, unstarted=()):
        if unstarted:       # sent in advance, never started: first in line again
            self.ready.extendleft(reversed(unstarted))
        if job is not None:
            if job.timer is not None:
                job.timer.cancel()
            if job.timed_out:
                self.counters["failed"] += 1
                self.fail(job, TimeLimitExceeded(f"hard time limit ({job.timed_out:g}s) exceeded"))
            else:
                self.redeliver(job, reason, count=not self.cutting)
        if not self.stopping:
            self.manage_children()
        self.dispatch()
        self._maybe_finish_stop()

    # == replies to the caller ===========================================================
    def reply_to(self, job):
        """Where ``job``'s reply goes: its ``reply_to``, if ``worker.reply_to_pattern``
        allows it; else None (logged)."""
        reply_to = job.properties.reply_to
        if not reply_to:
            return None
        if self.reply_to_pattern.fullmatch(reply_to):
            return reply_to
        log.warning("task %s: reply_to %r does not match worker.reply_to_pattern: no result "
                    "is sent there", job.describe(), headers.bounded(reply_to, 300))
        return None

    def settle(self, job, reply=None):
        """``job`` is finished for good: publish its reply (confirmed) if it has one,
        then ack."""
        self.remember(job, reply)
        if reply is None:
            self.complete(job)
        else:
            self.publish_result(job, *reply)

    def fail(self, job, exc, status=protocol.FAILURE):
        """Settle ``job`` with ``exc`` as its result (REVOKED, a time limit ...)."""
        self.settle(job, jobs.failure_reply(job, exc, status) if self.reply_to(job) else None)

    def publish_result(self, job, body, props, attempt=1):
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

        def confirmed(ok):
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

    def report_unsent(self):
        """At exit: name the tasks whose results never reached the broker. Their deliveries
        went back to the queue when the connection dropped; they will run again."""
        if self.unsent:
            log.warning("stopping while the broker is away: %d finished task(s) could not "
                        "report their result and will run again: %s", len(self.unsent),
                        ", ".join(job.describe() for job, *_ in self.unsent))

    def _within_limit(self, job, body, props):
        """The reply, or a FAILURE saying it is larger than the broker takes."""
        limit = self.result_limit()
        if not limit or len(body) <= limit:
            return body, props
        exc = EncodeError(f"result too large: {len(body)} bytes, broker limit {limit} "
                          "(worker.max_result_size, or the broker's max_message_size)")
        log.error("task %s: %s; the caller gets a FAILURE instead", job.describe(), exc)
        return jobs.failure_reply(job, exc)

    def result_limit(self):
        limits = [n for n in (self.config["worker.max_result_size"], self.broker_max_size) if n]
        return min(limits) if limits else 0

    # == copies that replace a delivery ====================================================
    def retry(self, job, message):
        """Publish the retry's message to the task's queue (confirmed), then ack."""
        log.info("task %s: retry %d published", job.describe(), message.retries)
        props = jobs.retry_properties(job, message)
        self.publish_copy("", job.queue, message.body, props, self._then_settle(job))

    def _then_settle(self, job, reply=None):
        """on_confirm for a copy that replaces ``job``: settle it, or give it back."""
        def confirmed(ok):
            if ok:
                self.settle(job, reply)
            else:
                self.give_back(job)
        return confirmed

    def redeliver(self, job, reason, count=True):
        """The child died mid-task: publish a copy (count + 1), or dead-letter it. A child
        killed by a shutdown (``count`` False) keeps the count: a cut is not a delivery."""
        if count and job.delivery_count >= self.config["worker.max_deliveries"]:
            exc = WorkerLostError(f"the child running it {reason}, "
                                  f"{job.delivery_count} times (worker.max_deliveries)")
            self.counters["failed"] += 1
            self.dead_letter(job, f"WorkerLostError: {exc}", exc)
            return
        if count:
            log.warning("task %s: child %s; redelivering (delivery %d of %d)", job.describe(),
                        reason, job.delivery_count + 1, self.config["worker.max_deliveries"])
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

    def dead_letter(self, job, reason, exc=None):
        """Move the message to the dead-letter queue (confirmed), then tell the caller
        (confirmed) and ack it."""
        reason = headers.bounded(reason)
        log.error("dead-lettering task %s from queue %s: %s", job.describe(), job.queue, reason)
        self.counters["dead_lettered"] += 1
        reply = jobs.failure_reply(job, exc or TaskdError(reason)) if self.reply_to(job) else None
        self.publish_copy("", self.dead_letter_queue, job.body, jobs.dead_letter(job, reason),
                          self._then_settle(job, reply))

    def publish_copy(self, exchange, routing_key, body, properties, on_confirm):
        """Publish a copy that replaces a delivery (see :class:`~taskd.worker.copies.Copies`)."""
        self.copies.publish(self.publisher, exchange, routing_key, body, properties, on_confirm)

    def publish(self, exchange, routing_key, body, properties, on_confirm):
        if self.publisher is None or not self.publisher.is_open:
            if on_confirm is not None:
                on_confirm(None)
            return
        self.publisher.publish(exchange, routing_key, body, properties,
                               on_confirm or (lambda ok: None))

    # == acks ===========================================================================
    def complete(self, job):
        """The job is finished for good: ack its delivery (coalesced by the acker)."""
        self.acker.complete(job)

    def give_back(self, job, delay=1.0):
        """A copy could not be confirmed: return the original to its queue (after
        ``delay`` seconds, so that a publisher that keeps failing is no busy loop)."""
        self.give_back_twins(job, delay)
        if delay:
            self.loop.call_later(delay, self.acker.nack, job)
        else:
            self.acker.nack(job)
