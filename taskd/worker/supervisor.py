"""The supervisor: one process, one thread, one asyncio event loop.

It owns the broker connections, the schedule of ETA tasks and the pool of
children, and nothing else runs on its thread. Everything is an event:

* a delivery from RabbitMQ -> decode and validate (bad input is dead-lettered
  here, before any child sees it) -> hold it until its ETA or queue it ->
  dispatch it to an idle child over its pipe;
* an outcome on a child's pipe -> publish the result (confirmed) -> ack;
* a child that dies -> redeliver its task (or dead-letter it after
  ``max_deliveries``) and fork a replacement;
* a signal -> ``handle_<signal>``. asyncio's signal handlers only write the
  signal number to a wake-up fd; the work happens here, in the loop.

Acknowledgements are sent only after the task has finished and its result
(or its dead-letter copy, or its redelivered copy) has been confirmed by the
broker, and are batched by :class:`~taskd.worker.acks.AckTracker`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import signal
import time
from datetime import datetime, timezone

from setproctitle import setproctitle

from .. import protocol, serialization
from ..broker import topology
from ..exceptions import (ConfigError, NotRegistered,
                          TaskdError, TaskRevokedError, TimeLimitExceeded, WorkerLostError)
from . import jobs
from .acks import AckTracker
from .amqp import AsyncChannel, ChannelLost
from .framing import encode as encode_frame
from . import parking, recovery
from .pool import Pool
from .schedule import Schedule
from .systemd import Notifier

log = logging.getLogger("taskd.supervisor")

EX_OK, EX_TASKS_CUT, EX_USAGE, EX_UNAVAILABLE, EX_SOFTWARE, EX_CONFIG = 0, 1, 64, 69, 70, 78


class Supervisor:
    def __init__(self, config, *, queues=None, concurrency=None, config_path=None):
        self.config = config
        self.config_path = config_path
        self.queue_override = queues
        self.concurrency_override = concurrency
        self._apply_settings(config)
        self.exit_code = EX_OK
        self.stopping = False
        self.counters = collections.Counter()
        self.started_at = time.time()
        self.config_loaded_at = time.time()
        self.last_reload = None
        self.notifier = Notifier()

    def _apply_settings(self, config):
        self.queues = tuple(self.queue_override or config.worker_queues()
                            or (config["default_queue"],))
        self.concurrency = self.concurrency_override or config["worker.concurrency"]
        self.accept = serialization.accept_set(config["accept_content"])
        self.dead_letter_queue = config["worker.dead_letter_queue"]

    # == the loop ==================================================================
    def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        try:
            asyncio.run(self._main())
        except Exception:
            log.exception("internal error in the supervisor")
            return EX_SOFTWARE
        return self.exit_code

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self.stopped = self.loop.create_future()
        self.ready = collections.deque()      # decoded jobs waiting for a child
        self.schedule = Schedule()            # jobs waiting for their ETA
        self.acks = AckTracker()
        self.seq = 0
        self._timer = None
        self._flush_scheduled = False
        self._spawn_timer = None
        self.task_names = None
        self.task_limits = {}
        self.consumer = self.publisher = None
        self.pool = Pool(self.loop, self.config["imports"],
                         track_rss=bool(self.config["worker.max_memory_per_child"]),
                         on_ready=self.on_child_ready, on_outcome=self.on_outcome,
                         on_lost=self.on_child_lost)
        self.recent = recovery.RecentlyDone()
        self.unsent = []                      # results to publish again after a reconnect
        self.twins = {}                       # delivery key -> redelivered copies of running tasks
        self._reconnecting = True             # until the first connection is up
        self._install_signals()
        self.manage_children()
        try:
            if not await self._connect_with_retry():
                self.exit_code = EX_UNAVAILABLE
                await self._stop_children(cold=True)
                return
        except ConfigError as exc:
            for error in exc.errors:
                log.error("%s", error)
            self.exit_code = EX_CONFIG
            await self._stop_children(cold=True)
            return
        self._reconnecting = False
        log.info("consuming %s with %d children", ", ".join(self.queues), self.concurrency)
        self.notifier.ready(self.status_line())
        await self.stopped

    def _install_signals(self):
        handlers = {
            signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_int,
            signal.SIGQUIT: self.handle_quit, signal.SIGHUP: self.handle_hup,
            signal.SIGTTIN: self.handle_ttin, signal.SIGTTOU: self.handle_ttou,
            signal.SIGUSR1: self.handle_usr1, signal.SIGCHLD: self.handle_chld,
        }
        for sig, handler in handlers.items():
            self.loop.add_signal_handler(sig, handler)

    # == broker ======================================================================
    def _channel(self, name):
        cfg = self.config
        return AsyncChannel(self.loop, cfg.broker_url, connect_timeout=cfg["broker.connect_timeout"],
                            heartbeat=cfg["broker.heartbeat"], name=name,
                            on_lost=self.on_connection_lost)

    async def connect(self):
        """Open both connections, declare the topology, set QoS and start consuming."""
        self.publisher = self._channel("taskd-worker-publish")
        await self.publisher.open()
        await self.publisher.enable_confirms()
        self.consumer = self._channel("taskd-worker-consume")
        channel = await self.consumer.open()
        self.acks.reset()
        ops = (topology.plan(self.config, self.queues)
               + topology.dead_letter_plan(self.dead_letter_queue)
               + parking.plan(self.config["worker.delay_queue_prefix"]))
        await self._declare(ops)
        self._qos_extra = 0
        await self.consumer.call(channel.basic_qos, prefetch_count=self._prefetch())
        self.consumer_tags = {}
        for queue in self.queues:
            tag = channel.basic_consume(queue, self.on_delivery)
            self.consumer_tags[tag] = queue

    async def _declare(self, ops):
        channel = self.consumer.channel
        for op in ops:
            try:
                if isinstance(op, topology.DeclareExchange):
                    await self.consumer.call(channel.exchange_declare, op.name,
                                             exchange_type=op.type, durable=op.durable)
                elif isinstance(op, topology.DeclareQueue):
                    await self.consumer.call(channel.queue_declare, op.name, durable=op.durable,
                                             arguments=op.argument_dict)
                else:
                    await self.consumer.call(channel.queue_bind, op.queue, op.exchange,
                                             routing_key=op.routing_key)
            except ChannelLost as exc:
                if exc.refused:
                    raise ConfigError([topology.explain_channel_error(op, exc)], "broker") from None
                raise

    def _prefetch(self):
        return self.concurrency * self.config["worker.prefetch_multiplier"] + self._qos_extra

    def _update_qos(self):
        """Raise the prefetch by the ETA jobs held, so they do not starve the rest."""
        base = self.concurrency * self.config["worker.prefetch_multiplier"]
        held = len(self.schedule)
        if held > self._qos_extra or held + 2 * base < self._qos_extra:
            self._qos_extra = held + base if held else 0
            if self.consumer.is_open:
                self.consumer.channel.basic_qos(prefetch_count=min(self._prefetch(), 65535))

    async def _connect_with_retry(self):
        cfg = self.config
        return await recovery.connect_with_retry(self, cfg["broker.retry_for"],
                                                 cfg["broker.retry_max_interval"])

    async def close_connections(self):
        for conn in (self.consumer, self.publisher):
            if conn is not None:
                await conn.close()

    def on_connection_lost(self, reason):
        """A connection dropped: keep the children running, reconnect, resume."""
        if self.stopping or self._reconnecting:
            return
        self._reconnecting = True
        self.counters["connection_lost"] += 1
        dropped = len(self.ready) + len(self.schedule)
        log.error("lost the broker connection (%s); %d running task(s) go on, %d unstarted "
                  "go back to the broker; reconnecting", reason, len(self.pool.busy()), dropped)
        self.ready.clear()
        self.schedule.drain()
        self.acks.reset()
        self.loop.create_task(self._recover())

    async def _recover(self):
        await self.close_connections()
        try:
            ok = await self._connect_with_retry()
        except ConfigError as exc:
            for error in exc.errors:
                log.error("%s", error)
            self.exit_code, ok = EX_CONFIG, False
        self._reconnecting = False
        if not ok:
            if not self.stopping:
                self.exit_code = self.exit_code or EX_UNAVAILABLE
                await self._shutdown(cold=False)
            return
        log.info("reconnected; consuming %s again", ", ".join(self.queues))
        unsent, self.unsent = self.unsent, []
        for job, body, props in unsent:
            self.publish_result(job, body, props)
        self.notifier.ready(self.status_line())

    # == deliveries ==================================================================
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
        self.dispatch()

    def schedule_job(self, job, eta, delay):
        """An ETA task: revoke it if it would expire first, else park or hold it."""
        expires = job.request.expires
        if expires is not None and expires < eta:
            log.warning("task %s expires (%s) before its ETA (%s): not run", job.describe(),
                        expires.isoformat(), eta.isoformat())
            self.counters["revoked"] += 1
            self.reply_failure(job, TaskRevokedError(
                f"expires at {expires.isoformat()}, before its ETA {eta.isoformat()}"),
                protocol.REVOKED)
            self.complete(job)
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
                self.remember(job)
                self.complete(job)
            elif job.channel is self.consumer.channel:    # could not park: hold it here
                self.hold(job, max(0.0, delay))
        self.publish(exchange, job.queue, job.body, jobs.redelivery(job, keep_count=True),
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
            running = child.job
            if recovery.delivery_key(running.headers, running.properties.correlation_id) == key:
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
        self.reply_failure(job, TaskRevokedError(f"expired at {expires.isoformat()}"),
                           protocol.REVOKED)
        self.complete(job)
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

    def dispatch(self):
        """Give ready jobs to idle children."""
        if not self.ready:
            return
        for child in self.pool.idle():
            if not self.ready:
                break
            job = self.ready.popleft()
            if self.task_names is not None and job.request.name not in self.task_names:
                self.dead_letter(job, f"NotRegistered: unknown task {job.request.name!r}",
                                 NotRegistered(f"task {job.request.name!r} is not registered "
                                               "in this worker"))
                continue
            if self.revoke_if_expired(job):
                continue
            hard, soft = self.limits_for(job.request)
            if self.pool.send(child, job, encode_frame(job.job_frame(soft))):
                if hard:
                    job.timer = self.loop.call_later(hard, self._time_limit_hit, child, job, hard)
        self.update_title()

    def _time_limit_hit(self, child, job, limit):
        if child.job is job:
            log.error("task %s exceeded its hard time limit (%gs): killing child %d (pid %d)",
                      job.describe(), limit, child.index, child.pid)
            job.timed_out = limit
            self.pool.kill(child)

    # == outcomes ====================================================================
    def on_child_ready(self, child, task_limits):
        self.task_names = frozenset(task_limits)
        self.task_limits = task_limits
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
        props = jobs.result_properties(request.correlation_id, ctype, encoding)
        if status == protocol.RETRY:
            if wants_result:
                self.publish("", request.reply_to, body, props, None)
        elif wants_result:
            self.remember(job, (body, props))
            self.publish_result(job, body, props)
        else:
            self.remember(job)
            self.complete(job)
        self._check_recycle(child)
        self.manage_children()
        self.dispatch()
        self.update_title()

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

    def on_child_lost(self, child, job, reason):
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
        """The job is finished for good: ack its delivery (batched)."""
        if job.channel is not self.consumer.channel:
            return      # from a channel that is gone: the broker has requeued it
        self.acks.completed(job.tag)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_acks)

    def give_back(self, job, delay=1.0):
        """A copy could not be confirmed: return the original to its queue (after
        ``delay`` seconds, so that a publisher that keeps failing is no busy loop)."""
        def nack():
            if job.channel is self.consumer.channel and self.consumer.is_open:
                self.acks.forget(job.tag)
                job.channel.basic_nack(job.tag, requeue=True)
        if delay:
            self.loop.call_later(delay, nack)
        else:
            nack()

    def _flush_acks(self):
        self._flush_scheduled = False
        if not self.consumer.is_open:
            return
        channel = self.consumer.channel
        for tag, multiple in self.acks.flush():
            channel.basic_ack(tag, multiple=multiple)
        self._maybe_finish_stop()

    # == children ========================================================================
    def manage_children(self):
        """Fork children until the current generation has ``concurrency`` of them."""
        if self.stopping or self._spawn_timer is not None:
            return
        missing = self.concurrency - len(self.pool.serving())
        if missing <= 0:
            return
        wait = self.pool.backoff_remaining()
        if wait > 0:
            self._spawn_timer = self.loop.call_later(wait, self._spawn_after_backoff)
            return
        for _ in range(1 if self.pool.failures else missing):
            self.pool.spawn()
        self.update_title()

    def _spawn_after_backoff(self):
        self._spawn_timer = None
        self.manage_children()

    # == signals ==========================================================================
    def handle_term(self):
        """TERM: warm shutdown: stop consuming, finish running tasks, give the rest back."""
        if not self.stopping:
            log.info("SIGTERM: warm shutdown (waiting up to %gs for running tasks)",
                     self.config["worker.shutdown_timeout"])
            self.loop.create_task(self._shutdown(cold=False))

    def handle_int(self):
        """INT: as TERM; a second INT is a cold shutdown (QUIT)."""
        if self.stopping:
            self.handle_quit()
        else:
            self.handle_term()

    def handle_quit(self):
        """QUIT: cold shutdown: kill the children now; unfinished tasks go back to the queue."""
        log.warning("SIGQUIT: cold shutdown")
        self.loop.create_task(self._shutdown(cold=True))

    def handle_hup(self):
        """HUP: reload the configuration and replace the children gracefully."""
        from .reload import reload
        reload(self)

    def handle_ttin(self):
        """TTIN: one more child."""
        self.concurrency += 1
        log.info("SIGTTIN: concurrency now %d", self.concurrency)
        self.manage_children()
        self._update_qos_base()

    def handle_ttou(self):
        """TTOU: one child fewer (never below one)."""
        if self.concurrency <= 1:
            log.info("SIGTTOU: already at one child")
            return
        self.concurrency -= 1
        serving = self.pool.serving()
        if len(serving) > self.concurrency:
            victim = min(serving, key=lambda c: (c.job is not None, -c.index))
            self.pool.retire(victim)
        log.info("SIGTTOU: concurrency now %d", self.concurrency)
        self._update_qos_base()

    def handle_usr1(self):
        """USR1: log a dump of the state (children, running tasks, schedule, counters)."""
        now = time.monotonic()
        lines = [f"state: {self.status_line()}"]
        for c in sorted(self.pool.children.values(), key=lambda c: c.index):
            running = (f"{c.job.describe()} for {now - c.job_started:.1f}s" if c.job else "-")
            lines.append(f"  child {c.index} pid={c.pid} gen={c.generation} {c.state} "
                         f"tasks={c.tasks_done} rss={c.rss >> 20}MiB running={running}")
        lines.append(f"  ready={len(self.ready)} held={len(self.schedule)} "
                     f"counters={dict(self.counters)}")
        log.info("\n".join(lines))

    def handle_chld(self):
        """CHLD: reap exited children (their tasks are redelivered, they are replaced)."""
        self.pool.reap()

    def _update_qos_base(self):
        if self.consumer is not None and self.consumer.is_open:
            self.consumer.channel.basic_qos(prefetch_count=min(self._prefetch(), 65535))

    # == stopping ==========================================================================
    async def _shutdown(self, cold):
        first = not self.stopping
        self.stopping = True
        self.notifier.stopping()
        if first and self.consumer is not None and self.consumer.is_open:
            for tag in list(self.consumer_tags):
                try:
                    await self.consumer.call(self.consumer.channel.basic_cancel, tag)
                except ChannelLost:
                    break
        # Unstarted and held jobs stay unacked: the broker requeues them on close.
        returned = len(self.ready) + len(self.schedule)
        self.ready.clear()
        self.schedule.drain()
        if returned:
            log.info("giving %d unstarted task(s) back to the broker", returned)
        if not cold:
            self._drain_done = self.loop.create_future()
            self._maybe_finish_stop()
            try:
                await asyncio.wait_for(asyncio.shield(self._drain_done),
                                       self.config["worker.shutdown_timeout"])
            except asyncio.TimeoutError:
                cut = [c.job.describe() for c in self.pool.busy()]
                log.error("shutdown_timeout reached: killing children; these tasks go back to "
                          "the queue: %s", ", ".join(cut))
                self.exit_code = self.exit_code or EX_TASKS_CUT
                cold = True
        await self._stop_children(cold)
        await self.close_connections()
        log.info("stopped (exit code %d)", self.exit_code)
        if not self.stopped.done():
            self.stopped.set_result(None)

    def _maybe_finish_stop(self):
        done = getattr(self, "_drain_done", None)
        if done is None or done.done() or not self.stopping:
            return
        if not self.pool.busy() and not self._flush_scheduled and \
                not (self.publisher and self.publisher._confirms):
            done.set_result(None)

    async def _stop_children(self, cold):
        for child in list(self.pool.children.values()):
            if cold:
                self.pool.kill(child)
            else:
                self.pool.retire(child)
        deadline = time.monotonic() + 10
        while self.pool.children and time.monotonic() < deadline:
            self.pool.reap()
            await asyncio.sleep(0.02)
        for child in list(self.pool.children.values()):
            self.pool.kill(child)

    # == status ==============================================================================
    def status_line(self):
        busy = len(self.pool.busy())
        total = len(self.pool.serving())
        return (f"{busy}/{total} busy, {self.counters['succeeded']} ok, "
                f"{self.counters['failed']} failed, {len(self.schedule)} held")

    def update_title(self):
        busy = len(self.pool.busy())
        setproctitle(f"taskd: supervisor [{','.join(self.queues)}] {busy}/{self.concurrency} busy")



