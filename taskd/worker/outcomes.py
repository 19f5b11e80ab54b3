"""Outcomes: what the supervisor does once a task has run, or could not run.

The second half of a task's path (after :mod:`taskd.worker.intake`): publish
the result and acknowledge; publish a retry; redeliver the task of a child
that died, or dead-letter it after ``worker.max_deliveries``; report a hard
time limit. Every acknowledgement waits for the broker's confirm of whatever
replaces the message, and goes through :class:`~taskd.worker.acks.AckTracker`
so that acks are batched.

A mixin of :class:`~taskd.worker.supervisor.Supervisor`.
"""
from __future__ import annotations

import logging

from .. import protocol
from ..exceptions import TaskdError, TimeLimitExceeded, WorkerLostError
from . import jobs

log = logging.getLogger("taskd.supervisor")

# Longest time a completed delivery waits for its ack, so that the acks of tasks
# finishing close together go out as one ``basic.ack(multiple=True)``: each ack
# frame costs the supervisor and the broker about as much as a delivery.
ACK_DELAY = 0.001


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

    def on_outcome(self, child, job, frame):
        _, _seq, status, body, ctype, encoding, runtime, rss, error, retry = frame
        if job.timer is not None:
            job.timer.cancel()
        request = job.request
        wants_result = request.reply_to and not request.ignore_result
        if status == protocol.RETRY:
            self.counters["retried"] += 1
            self.retry(job, retry)
        elif status == protocol.SUCCESS:
            self.counters["succeeded"] += 1
            log.info("task %s succeeded in %.3fs", job.describe(), runtime)
        else:
            self.counters["failed"] += 1
            log.info("task %s failed in %.3fs: %s", job.describe(), runtime, error)
        if wants_result:
            props = jobs.result_properties(request.correlation_id, ctype, encoding)
            if status == protocol.RETRY:       # the state, for a caller that looks
                self.publish("", request.reply_to, body, props, None)
            else:
                self.remember(job, (body, props))
                self.publish_result(job, body, props)
        elif status != protocol.RETRY:
            self.remember(job)
            self.complete(job)
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
                self.reply_failure(job, TimeLimitExceeded(
                    f"hard time limit ({job.timed_out:g}s) exceeded"))
                self.remember(job)
                self.complete(job)
            else:
                self.redeliver(job, reason)
        if not self.stopping:
            self.manage_children()
        self.dispatch()
        self._maybe_finish_stop()

    def publish_result(self, job, body, props):
        """Publish a result (confirmed), then ack; kept for later if the broker is away."""
        def confirmed(ok):
            if ok:
                self.complete(job)
            else:
                self.unsent.append((job, body, props))
        self.publish("", job.properties.reply_to, body, props, confirmed)

    def retry(self, job, message):
        """Publish the retry's message to the task's queue (confirmed), then ack."""
        log.info("task %s: retry %d published", job.describe(), message["retries"])
        props = jobs.retry_properties(job, message)
        self.publish("", job.queue, message["body"], props, self._then_complete(job))

    def _then_complete(self, job):
        """on_confirm for a copy that replaces ``job``: ack it, or give it back."""
        def confirmed(ok):
            if ok:
                self.remember(job)
                self.complete(job)
            else:
                self.give_back(job)
        return confirmed

    def redeliver(self, job, reason):
        """The child died mid-task: publish a copy (count + 1), or dead-letter it."""
        if job.delivery_count >= self.config["worker.max_deliveries"]:
            exc = WorkerLostError(f"the child running it {reason}, "
                                  f"{job.delivery_count} times (worker.max_deliveries)")
            self.counters["failed"] += 1
            self.dead_letter(job, f"WorkerLostError: {exc}", exc)
            return
        log.warning("task %s: child %s; redelivering (delivery %d of %d)", job.describe(),
                    reason, job.delivery_count + 1, self.config["worker.max_deliveries"])
        self.counters["redelivered"] += 1
        spec = self.config.queue(job.queue)
        if spec is not None and spec.quorum:
            self.give_back(job, delay=0)   # the broker counts deliveries (x-delivery-count)
            return
        self.publish("", job.queue, job.body, jobs.redelivery(job), self._then_complete(job))

    def dead_letter(self, job, reason, exc=None):
        """Move the message to the dead-letter queue (confirmed), then ack it."""
        log.error("dead-lettering task %s from queue %s: %s", job.describe(), job.queue, reason)
        self.counters["dead_lettered"] += 1
        self.publish("", self.dead_letter_queue, job.body, jobs.dead_letter(job, reason),
                     self._then_complete(job))
        self.reply_failure(job, exc or TaskdError(reason))

    def reply_failure(self, job, exc, status=protocol.FAILURE):
        reply_to = job.properties.reply_to
        if reply_to:
            body, props = jobs.failure_reply(job, exc, status)
            self.publish("", reply_to, body, props, None)

    def publish(self, exchange, routing_key, body, properties, on_confirm):
        if self.publisher is None or not self.publisher.is_open:
            if on_confirm is not None:
                on_confirm(None)
            return
        self.publisher.publish(exchange, routing_key, body, properties,
                               on_confirm or (lambda ok: None))

    # == acks ===========================================================================
    def complete(self, job):
        """The job is finished for good: ack its delivery. Under load acks are
        coalesced: sent once a quarter of the prefetch window has completed, else
        ``ACK_DELAY`` later. With nothing else in hand, at once: a client waiting for
        its publisher confirm of a persistent message waits for this ack."""
        if job.channel is not self.consumer.channel:
            return      # from a channel that is gone: the broker has requeued it
        self.acks.completed(job.tag)
        if self.acks.pending >= self.ack_batch or not (self.ready or self.pool.busy()):
            self._flush_acks()
        elif self._ack_timer is None:
            self._ack_timer = self.loop.call_later(ACK_DELAY, self._flush_acks)

    def give_back(self, job, delay=1.0):
        """A copy could not be confirmed: return the original to its queue (after
        ``delay`` seconds, so that a publisher that keeps failing is no busy loop)."""
        self.give_back_twins(job, delay)

        def nack():
            if job.channel is self.consumer.channel and self.consumer.is_open:
                self.acks.forget(job.tag)
                job.channel.basic_nack(job.tag, requeue=True)
        if delay:
            self.loop.call_later(delay, nack)
        else:
            nack()

    def _flush_acks(self):
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if not self.consumer.is_open:
            return
        channel = self.consumer.channel
        for tag, multiple in self.acks.flush():
            channel.basic_ack(tag, multiple=multiple)
        self._maybe_finish_stop()
