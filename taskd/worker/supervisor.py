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

from ..exceptions import ConfigError
from . import recovery
from .acker import Acker
from .amqp import AsyncChannel, max_message_size
from .consumer import Consumer
from . import control
from .copies import Copies
from .dispatch import Dispatcher
from .duplicates import Duplicates
from .frames import Outcome
from .intake import Intake
from .outcomes import Outcomes
from .pool import Pool
from .reload import Reloader
from .replies import Replies
from .status import Status
from .stopping import EX_CONFIG, EX_SOFTWARE, EX_UNAVAILABLE, Shutdown
from .systemd import Notifier

log = logging.getLogger("taskd.supervisor")


class Supervisor:
    def __init__(self, config: Any, *, queues: Optional[tuple] = None,
                 concurrency: Optional[int] = None, config_path: Optional[str] = None) -> None:
        self.config, self.config_path = config, config_path
        self.queue_override, self.concurrency_override = queues, concurrency
        self.queues = self.queues_for(config)
        self.concurrency = concurrency or config["worker.concurrency"]
        self.reconnecting = True              # until the first connection is up
        self.counters: collections.Counter = collections.Counter()
        self.started_at = self.config_loaded_at = time.time()
        self._signals: tuple = ()
        self._spawn_timer: Optional[asyncio.TimerHandle] = None
        self._runner = asyncio.Runner()
        self.loop = loop = self._runner.get_loop()
        self.notifier = Notifier()
        self.pacer = recovery.ReconnectPacer()
        self.publisher: Optional[AsyncChannel] = None
        # The parts, each given what it works with:
        self.pool = Pool(loop, config["imports"], memory_limit=config["worker.max_memory_per_child"],
                         on_ready=self.on_child_ready, on_outcome=self.on_outcome,
                         on_lost=self.on_child_lost, on_fault=self.on_pool_fault)
        self.acker = Acker(loop, self.in_hand, batch=self.ack_batch())
        self.consumer = Consumer(loop, self._channel, None, config)
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
        self.shutdown = Shutdown(loop, self.pool, self.consumer, self.dispatcher, self.acker,
                                 self.replies, self.notifier, config, self.close_connections)
        self.acker.on_flushed = self.shutdown.check_drained
        self.reloader = Reloader(loop, self, self.pool, self.consumer, self.notifier)
        self.status = Status(loop, self, self.pool, self.dispatcher, self.counters,
                             self.notifier)
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
        return self.shutdown.exit_code

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
            if self.stopping:       # a signal came while connecting: the shutdown ends it
                await self.shutdown.stopped
                return
            self.shutdown.fail(EX_UNAVAILABLE)
            await self.shutdown.stop_children(cold=True)
            return
        self.reconnecting = False
        self.pacer.connected()
        log.info("consuming %s with %d children", ", ".join(self.queues), self.concurrency)
        self.status.announce_ready()
        self.status.tick()
        await self.shutdown.stopped

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
        self.status.announce_ready()
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
            self.outcomes.lost(job, reason, count=not self.shutdown.cutting)
        self.manage_children()
        self.dispatcher.dispatch()
        self.shutdown.check_drained()

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
        self.status.update_title()

    def _spawn_after_backoff(self) -> None:
        self._spawn_timer = None
        self.manage_children()

    def in_hand(self) -> Any:
        """Work in hand besides what just completed: jobs ready or running."""
        return self.dispatcher.ready or self.pool.busy()

    def ack_batch(self) -> int:
        """Completed deliveries that are acked at once, without waiting for ACK_DELAY."""
        return max(1, self.concurrency * self.config["worker.prefetch_multiplier"] // 4)

    def resize(self) -> None:
        """The pool's size changed (TTIN, TTOU, a reload): so do the prefetch and batch."""
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
            return await recovery.connect_with_retry(
                self.connect, self.close_connections, self.shutdown, self.notifier,
                cfg["broker.retry_for"], cfg["broker.retry_max_interval"])
        except ConfigError as exc:
            for error in exc.errors:
                log.error("%s", error)
            self.shutdown.exit_code = EX_CONFIG
            return False

    async def close_connections(self) -> None:
        await self.consumer.close()
        if self.publisher is not None:
            await self.publisher.close()

    @property
    def connected(self) -> bool:
        return self.consumer.is_open and not self.reconnecting

    @property
    def stopping(self) -> bool:
        return self.shutdown.stopping

    @property
    def last_reload(self) -> Optional[dict]:
        return self.reloader.last

    def status_line(self) -> str:
        return self.status.line()

    def on_connection_lost(self, reason: Any) -> None:
        """A connection dropped: keep the children running, reconnect, resume."""
        if self.stopping or self.reconnecting:
            return
        self.reconnecting = True
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
                await asyncio.wait_for(self.shutdown.requested.wait(), pause)
            except asyncio.TimeoutError:
                pass
        ok = await self._connect_with_retry()
        self.reconnecting = False
        if not ok:
            if not self.stopping:
                self.shutdown.fail(EX_UNAVAILABLE)
                await self.shutdown.run(cold=False)
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
            self.shutdown.start(cold=False)

    def handle_int(self) -> None:
        """INT: as TERM; a second INT is a cold shutdown (QUIT)."""
        if self.stopping:
            self.handle_quit()
        else:
            self.handle_term()

    def handle_quit(self) -> None:
        """QUIT: cold shutdown: kill the children now; unfinished tasks go back to the queue."""
        log.warning("SIGQUIT: cold shutdown")
        self.shutdown.start(cold=True)

    def handle_ttin(self) -> None:
        """TTIN: one more child."""
        self.concurrency += 1
        log.info("SIGTTIN: concurrency now %d", self.concurrency)
        self.manage_children()
        self.resize()

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
        self.resize()

    def handle_usr1(self) -> None:
        """USR1: log a dump of the state (children, running tasks, schedule, counters)."""
        log.info("%s", control.dump(self))

    # == reload (the Reloader calls this) ===================================================
    def configure(self, new: Any) -> None:
        """Make ``new`` (checked by a reload) the configuration of the worker and its parts."""
        self.config = new
        self.queues = self.queues_for(new)
        self.concurrency = self.concurrency_override or new["worker.concurrency"]
        self.config_loaded_at = time.time()
        self.replies.pattern = re.compile(new["worker.reply_to_pattern"])
        self.replies.max_result_size = new["worker.max_result_size"]
        self.outcomes.config = self.dispatcher.config = self.consumer.config = new
        self.shutdown.config = new
        self.intake.configure(new)
        self.acker.batch = self.ack_batch()
        self.dispatcher.tasks(None)
