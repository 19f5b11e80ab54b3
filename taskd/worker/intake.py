"""Intake: deliveries into the worker: decode, validate, deduplicate, schedule.

A delivery is decoded and validated here; bad input is dead-lettered before
any child sees it; a redelivered copy of work already done (after a connection
drop) is settled without running (:class:`~taskd.worker.recovery.Duplicates`);
a task with an ETA is held or parked (:mod:`taskd.worker.parking`); the rest
go to the :class:`~taskd.worker.dispatch.Dispatcher`.

Every delivery ends in one of three ways: it runs (and is acked after its
outcome), it is dead-lettered with a reason (and its caller gets a FAILURE),
or it is settled as a copy of work done here. Anything that raises on the way
is an internal error: the delivery is given back to its queue and, after
:class:`~taskd.worker.strikes.Strikes` of them, dead-lettered with the error's
text. Nothing raises into pika, which would drop the frames read after it.
"""
from __future__ import annotations

import collections
import logging
from datetime import datetime, timezone
from typing import Any, Optional

from .. import protocol, serialization
from ..exceptions import TaskdError, TaskRevokedError
from . import jobs, lifecycle, parking, recovery, strikes

log = logging.getLogger("taskd.supervisor")


class Intake:
    """Collaborators: ``consumer`` (its tags and channel), ``acker`` (tags received),
    ``dispatcher`` (jobs to run or hold), ``outcomes`` (how a delivery ends),
    ``duplicates``, ``pool`` (the tasks running, for twins) and ``counters``."""

    def __init__(self, consumer: Any, acker: Any, dispatcher: Any, outcomes: Any,
                 duplicates: Any, pool: Any, counters: collections.Counter,
                 config: Any) -> None:
        self.consumer, self.acker, self.dispatcher = consumer, acker, dispatcher
        self.outcomes, self.duplicates, self.pool = outcomes, duplicates, pool
        self.counters = counters
        self.strikes = strikes.Strikes()    # internal errors per message
        self.seq = 0
        self.forsaken: Any = None           # the consuming channel of a lost connection
        self.lifecycle: lifecycle.Observer = lifecycle.NOBODY
        self.workflows: Any = None          # canvas.Workflows: refuses what it cannot run
        self.configure(config)

    def configure(self, config: Any) -> None:
        self.config = config
        self.accept = serialization.accept_set(config["accept_content"])

    def on_delivery(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
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
            self.dispatcher.add(job)

    def forsake_channel(self) -> None:
        """The connections are being replaced: deliveries that still arrive on the
        consuming channel (read before the loss was noticed) are left to the broker,
        which requeues them when the channel closes. Taken, they would run beside
        their redelivered copies."""
        self.forsaken = self.consumer.channel

    def _receive(self, channel: Any, method: Any, properties: Any, body: bytes) -> jobs.Job:
        self.counters["received"] += 1
        self.seq += 1
        job = jobs.Job(self.seq, method.delivery_tag, channel,
                       self.consumer.tags.get(method.consumer_tag, "?"), method.exchange,
                       method.routing_key, properties, body, method.redelivered)
        job.epoch = self.duplicates.epoch_of(channel)
        self.acker.received(method.delivery_tag)
        return job

    def _admit(self, job: jobs.Job) -> bool:
        """Decode and validate ``job``; True when it is to run now, False when it was
        settled here (dead-lettered, a duplicate, expired) or waits for its ETA."""
        limit = self.config["worker.max_message_size"]
        if limit and len(job.body) > limit:
            self.outcomes.dead_letter(job, f"message of {len(job.body)} bytes exceeds "
                                           f"worker.max_message_size ({limit} bytes)")
            return False
        properties = job.properties
        try:
            job.request = protocol.decode_task(
                properties.headers, job.body, properties.content_type,
                properties.content_encoding, reply_to=properties.reply_to,
                correlation_id=properties.correlation_id, accept=self.accept)
            jobs.check_headers(job.headers)
            if job.request.embed and self.workflows is not None:
                self.workflows.check(job.request)
        except TaskdError as exc:
            self.outcomes.dead_letter(job, f"{type(exc).__name__}: {exc}", exc)
            if self.workflows is not None:
                self.workflows.refused(job, f"{type(exc).__name__}: {exc}")
            return False
        job.key = recovery.delivery_key(job.request, job.body)
        if job.redelivered and (self._finish_duplicate(job)
                                or self.duplicates.hold_twin(job, self.pool.busy())):
            return False
        self.lifecycle.received(job)
        if self.outcomes.expire(job) or self.outcomes.revoke(job):
            return False
        eta = job.request.eta
        if eta is not None:
            delay = (eta - datetime.now(timezone.utc)).total_seconds()
            if delay > 0:
                self._schedule(job, eta, delay)
                return False
        return True

    def _finish_duplicate(self, job: jobs.Job) -> bool:
        """A redelivered message this worker finished before its channel was lost: ack
        it (publishing its result again), do not run it."""
        done = self.duplicates.finished(job)
        if done is None:
            return False
        if done.result is not None:
            self.outcomes.replies.publish_result(job, *done.result)
        else:
            self.acker.complete(job)
        return True

    def internal_error(self, job: jobs.Job, exc: BaseException) -> None:
        """Handling ``job`` raised: give it back to its queue, or dead-letter it once it
        has done so :attr:`Strikes.limit` times (see :mod:`taskd.worker.strikes`)."""
        if not self.strikes.add(strikes.message_digest(job.properties.correlation_id,
                                                       job.body)):
            log.exception("internal error handling task %s (delivery %s); giving it back "
                          "to the queue in 1s", job.describe(), job.tag)
            self.outcomes.give_back(job)
            return
        reason = (f"internal error, {self.strikes.limit} times: {type(exc).__name__}: "
                  f"{exc}")
        log.exception("internal error handling task %s (delivery %s), %d in a row: "
                      "dead-lettering it", job.describe(), job.tag, self.strikes.limit)
        try:
            self.outcomes.dead_letter(job, reason, TaskdError(reason))
        except Exception:
            # Never lost: left unacknowledged, it holds one prefetch slot and goes back to
            # its queue when this channel closes (a reconnect or a stop).
            log.exception("could not dead-letter task %s either: it stays unacknowledged "
                          "and goes back to its queue when this worker's channel closes",
                          job.describe())

    def _schedule(self, job: jobs.Job, eta: datetime, delay: float) -> None:
        """An ETA task: revoke it if it would expire first, else park or hold it."""
        expires = job.request.expires
        if expires is not None and expires < eta:
            log.warning("task %s expires (%s) before its ETA (%s): not run", job.describe(),
                        expires.isoformat(), eta.isoformat())
            self.counters["revoked"] += 1
            self.outcomes.fail(job, TaskRevokedError(
                f"expires at {expires.isoformat()}, before its ETA {eta.isoformat()}"),
                protocol.REVOKED, expired=True)
            return
        cfg = self.config
        if parking.should_park(delay, len(self.dispatcher.schedule), cfg["worker.eta_horizon"],
                               cfg["worker.max_held"]):
            self._park(job, delay)
        else:
            self.dispatcher.hold(job, delay)

    def _park(self, job: jobs.Job, delay: float) -> None:
        """Republish to the delay bucket that brings it back before it is due, then ack."""
        bucket = parking.bucket_for(delay)
        exchange = parking.exchange_name(self.config["worker.delay_queue_prefix"], bucket)
        self.counters["parked"] += 1
        log.debug("task %s parked in %s (due in %.0fs)", job.describe(), exchange, delay)
        outcomes = self.outcomes

        def confirmed(ok: Optional[bool]) -> None:
            if ok:
                outcomes.settle(job)
            elif ok is False:   # refused, or no queue took it: back to its queue, to be
                outcomes.give_back(job)     # parked again once the topology is declared again
            elif job.channel is self.consumer.channel:    # no publisher: hold it here
                self.dispatcher.hold(job, max(0.0, delay))
        outcomes.publish_copy(exchange, job.queue, job.body,
                              jobs.redelivery(job, keep_count=True), confirmed)
