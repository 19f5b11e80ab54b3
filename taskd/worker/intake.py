"""Deliveries into the supervisor: validate, deduplicate, schedule, dispatch.

The first half of a task's path through the worker (the second is
:mod:`taskd.worker.outcomes`). A delivery is decoded and validated here; bad
input is dead-lettered before any child sees it; a redelivered copy of work
already done (after a connection drop) is settled without running; a task
with an ETA is held or parked (:mod:`taskd.worker.parking`); the rest wait in
``ready`` until :meth:`Intake.dispatch` hands them to idle children.

Every delivery ends in one of three ways: it runs (and is acked after its
outcome), it is dead-lettered with a reason (and its caller gets a FAILURE),
or it is settled as a copy of work done here. Anything that raises on the way
is an internal error: the delivery is given back to its queue and, after
:class:`~taskd.worker.strikes.Strikes` of them, dead-lettered with the error's
text. Nothing raises into pika, which would drop the frames read after it.

A mixin of :class:`~taskd.worker.supervisor.Supervisor`: it uses the
supervisor's tables (``ready``, ``schedule``, ``pool``, ``recent``, ``twins``,
``strikes``) and its publishing and acknowledging methods.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

from .. import protocol
from ..exceptions import InvalidTaskMessage, NotRegistered, TaskdError, TaskRevokedError
from . import jobs, parking, recovery, strikes
from .framing import encode as encode_frame

log = logging.getLogger("taskd.supervisor")


class Intake:
    def on_delivery(self, channel, method, properties, body):
        """pika calls this for each message."""
        if channel is self.forsaken:
            return
        job = self._receive(channel, method, properties, body)
        try:
            runnable = self._admit(job)
        except Exception as exc:
            self.internal_error(job, exc)
            return
        if runnable:
            self.ready.append(job)
            if self.config["worker.child_prefetch"] > 1:
                self.dispatch_soon()    # batch the burst: several jobs per child per write
            else:
                self.dispatch()

    def forsake_channel(self):
        """The connections are being replaced: deliveries that still arrive on the
        consuming channel (read before the loss was noticed) are left to the broker,
        which requeues them when the channel closes. Taken, they would run beside
        their redelivered copies."""
        self.forsaken = self.consumer.channel if self.consumer is not None else None

    def _receive(self, channel, method, properties, body):
        self.counters["received"] += 1
        self.seq += 1
        if channel is not self.delivering:     # the first delivery on a new channel
            self.delivering = channel
            self.recent.next_channel()
            self.twins.clear()      # held for the old channel: the broker requeued them
        job = jobs.Job(self.seq, method.delivery_tag, channel,
                       self.consumer_tags.get(method.consumer_tag, "?"), method.exchange,
                       method.routing_key, properties, body, method.redelivered)
        job.epoch = self.recent.epoch
        self.acks.received(method.delivery_tag)
        return job

    def _admit(self, job):
        """Decode and validate ``job``; True when it is to run now, False when it was
        settled here (dead-lettered, a duplicate, expired) or waits for its ETA."""
        limit = self.config["worker.max_message_size"]
        if limit and len(job.body) > limit:
            self.dead_letter(job, f"message of {len(job.body)} bytes exceeds "
                                  f"worker.max_message_size ({limit} bytes)")
            return False
        properties = job.properties
        try:
            job.request = protocol.decode_task(
                properties.headers, job.body, properties.content_type,
                properties.content_encoding, reply_to=properties.reply_to,
                correlation_id=properties.correlation_id, accept=self.accept)
            jobs.check_headers(job.headers)
        except TaskdError as exc:
            self.dead_letter(job, f"{type(exc).__name__}: {exc}", exc)
            return False
        job.key = recovery.delivery_key(job.request, job.body)
        if job.redelivered and (self.finish_duplicate(job) or self.twin_of_running(job)):
            return False
        if self.revoke_if_expired(job):
            return False
        eta = job.request.eta
        if eta is not None:
            delay = (eta - datetime.now(timezone.utc)).total_seconds()
            if delay > 0:
                self.schedule_job(job, eta, delay)
                return False
        return True

    def internal_error(self, job, exc):
        """Handling ``job`` raised: give it back to its queue, or dead-letter it once it
        has done so :attr:`Strikes.limit` times (see :mod:`taskd.worker.strikes`)."""
        if not self.strikes.add(strikes.message_digest(job.properties.correlation_id,
                                                       job.body)):
            log.exception("internal error handling task %s (delivery %s); giving it back "
                          "to the queue in 1s", job.describe(), job.tag)
            self.give_back(job)
            return
        reason = (f"internal error, {self.strikes.limit} times: {type(exc).__name__}: "
                  f"{exc}")
        log.exception("internal error handling task %s (delivery %s), %d in a row: "
                      "dead-lettering it", job.describe(), job.tag, self.strikes.limit)
        try:
            self.dead_letter(job, reason, TaskdError(reason))
        except Exception:
            # Never lost: left unacknowledged, it holds one prefetch slot and goes back to
            # its queue when this channel closes (a reconnect or a stop).
            log.exception("could not dead-letter task %s either: it stays unacknowledged "
                          "and goes back to its queue when this worker's channel closes",
                          job.describe())

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
        """A redelivered message this worker finished before its channel was lost: ack
        it, do not run it."""
        done = self.recent.find(job.key, job.epoch)
        if done is None:
            return False
        self.counters["duplicates"] += 1
        log.warning("task %s was finished before the connection dropped: acknowledging the "
                    "redelivered copy without running it", job.describe())
        if done.result is not None:
            self.publish_result(job, *done.result)
        else:
            self.complete(job)
        return True

    def twin_of_running(self, job):
        """A redelivered copy of a task still running here, received on a channel since
        lost: settle the copy with the original."""
        for child in self.pool.busy():
            for running in (child.job, *child.queued):
                if running.key == job.key and running.epoch < job.epoch:
                    log.warning("task %s is still running here: its redelivered copy will be "
                                "acknowledged when it finishes", job.describe())
                    self.counters["duplicates"] += 1
                    self.twins.setdefault(job.key, []).append(job)
                    return True
        return False

    def remember(self, job, result=None):
        """Record a finished delivery; settle any redelivered twin waiting for it."""
        if job.key is None:         # never decoded: no copy of it is held as a twin
            return
        self.recent.add(job.key, job.epoch, result)
        for twin in self.twins.pop(job.key, ()):
            if result is not None:
                self.publish_result(twin, *result)
            else:
                self.complete(twin)

    def give_back_twins(self, job, delay):
        """``job`` goes back to its queue unfinished: so do its twins held here."""
        for twin in self.twins.pop(job.key, ()) if job.key is not None else ():
            self.give_back(twin, delay)

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
                picked = self._next_runnable()
                if picked is None:
                    break
                batch, frames = batches.setdefault(child, ([], []))
                batch.append(picked[0])
                frames.append(picked[1])
                if rooms[child] == 1:
                    del rooms[child]
                else:
                    rooms[child] -= 1
        for child, (batch, frames) in batches.items():
            started = self.pool.send(child, batch, b"".join(frames) if len(frames) > 1 else frames[0])
            if started is not None:
                self.on_started(child, started)

    def on_started(self, child, job):
        """A child starts ``job``: arm its hard time limit."""
        if job.hard_limit:
            job.timer = self.loop.call_later(job.hard_limit, self._time_limit_hit, child, job,
                                             job.hard_limit)

    def _next_runnable(self):
        """The next ready job a child may run and its frame; unknown or expired ones, and
        those that cannot be framed, are settled here."""
        while self.ready:
            job = self.ready.popleft()
            if self.task_names is not None and job.request.name not in self.task_names:
                name = protocol.short_repr(job.request.name)
                self.dead_letter(job, f"NotRegistered: unknown task {name}",
                                 NotRegistered(f"task {name} is not registered in this worker"))
            elif not self.revoke_if_expired(job):
                frame = self._frame(job)
                if frame is not None:
                    return job, frame
        return None

    def _frame(self, job):
        """The frame that hands ``job`` to a child, or None when it cannot be made: the
        job is then dead-lettered. Arguments nested deeper than pickle recurses (JSON
        decodes deeper), or objects from a custom serializer that do not pickle."""
        job.hard_limit, soft = self.limits_for(job.request)
        try:
            return encode_frame(job.job_frame(soft))
        except Exception as exc:
            reason = (f"InvalidTaskMessage: the arguments cannot be handed to a child "
                      f"process: {type(exc).__name__}: {exc}")
            self.dead_letter(job, reason, InvalidTaskMessage(reason))
            return None

    def _time_limit_hit(self, child, job, limit):
        if child.job is job:
            log.error("task %s exceeded its hard time limit (%gs): killing child %d (pid %d)",
                      job.describe(), limit, child.index, child.pid)
            job.timed_out = limit
            self.pool.kill(child)
