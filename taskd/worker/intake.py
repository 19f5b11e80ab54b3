"""Deliveries into the supervisor: validate, deduplicate, schedule, dispatch.

The first half of a task's path through the worker (the second is
:mod:`taskd.worker.outcomes`). A delivery is decoded and validated here; bad
input is dead-lettered before any child sees it; a redelivered copy of work
already done (after a connection drop) is settled without running; a task
with an ETA is held or parked (:mod:`taskd.worker.parking`); the rest wait in
``ready`` until :meth:`Intake.dispatch` hands them to idle children.

A mixin of :class:`~taskd.worker.supervisor.Supervisor`: it uses the
supervisor's tables (``ready``, ``schedule``, ``pool``, ``recent``, ``twins``)
and its publishing and acknowledging methods.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

from .. import protocol
from ..exceptions import NotRegistered, TaskdError, TaskRevokedError
from . import jobs, parking, recovery
from .framing import encode as encode_frame

log = logging.getLogger("taskd.supervisor")


class Intake:
    def on_delivery(self, channel, method, properties, body):
        """pika calls this for each message; a bug here must not kill the connection."""
        try:
            self._on_delivery(channel, method, properties, body)
        except Exception:
            log.exception("internal error handling delivery %s; returning it to the queue "
                          "in 1s", method.delivery_tag)
            self.acks.forget(method.delivery_tag)

            def nack():
                if channel.is_open:
                    channel.basic_nack(method.delivery_tag, requeue=True)
            self.loop.call_later(1.0, nack)

    def _on_delivery(self, channel, method, properties, body):
        self.counters["received"] += 1
        self.seq += 1
        job = jobs.Job(self.seq, method.delivery_tag, channel,
                       self.consumer_tags.get(method.consumer_tag, "?"), method.exchange,
                       method.routing_key, properties, body, method.redelivered)
        self.acks.received(method.delivery_tag)
        if method.redelivered and (self.finish_duplicate(job) or self.twin_of_running(job)):
            return
        limit = self.config["worker.max_message_size"]
        if limit and len(body) > limit:
            self.dead_letter(job, f"message of {len(body)} bytes exceeds "
                                  f"worker.max_message_size ({limit} bytes)")
            return
        try:
            job.request = protocol.decode_task(
                properties.headers, body, properties.content_type, properties.content_encoding,
                reply_to=properties.reply_to, correlation_id=properties.correlation_id,
                accept=self.accept)
        except TaskdError as exc:
            self.dead_letter(job, f"{type(exc).__name__}: {exc}", exc)
            return
        if self.revoke_if_expired(job):
            return
        eta = job.request.eta
        if eta is not None:
            delay = (eta - datetime.now(timezone.utc)).total_seconds()
            if delay > 0:
                self.schedule_job(job, eta, delay)
                return
        self.ready.append(job)
        if self.config["worker.child_prefetch"] > 1:
            self.dispatch_soon()        # batch the burst: several jobs per child per write
        else:
            self.dispatch()

    def schedule_job(self, job, eta, delay):
        """An ETA task: revoke it if it would expire first, else park or hold it."""
        expires = job.request.expires
        if expires is not None and expires < eta:
            log.warning("task %s expires (%s) before its ETA (%s): not run", job.describe(),
                        expires.isoformat(), eta.isoformat())
            self.counters["revoked"] += 1
            self.fail(job, TaskRevokedError(
                f"expires at {expires.isoformat()}, before its ETA {eta.isoformat()}"),
                protocol.REVOKED)
            return
        cfg = self.config
        if parking.should_park(delay, len(self.schedule), cfg["worker.eta_horizon"],
                               cfg["worker.max_held"]):
            self.park(job, delay)
        else:
            self.hold(job, delay)

    def hold(self, job, delay):
        self.schedule.hold(time.monotonic() + delay, job)
        self._update_qos()
        self._arm_schedule_timer()

    def park(self, job, delay):
        """Republish to the delay bucket that brings it back before it is due, then ack."""
        bucket = parking.bucket_for(delay)
        exchange = parking.exchange_name(self.config["worker.delay_queue_prefix"], bucket)
        self.counters["parked"] += 1
        log.debug("task %s parked in %s (due in %.0fs)", job.describe(), exchange, delay)

        def confirmed(ok):
            if ok:
                self.settle(job)
            elif ok is False:   # refused, or no queue took it: back to its queue, to be
                self.give_back(job)     # parked again once the topology is declared again
            elif job.channel is self.consumer.channel:    # no publisher: hold it here
                self.hold(job, max(0.0, delay))
        self.publish_copy(exchange, job.queue, job.body, jobs.redelivery(job, keep_count=True),
                          confirmed)

    def finish_duplicate(self, job):
        """A redelivered message this worker already finished: ack it, do not run it."""
        key = recovery.delivery_key(job.headers, job.properties.correlation_id)
        if key not in self.recent:
            return False
        self.counters["duplicates"] += 1
        log.warning("task %s was finished before the connection dropped: acknowledging the "
                    "redelivered copy without running it", job.describe())
        result = self.recent.get(key)
        if result is not None:
            self.publish_result(job, *result)
        else:
            self.complete(job)
        return True

    def twin_of_running(self, job):
        """A redelivered copy of a task still running here: settle it with the original."""
        key = recovery.delivery_key(job.headers, job.properties.correlation_id)
        for child in self.pool.busy():
            for running in (child.job, *child.queued):
                if recovery.delivery_key(running.headers,
                                         running.properties.correlation_id) == key:
                    log.warning("task %s is still running here: its redelivered copy will be "
                                "acknowledged when it finishes", job.describe())
                    self.counters["duplicates"] += 1
                    self.twins.setdefault(key, []).append(job)
                    return True
        return False

    def remember(self, job, result=None):
        """Record a finished delivery; settle any redelivered twin waiting for it."""
        key = recovery.delivery_key(job.headers, job.properties.correlation_id)
        self.recent.add(key, result)
        for twin in self.twins.pop(key, ()):
            if result is not None:
                self.publish_result(twin, *result)
            else:
                self.complete(twin)

    def revoke_if_expired(self, job):
        expires = job.request.expires
        if expires is None or expires > datetime.now(timezone.utc):
            return False
        log.warning("task %s expired at %s: not run", job.describe(), expires.isoformat())
        self.counters["revoked"] += 1
        self.fail(job, TaskRevokedError(f"expired at {expires.isoformat()}"), protocol.REVOKED)
        return True

    def _arm_schedule_timer(self):
        due = self.schedule.next_due()
        if due is None:
            return
        if self._timer is not None:
            if self._timer.when() <= due:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(due, self._release_due)

    def _release_due(self):
        self._timer = None
        self.ready.extend(self.schedule.pop_due(time.monotonic()))
        self._update_qos()
        self._arm_schedule_timer()
        self.dispatch()

    def dispatch_soon(self):
        """Dispatch once the deliveries that arrived together are all decoded, so that
        a child given several jobs gets them in one write."""
        if not self._dispatch_handle:
            self._dispatch_handle = self.loop.call_soon(self.dispatch)

    def dispatch(self):
        """Give ready jobs to idle children, then (``worker.child_prefetch`` > 1) more
        in advance to busy ones, so that they never wait for the supervisor. Jobs go
        round the children one at a time; each child's share is written at once."""
        self._dispatch_handle = None
        if not self.ready:
            return
        rooms = self.pool.room(self.config["worker.child_prefetch"])
        batches = {}
        while rooms and self.ready:
            for child in list(rooms):
                job = self._next_runnable()
                if job is None:
                    break
                batches.setdefault(child, []).append(job)
                if rooms[child] == 1:
                    del rooms[child]
                else:
                    rooms[child] -= 1
        for child, batch in batches.items():
            data = []
            for job in batch:
                job.hard_limit, soft = self.limits_for(job.request)
                data.append(encode_frame(job.job_frame(soft)))
            started = self.pool.send(child, batch, b"".join(data) if len(data) > 1 else data[0])
            if started is not None:
                self.on_started(child, started)

    def on_started(self, child, job):
        """A child starts ``job``: arm its hard time limit."""
        if job.hard_limit:
            job.timer = self.loop.call_later(job.hard_limit, self._time_limit_hit, child, job,
                                             job.hard_limit)

    def _next_runnable(self):
        """The next ready job a child may run; unknown or expired ones are settled here."""
        while self.ready:
            job = self.ready.popleft()
            if self.task_names is not None and job.request.name not in self.task_names:
                self.dead_letter(job, f"NotRegistered: unknown task {job.request.name!r}",
                                 NotRegistered(f"task {job.request.name!r} is not registered "
                                               "in this worker"))
            elif not self.revoke_if_expired(job):
                return job
        return None

    def _time_limit_hit(self, child, job, limit):
        if child.job is job:
            log.error("task %s exceeded its hard time limit (%gs): killing child %d (pid %d)",
                      job.describe(), limit, child.index, child.pid)
            job.timed_out = limit
            self.pool.kill(child)
