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
broker, and are batched by :class:`~taskd.worker.acker.Acker`.

A task's path reads in order through :mod:`~taskd.worker.intake` (delivery to
dispatch) and :mod:`~taskd.worker.outcomes` (outcome to ack); this module
holds the loop, the connections, the children's numbers, signals and stopping.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import re
import signal
import time

from setproctitle import setproctitle

from .. import serialization
from ..exceptions import ConfigError
from .acker import Acker
from .amqp import AsyncChannel, ChannelLost, max_message_size
from . import parking, recovery
from .consumer import Consumer
from .control import ControlServer
from .copies import Copies
from .intake import Intake
from .outcomes import Outcomes
from .pool import BUSY, IDLE, Pool
from .reload import Reloader
from .schedule import Schedule
from .strikes import Strikes
from .systemd import Notifier

log = logging.getLogger("taskd.supervisor")

EX_OK, EX_TASKS_CUT, EX_USAGE, EX_UNAVAILABLE, EX_SOFTWARE, EX_CONFIG = 0, 1, 64, 69, 70, 78


class Supervisor(Intake, Outcomes):
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
        self.notifier = Notifier()
        self._title = None
        self._ticks = 0
        self._signals = ()

    def queues_for(self, config):
        """The queues this worker consumes under ``config`` (``-Q`` wins)."""
        return tuple(self.queue_override or config.worker_queues() or (config["default_queue"],))

    def _apply_settings(self, config):
        self.queues = self.queues_for(config)
        self.concurrency = self.concurrency_override or config["worker.concurrency"]
        self.accept = serialization.accept_set(config["accept_content"])
        self.dead_letter_queue = config["worker.dead_letter_queue"]
        self.reply_to_pattern = re.compile(config["worker.reply_to_pattern"])

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
        try:
            await self._serve()
        finally:
            # Before the loop closes its wake-up pipe: a signal arriving in between
            # (a child's SIGCHLD) would hit a closed fd and print a traceback.
            for sig in self._signals:
                self.loop.remove_signal_handler(sig)

    async def _serve(self):
        self.loop = asyncio.get_running_loop()
        self.stopped = self.loop.create_future()
        self.stop_requested = asyncio.Event()   # set when a shutdown starts
        self.ready = collections.deque()      # decoded jobs waiting for a child
        self.schedule = Schedule()            # jobs waiting for their ETA
        self.acker = Acker(self.loop, self.in_hand, self._maybe_finish_stop, self.ack_batch())
        self.seq = 0
        self._timer = None
        self._drain_done = None
        self._dispatch_handle = None
        self._spawn_timer = None
        self.task_names = None
        self.task_limits = {}
        self.publisher = None
        self.consumer = Consumer(self.loop, self._channel, self.on_delivery, lambda: self.config)
        self.pool = Pool(self.loop, self.config["imports"],
                         memory_limit=self.config["worker.max_memory_per_child"],
                         on_ready=self.on_child_ready, on_outcome=self.on_outcome,
                         on_lost=self.on_child_lost, on_started=self.on_started,
                         on_fault=self.on_pool_fault)
        self.recent = recovery.RecentlyDone()
        self.strikes = Strikes()              # internal errors per message
        self.delivering = None                # the channel of the last delivery
        self.forsaken = None                  # the consuming channel of a lost connection
        self.unsent = []                      # (job, body, props, attempt): results to
                                              # publish again after a reconnect
        self.copies = Copies(self.loop, self._declare_topology)
        self.reloader = Reloader(self.loop, self, self.pool, self.notifier)
        self.pacer = recovery.ReconnectPacer()
        self.broker_max_size = 0              # max_message_size, once the broker named it
        self.cutting = False                  # a shutdown is killing the children
        self.twins = {}                       # delivery key -> redelivered copies of running tasks
        self._reconnecting = True             # until the first connection is up
        self._install_signals()
        self._announced = False
        # Served from the start, so that `taskd status` answers while the worker waits
        # for the broker ("connected": false).
        self.control = ControlServer(self, self.config["worker.control_socket"])
        await self.control.start()
        try:
            await self._start()
        finally:
            self.control.close()

    async def _start(self):
        self.manage_children()
        try:
            if not await self._connect_with_retry():
                if self.stopping:       # a signal came while connecting: _shutdown ends it
                    await self.stopped
                    return
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
        self.pacer.connected()
        log.info("consuming %s with %d children", ", ".join(self.queues), self.concurrency)
        self.announce_ready()
        self._tick()
        await self.stopped

    def announce_ready(self):
        """READY=1 to systemd, once: connected, and a child has imported the task modules
        (a deployment whose modules do not import never reports ready)."""
        if self._announced or self._reconnecting or self.stopping:
            return
        if not any(c.state in (IDLE, BUSY) for c in self.pool.serving()):
            return
        self._announced = True
        log.info("ready")
        self.notifier.ready(self.status_line())

    def _tick(self):
        """Every few seconds: STATUS= and, under a systemd watchdog, WATCHDOG=1. Sent from
        the loop itself, so a loop that stalls stops the pings and systemd notices."""
        if self.stopping:
            return
        self.update_title()
        self._ticks += 1
        if self._ticks % 5 == 1:
            self.notifier.status(self.status_line())
        if self.notifier.watchdog_interval:
            self.notifier.watchdog()
        self.loop.call_later(min(1.0, self.notifier.watchdog_interval or 1.0), self._tick)

    def _install_signals(self):
        handlers = {
            signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_int,
            signal.SIGQUIT: self.handle_quit, signal.SIGHUP: self.handle_hup,
            signal.SIGTTIN: self.handle_ttin, signal.SIGTTOU: self.handle_ttou,
            signal.SIGUSR1: self.handle_usr1, signal.SIGCHLD: self.handle_chld,
        }
        for sig, handler in handlers.items():
            self.loop.add_signal_handler(sig, handler)
        self._signals = tuple(handlers)

    # == broker ======================================================================
    def _channel(self, name):
        cfg = self.config
        return AsyncChannel(self.loop, cfg.broker_url, connect_timeout=cfg["broker.connect_timeout"],
                            heartbeat=cfg["broker.heartbeat"], name=name,
                            on_lost=self.on_connection_lost, on_return=self.copies.on_return,
                            tls=cfg["broker.tls"])

    async def connect(self):
        """Open both connections, declare the topology, set QoS and start consuming."""
        self.publisher = self._channel("taskd-worker-publish")
        await self.publisher.open()
        await self.publisher.enable_confirms()
        self.acker.attach(await self.consumer.open(self.queues, self._prefetch_base()))

    @property
    def consumer_tags(self):
        """Consumer tag -> queue, on the current consuming channel."""
        return self.consumer.tags

    async def _declare_topology(self):
        """Declare the topology again (a copy found a queue missing)."""
        await self.consumer.redeclare(self.queues)

    def ack_batch(self):
        """Completed deliveries that are acked at once, without waiting for ACK_DELAY."""
        return max(1, self.concurrency * self.config["worker.prefetch_multiplier"] // 4)

    def _prefetch_base(self):
        return self.concurrency * self.config["worker.prefetch_multiplier"]

    @property
    def connected(self):
        return self.consumer.is_open and not self._reconnecting

    def in_hand(self):
        """Work in hand besides what just completed: jobs ready or running."""
        return self.ready or self.pool.busy()

    async def _connect_with_retry(self):
        cfg = self.config
        return await recovery.connect_with_retry(self, cfg["broker.retry_for"],
                                                 cfg["broker.retry_max_interval"])

    async def close_connections(self):
        await self.consumer.close()
        if self.publisher is not None:
            await self.publisher.close()

    def on_connection_lost(self, reason):
        """A connection dropped: keep the children running, reconnect, resume."""
        if self.stopping or self._reconnecting:
            return
        self._reconnecting = True
        self.counters["connection_lost"] += 1
        dropped = len(self.ready) + len(self.schedule)
        limit = max_message_size(reason)
        if limit:
            self.broker_max_size = limit
        pause = self.pacer.lost()
        log.error("lost the broker connection (%s); %d running task(s) go on, %d unstarted "
                  "go back to the broker; reconnecting%s", reason, len(self.pool.busy()),
                  dropped, f" in {pause:.1f}s (it died young)" if pause else "")
        self.ready.clear()
        self.schedule.drain()
        self.acker.reset()
        self.forsake_channel()
        self.loop.create_task(self._recover(pause))

    async def _recover(self, pause=0.0):
        await self.close_connections()
        if pause:       # a shutdown cuts the pause short
            try:
                await asyncio.wait_for(self.stop_requested.wait(), pause)
            except asyncio.TimeoutError:
                pass
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
        self.pacer.connected()
        log.info("reconnected; consuming %s again", ", ".join(self.queues))
        unsent, self.unsent = self.unsent, []
        for job, body, props, attempt in unsent:
            self.publish_result(job, body, props, attempt)
        self.notifier.ready(self.status_line())

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

    def on_pool_fault(self, job):
        """Handling ``job``'s outcome (or its child's death) raised. Unless its delivery is
        settled, it is redelivered with its count + 1 (dead-lettered after
        ``worker.max_deliveries``), so a bug that recurs on one message cannot loop; if even
        that raises, the delivery goes back to the broker a second later. It may run
        again; it is not lost."""
        if job.channel is not self.consumer.channel or self.acker.settled(job.tag):
            return
        try:
            self.redeliver(job, "ran it, but the supervisor failed to handle that (internal error)")
        except Exception:
            log.exception("task %s: could not redeliver it; returning it to the broker in 1s",
                          job.describe())
            self.loop.call_later(1.0, self._give_back_unsettled, job)

    def _give_back_unsettled(self, job):
        if job.channel is self.consumer.channel and not self.acker.settled(job.tag):
            self.give_back(job, delay=0)

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
        self.reloader.request()

    def handle_ttin(self):
        """TTIN: one more child."""
        self.concurrency += 1
        log.info("SIGTTIN: concurrency now %d", self.concurrency)
        self.manage_children()
        self._resize()

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
        self._resize()

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

    def _resize(self):
        self.acker.batch = self.ack_batch()
        self.consumer.resize(self._prefetch_base())

    # == reload ==========================================================================
    @property
    def last_reload(self):
        return self.reloader.last

    def apply_config(self, new):
        """A reload checked ``new``: make it the configuration, start its generation."""
        self.config = new
        self._apply_settings(new)
        self.config_loaded_at = time.time()
        pool = self.pool
        pool.imports = tuple(new["imports"])
        pool.memory_limit = new["worker.max_memory_per_child"]
        pool.generation += 1
        self.task_names = None
        self.acker.batch = self.ack_batch()
        self.manage_children()          # the new generation first ...
        for child in list(pool.children.values()):
            if child.generation < pool.generation:
                pool.retire(child)      # ... then the old one leaves as it goes idle
        log.info("SIGHUP: configuration reloaded from %s; generation %d, queues %s, %d "
                 "children", new.source, pool.generation, ", ".join(self.queues),
                 self.concurrency)

    async def rebind(self, ops, old_queues):
        """Consume the queues of a reloaded configuration (``ops`` declares them)."""
        consumer = self.consumer
        if not consumer.is_open:
            return      # reconnecting: the new connection declares and consumes the new set
        try:
            await consumer.declare(ops)
            consumers = consumer.consumers
            for queue in sorted(set(consumers.tags.values())):
                if queue not in self.queues:
                    await consumers.cancel(queue)
                    log.info("SIGHUP: stopped consuming %s", queue)
            for queue in self.queues:
                if queue not in old_queues:
                    consumers.consume(queue)
                    log.info("SIGHUP: now consuming %s", queue)
            consumer.resize(self._prefetch_base())
        except (ConfigError, ChannelLost) as exc:
            log.error("SIGHUP: could not apply the queues of the new configuration: %s", exc)

    # == stopping ==========================================================================
    async def _shutdown(self, cold):
        first = not self.stopping
        self.stopping = True
        self.stop_requested.set()
        self.notifier.stopping()
        if first:
            try:
                await self.consumer.cancel_all()
            except ChannelLost:
                pass
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
        elif self.pool.busy():
            cut = [c.job.describe() for c in self.pool.busy()]
            log.warning("cold shutdown: these tasks are cut and go back to the queue: %s",
                        ", ".join(cut))
            self.exit_code = self.exit_code or EX_TASKS_CUT
        self.cutting = cold
        await self._stop_children(cold)
        await self._settle(timeout=5.0)
        self.report_unsent()
        await self.close_connections()
        log.info("stopped (exit code %d)", self.exit_code)
        if not self.stopped.done():
            self.stopped.set_result(None)

    async def _settle(self, timeout):
        """Before closing: wait (bounded) for the confirms of copies just published for
        cut tasks, so that their originals are acked rather than delivered twice."""
        if self.publisher is not None and self.publisher.is_open:
            try:
                await asyncio.wait_for(self.publisher.all_confirmed(), timeout)
            except asyncio.TimeoutError:
                pass
        if self.acker.waiting:
            self.acker.flush()

    def _maybe_finish_stop(self):
        done = self._drain_done
        if done is None or done.done() or not self.stopping:
            return
        if not self.pool.busy() and not self.acker.waiting and \
                not (self.publisher and self.publisher.unconfirmed):
            done.set_result(None)

    async def _stop_children(self, cold):
        for child in list(self.pool.children.values()):
            if cold:
                self.pool.kill(child)
            else:
                self.pool.retire(child)
        self.pool.reap()        # those gone already; SIGCHLD reports the others
        try:
            await asyncio.wait_for(self.pool.emptied(), 10)
        except asyncio.TimeoutError:
            pass
        for child in list(self.pool.children.values()):
            self.pool.kill(child)

    # == status ==============================================================================
    def status_line(self):
        busy = len(self.pool.busy())
        total = len(self.pool.serving())
        line = (f"{busy}/{total} busy, {self.counters['succeeded']} ok, "
                f"{self.counters['failed']} failed, {len(self.schedule)} held")
        if self._reconnecting:
            line += ", broker: reconnecting"
        if self.last_reload and not self.last_reload["ok"]:
            line += f", last reload failed: {self.last_reload['errors'][0]}"
        return line

    def update_title(self):
        """``taskd: supervisor [queues] busy/total busy``, refreshed by the 1 s tick (not per
        task: setting the title on every task cost about 10% of the supervisor's time)."""
        busy = len(self.pool.busy())
        title = f"taskd: supervisor [{','.join(self.queues)}] {busy}/{self.concurrency} busy"
        if title != self._title:
            self._title = title
            setproctitle(title)



