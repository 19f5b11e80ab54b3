"""The supervisor: one process, one thread, one asyncio event loop.

It holds the worker's parts, wires them together once (in ``__init__``), and
decides what each event is for. Nothing else runs on its thread. The events
and the part each goes to, in the order a task meets them:

===================================  ===============================================
event                                handled by
===================================  ===============================================
a delivery from RabbitMQ             :class:`~taskd.worker.intake.Intake`: decode,
                                     validate, deduplicate, then hold it for its ETA or
                                     pass it to the :class:`~taskd.worker.dispatch.Dispatcher`
a child with room                    the dispatcher writes it jobs over its pipe
an outcome on a child's pipe         :meth:`Supervisor.on_outcome`:
                                     :class:`~taskd.worker.outcomes.Outcomes` publishes
                                     the reply (:class:`~taskd.worker.replies.Replies`),
                                     then the :class:`~taskd.worker.acker.Acker` acks;
                                     the child may be recycled
a confirm from the broker            the callback the publish registered (replies,
                                     :class:`~taskd.worker.copies.Copies`)
a child that dies                    :meth:`Supervisor.on_child_lost`: its task is
                                     redelivered (or dead-lettered after
                                     ``max_deliveries``), a replacement forked
a lost connection                    :meth:`Supervisor.on_connection_lost`: reconnect
                                     (:mod:`~taskd.worker.recovery`), resume
a signal                             ``handle_<signal>`` (the table in
                                     :meth:`Supervisor._install_signals`)
===================================  ===============================================

asyncio's signal handlers only write the signal number to a wake-up fd; the
work happens here, in the loop. Acknowledgements are sent only after the task
has finished and its result (or its dead-letter copy, or its redelivered copy)
has been confirmed by the broker.

A new capability plugs in as a part built here and handed to those that need
it (see ``docs/architecture.md``), not as methods of this class.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import re
import signal
import time
from typing import Any, Optional

from setproctitle import setproctitle

from ..exceptions import ConfigError
from . import recovery
from .acker import Acker
from .amqp import AsyncChannel, ChannelLost, max_message_size
from .consumer import Consumer
from . import control
from .copies import Copies
from .dispatch import Dispatcher
from .duplicates import Duplicates
from .frames import Outcome
from .intake import Intake
from .outcomes import Outcomes
from .pool import BUSY, IDLE, Pool
from .reload import Reloader
from .replies import Replies
from .systemd import Notifier

log = logging.getLogger("taskd.supervisor")

EX_OK, EX_TASKS_CUT, EX_USAGE, EX_UNAVAILABLE, EX_SOFTWARE, EX_CONFIG = 0, 1, 64, 69, 70, 78


class Supervisor:
    def __init__(self, config: Any, *, queues: Optional[tuple] = None,
                 concurrency: Optional[int] = None, config_path: Optional[str] = None) -> None:
        self.config, self.config_path = config, config_path
        self.queue_override, self.concurrency_override = queues, concurrency
        self.queues = self.queues_for(config)
        self.concurrency = concurrency or config["worker.concurrency"]
        self.exit_code = EX_OK
        self.stopping = False
        self.cutting = False                  # a shutdown is killing the children
        self._reconnecting = True             # until the first connection is up
        self._announced = False
        self.counters: collections.Counter = collections.Counter()
        self.started_at = self.config_loaded_at = time.time()
        self._title: Optional[str] = None
        self._ticks = 0
        self._signals: tuple = ()
        self._spawn_timer: Optional[asyncio.TimerHandle] = None
        self._drain_done: Optional[asyncio.Future] = None
        self._runner = asyncio.Runner()
        self.loop = loop = self._runner.get_loop()
        self.stopped = loop.create_future()
        self.stop_requested = asyncio.Event()     # set when a shutdown starts
        self.notifier = Notifier()
        self.pacer = recovery.ReconnectPacer()
        self.publisher: Optional[AsyncChannel] = None
        # The parts, each given what it works with:
        self.pool = Pool(loop, config["imports"], memory_limit=config["worker.max_memory_per_child"],
                         on_ready=self.on_child_ready, on_outcome=self.on_outcome,
                         on_lost=self.on_child_lost, on_fault=self.on_pool_fault)
        self.acker = Acker(loop, self.in_hand, self._maybe_finish_stop, self.ack_batch())
        self.consumer = Consumer(loop, self._channel, None, lambda: self.config)
        self.replies = Replies(loop, self.acker.complete, self.counters,
                               re.compile(config["worker.reply_to_pattern"]),
                               config["worker.max_result_size"])
        self.copies = Copies(loop, self._declare_topology)
        self.duplicates = Duplicates(self.counters)
        self.outcomes = Outcomes(loop, self.acker, self.replies, self.copies, self.duplicates,
                                 self.counters, config)
        self.dispatcher = Dispatcher(loop, self.pool, self.outcomes, self.consumer.hold, config)
        self.intake = Intake(self.consumer, self.acker, self.dispatcher, self.outcomes,
                             self.duplicates, self.pool, self.counters, config)
        self.consumer.on_delivery = self.intake.on_delivery
        self.pool.on_started = self.dispatcher.started
        self.reloader = Reloader(loop, self, self.pool, self.notifier)
        # Served from the start, so that `taskd status` answers while the worker waits
        # for the broker ("connected": false).
        self.control = control.ControlServer(self, config["worker.control_socket"])

    def queues_for(self, config: Any) -> tuple:
        """The queues this worker consumes under ``config`` (``-Q`` wins)."""
        return tuple(self.queue_override or config.worker_queues() or (config["default_queue"],))

    # == the loop ==================================================================
    def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        try:
            with self._runner:
                self._runner.run(self._main())
        except Exception:
            log.exception("internal error in the supervisor")
            return EX_SOFTWARE
        return self.exit_code

    async def _main(self) -> None:
        self._install_signals()
        await self.control.start()
        try:
            await self._start()
        finally:
            self.control.close()
            # Before the loop closes its wake-up pipe: a signal arriving in between
            # (a child's SIGCHLD) would hit a closed fd and print a traceback.
            for sig in self._signals:
                self.loop.remove_signal_handler(sig)

    async def _start(self) -> None:
        self.manage_children()
        if not await self._connect_with_retry():
            if self.stopping:       # a signal came while connecting: _shutdown ends it
                await self.stopped
                return
            self.exit_code = self.exit_code or EX_UNAVAILABLE
            await self._stop_children(cold=True)
            return
        self._reconnecting = False
        self.pacer.connected()
        log.info("consuming %s with %d children", ", ".join(self.queues), self.concurrency)
        self.announce_ready()
        self._tick()
        await self.stopped

    def _install_signals(self) -> None:
        handlers = {
            signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_int,
            signal.SIGQUIT: self.handle_quit, signal.SIGHUP: self.reloader.request,
            signal.SIGTTIN: self.handle_ttin, signal.SIGTTOU: self.handle_ttou,
            signal.SIGUSR1: self.handle_usr1, signal.SIGCHLD: self.pool.reap,
        }
        for sig, handler in handlers.items():
            self.loop.add_signal_handler(sig, handler)
        self._signals = tuple(handlers)

    # == events from the children ===================================================
    def on_child_ready(self, child: Any, task_limits: dict) -> None:
        self.dispatcher.tasks(task_limits)
        self.announce_ready()
        self.dispatcher.dispatch()

    def on_outcome(self, child: Any, job: Any, outcome: Outcome) -> None:
        self.outcomes.ran(job, outcome)
        self._check_recycle(child)
        self.manage_children()
        self.dispatcher.dispatch()

    def on_child_lost(self, child: Any, job: Any, reason: str, unstarted: list = ()) -> None:
        if unstarted:       # sent in advance, never started: first in line again
            self.dispatcher.first(unstarted)
        if job is not None:
            self.outcomes.lost(job, reason, count=not self.cutting)
        self.manage_children()
        self.dispatcher.dispatch()
        self._maybe_finish_stop()

    def on_pool_fault(self, job: Any) -> None:
        """Handling ``job``'s outcome (or its child's death) raised. Unless its delivery is
        settled, it is redelivered with its count + 1 (dead-lettered after
        ``worker.max_deliveries``), so a bug that recurs on one message cannot loop; if even
        that raises, the delivery goes back to the broker a second later. It may run
        again; it is not lost."""
        if job.channel is not self.consumer.channel or self.acker.settled(job.tag):
            return
        try:
            self.outcomes.redeliver(job, "ran it, but the supervisor failed to handle that "
                                         "(internal error)")
        except Exception:
            log.exception("task %s: could not redeliver it; returning it to the broker in 1s",
                          job.describe())
            self.loop.call_later(1.0, self._give_back_unsettled, job)

    def _give_back_unsettled(self, job: Any) -> None:
        if job.channel is self.consumer.channel and not self.acker.settled(job.tag):
            self.outcomes.give_back(job, delay=0)

    def _check_recycle(self, child: Any) -> None:
        cfg = self.config
        max_tasks, max_memory = cfg["worker.max_tasks_per_child"], cfg["worker.max_memory_per_child"]
        if max_tasks and child.tasks_done >= max_tasks:
            log.info("child %d ran %d tasks: replacing it", child.index, child.tasks_done)
            self.pool.retire(child)
        elif max_memory and child.rss > max_memory:
            log.info("child %d uses %d MiB (limit %d MiB): replacing it",
                     child.index, child.rss >> 20, max_memory >> 20)
            self.pool.retire(child)

    def manage_children(self) -> None:
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

    def _spawn_after_backoff(self) -> None:
        self._spawn_timer = None
        self.manage_children()

    def in_hand(self) -> Any:
        """Work in hand besides what just completed: jobs ready or running."""
        return self.dispatcher.ready or self.pool.busy()

    def ack_batch(self) -> int:
        """Completed deliveries that are acked at once, without waiting for ACK_DELAY."""
        return max(1, self.concurrency * self.config["worker.prefetch_multiplier"] // 4)

    def _resize(self) -> None:
        self.acker.batch = self.ack_batch()
        self.consumer.resize(self.concurrency * self.config["worker.prefetch_multiplier"])

    # == the broker ======================================================================
    def _channel(self, name: str) -> AsyncChannel:
        cfg = self.config
        return AsyncChannel(self.loop, cfg.broker_url, connect_timeout=cfg["broker.connect_timeout"],
                            heartbeat=cfg["broker.heartbeat"], name=name,
                            on_lost=self.on_connection_lost, on_return=self.copies.on_return,
                            tls=cfg["broker.tls"])

    async def connect(self) -> None:
        """Open both connections, declare the topology, set QoS and start consuming."""
        self.publisher = self.replies.publisher = self._channel("taskd-worker-publish")
        await self.publisher.open()
        await self.publisher.enable_confirms()
        base = self.concurrency * self.config["worker.prefetch_multiplier"]
        self.acker.attach(await self.consumer.open(self.queues, base))

    async def _declare_topology(self) -> None:
        """Declare the topology again (a copy found a queue missing)."""
        await self.consumer.redeclare(self.queues)

    async def _connect_with_retry(self) -> bool:
        cfg = self.config
        try:
            return await recovery.connect_with_retry(self, cfg["broker.retry_for"],
                                                     cfg["broker.retry_max_interval"])
        except ConfigError as exc:
            for error in exc.errors:
                log.error("%s", error)
            self.exit_code = EX_CONFIG
            return False

    async def close_connections(self) -> None:
        await self.consumer.close()
        if self.publisher is not None:
            await self.publisher.close()

    @property
    def connected(self) -> bool:
        return self.consumer.is_open and not self._reconnecting

    def on_connection_lost(self, reason: Any) -> None:
        """A connection dropped: keep the children running, reconnect, resume."""
        if self.stopping or self._reconnecting:
            return
        self._reconnecting = True
        self.counters["connection_lost"] += 1
        limit = max_message_size(reason)
        if limit:
            self.replies.broker_max_size = limit
        pause = self.pacer.lost()
        dropped = self.dispatcher.drop()
        log.error("lost the broker connection (%s); %d running task(s) go on, %d unstarted "
                  "go back to the broker; reconnecting%s", reason, len(self.pool.busy()),
                  dropped, f" in {pause:.1f}s (it died young)" if pause else "")
        self.acker.reset()
        self.intake.forsake_channel()
        self.loop.create_task(self._recover(pause))

    async def _recover(self, pause: float = 0.0) -> None:
        await self.close_connections()
        if pause:       # a shutdown cuts the pause short
            try:
                await asyncio.wait_for(self.stop_requested.wait(), pause)
            except asyncio.TimeoutError:
                pass
        ok = await self._connect_with_retry()
        self._reconnecting = False
        if not ok:
            if not self.stopping:
                self.exit_code = self.exit_code or EX_UNAVAILABLE
                await self._shutdown(cold=False)
            return
        self.pacer.connected()
        log.info("reconnected; consuming %s again", ", ".join(self.queues))
        self.replies.resend()
        self.notifier.ready(self.status_line())

    # == signals (SIGHUP: the reloader; SIGCHLD: the pool) ==================================
    def handle_term(self) -> None:
        """TERM: warm shutdown: stop consuming, finish running tasks, give the rest back."""
        if not self.stopping:
            log.info("SIGTERM: warm shutdown (waiting up to %gs for running tasks)",
                     self.config["worker.shutdown_timeout"])
            self.loop.create_task(self._shutdown(cold=False))

    def handle_int(self) -> None:
        """INT: as TERM; a second INT is a cold shutdown (QUIT)."""
        if self.stopping:
            self.handle_quit()
        else:
            self.handle_term()

    def handle_quit(self) -> None:
        """QUIT: cold shutdown: kill the children now; unfinished tasks go back to the queue."""
        log.warning("SIGQUIT: cold shutdown")
        self.loop.create_task(self._shutdown(cold=True))

    def handle_ttin(self) -> None:
        """TTIN: one more child."""
        self.concurrency += 1
        log.info("SIGTTIN: concurrency now %d", self.concurrency)
        self.manage_children()
        self._resize()

    def handle_ttou(self) -> None:
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

    def handle_usr1(self) -> None:
        """USR1: log a dump of the state (children, running tasks, schedule, counters)."""
        log.info("%s", control.dump(self))

    # == stopping ==========================================================================
    async def _shutdown(self, cold: bool) -> None:
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
        returned = self.dispatcher.drop()
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
        self.replies.report_unsent()
        await self.close_connections()
        log.info("stopped (exit code %d)", self.exit_code)
        if not self.stopped.done():
            self.stopped.set_result(None)

    async def _settle(self, timeout: float) -> None:
        """Before closing: wait (bounded) for the confirms of copies just published for
        cut tasks, so that their originals are acked rather than delivered twice."""
        if self.publisher is not None and self.publisher.is_open:
            try:
                await asyncio.wait_for(self.publisher.all_confirmed(), timeout)
            except asyncio.TimeoutError:
                pass
        if self.acker.waiting:
            self.acker.flush()

    def _maybe_finish_stop(self) -> None:
        """A warm shutdown is drained once no task runs and no ack or confirm waits."""
        done = self._drain_done
        if done is None or done.done():
            return
        if not self.pool.busy() and not self.acker.waiting and \
                not (self.publisher and self.publisher.unconfirmed):
            done.set_result(None)

    async def _stop_children(self, cold: bool) -> None:
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

    # == reload (the Reloader calls these) ====================================================
    @property
    def last_reload(self) -> Optional[dict]:
        return self.reloader.last

    def apply_config(self, new: Any) -> None:
        """A reload checked ``new``: make it the configuration, start its generation."""
        self.config = new
        self.queues = self.queues_for(new)
        self.concurrency = self.concurrency_override or new["worker.concurrency"]
        self.config_loaded_at = time.time()
        self.replies.pattern = re.compile(new["worker.reply_to_pattern"])
        self.replies.max_result_size = new["worker.max_result_size"]
        self.outcomes.config = self.dispatcher.config = new
        self.intake.configure(new)
        self.acker.batch = self.ack_batch()
        pool = self.pool
        pool.imports = tuple(new["imports"])
        pool.memory_limit = new["worker.max_memory_per_child"]
        pool.generation += 1
        self.dispatcher.tasks(None)
        self.manage_children()          # the new generation first ...
        for child in list(pool.children.values()):
            if child.generation < pool.generation:
                pool.retire(child)      # ... then the old one leaves as it goes idle
        log.info("SIGHUP: configuration reloaded from %s; generation %d, queues %s, %d "
                 "children", new.source, pool.generation, ", ".join(self.queues),
                 self.concurrency)

    async def rebind(self, ops: list, old_queues: tuple) -> None:
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
            self._resize()
        except (ConfigError, ChannelLost) as exc:
            log.error("SIGHUP: could not apply the queues of the new configuration: %s", exc)

    # == status ==============================================================================
    def announce_ready(self) -> None:
        """READY=1 to systemd, once: connected, and a child has imported the task modules
        (a deployment whose modules do not import never reports ready)."""
        if self._announced or self._reconnecting or self.stopping:
            return
        if not any(c.state in (IDLE, BUSY) for c in self.pool.serving()):
            return
        self._announced = True
        log.info("ready")
        self.notifier.ready(self.status_line())

    def _tick(self) -> None:
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

    def status_line(self) -> str:
        line = (f"{len(self.pool.busy())}/{len(self.pool.serving())} busy, "
                f"{self.counters['succeeded']} ok, {self.counters['failed']} failed, "
                f"{len(self.dispatcher.schedule)} held")
        if self._reconnecting:
            line += ", broker: reconnecting"
        if self.last_reload and not self.last_reload["ok"]:
            line += f", last reload failed: {self.last_reload['errors'][0]}"
        return line

    def update_title(self) -> None:
        """``taskd: supervisor [queues] busy/total busy``, refreshed by the 1 s tick (not per
        task: setting the title on every task cost about 10% of the supervisor's time)."""
        title = (f"taskd: supervisor [{','.join(self.queues)}] "
                 f"{len(self.pool.busy())}/{self.concurrency} busy")
        if title != self._title:
            self._title = title
            setproctitle(title)
