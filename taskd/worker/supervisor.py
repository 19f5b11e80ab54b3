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

from .. import stores
from . import events, lifecycle, metrics
from .acker import Acker
from .beat import Beat
from .consumer import Consumer, prefetch_base, prefetch_deep
from . import control
from .canvas import Workflows
from .copies import Copies
from .dispatch import Dispatcher
from .recovery import Duplicates
from .framing import Outcome
from .intake import Intake
from .link import Link
from .mailbox import Mailbox
from .outcomes import Outcomes
from .pool import Pool
from .reload import Reloader
from .replies import Replies
from .spawner import Spawner
from .status import Status
from .stopping import EX_SOFTWARE, EX_UNAVAILABLE, Shutdown
from . import store as result_store
from .systemd import Notifier

log = logging.getLogger("taskd.supervisor")


class Supervisor:
    def __init__(self, config: Any, *, queues: Optional[tuple] = None,
                 concurrency: Optional[int] = None, config_path: Optional[str] = None,
                 hostname: Optional[str] = None) -> None:
        self.config, self.config_path = config, config_path
        # The node name (-n, worker.hostname), read once: a reload does not rename a node.
        self.hostname = events.node_name(hostname or config["worker.hostname"])
        stores.set_node_name(self.hostname)
        self.queue_override, self.concurrency_override = queues, concurrency
        self.queues = self.queues_for(config)
        self.concurrency = concurrency or config["worker.concurrency"]
        self.counters: collections.Counter = collections.Counter()
        self.started_at = self.config_loaded_at = time.time()
        self._signals: tuple = ()
        self._runner = asyncio.Runner()
        self.loop = loop = self._runner.get_loop()
        # The parts, each given what it works with (the few that need each other are
        # joined after they are built):
        self.pool = pool = Pool(loop, config["imports"],
                                memory_limit=config["worker.max_memory_per_child"],
                                on_ready=self.on_child_ready, on_outcome=self.on_outcome,
                                on_lost=self.on_child_lost,
                                async_concurrency=config["worker.async_concurrency"],
                                block_warning=config["worker.async_block_warning"])
        self.acker = acker = Acker(loop, self.in_hand, batch=self.ack_batch())
        self.consumer = consumer = Consumer(loop, None, None, config)
        self.replies = replies = Replies(loop, acker.complete, self.counters,
                                         re.compile(config["worker.reply_to_pattern"]),
                                         config["worker.max_result_size"])
        self.copies = copies = Copies(loop, consumer.redeclare)
        self.duplicates = Duplicates(self.counters)
        self.backend_url = config["result_backend"]     # fixed until a restart
        self.store = store = result_store.build(loop, config, acker.complete, self.counters)
        self.outcomes = outcomes = Outcomes(loop, acker, replies, copies, self.duplicates,
                                            self.counters, config, store)
        self.dispatcher = dispatcher = Dispatcher(loop, pool, outcomes, consumer.hold, config)
        self.intake = Intake(consumer, acker, dispatcher, outcomes, self.duplicates, pool,
                             self.counters, config)
        self.shutdown = shutdown = Shutdown(loop, pool, consumer, dispatcher, acker, replies,
                                            Notifier(), config, None)
        self.status = status = Status(loop, self, pool, dispatcher, self.counters,
                                      shutdown.notifier, shutdown)
        self.spawner = spawner = Spawner(loop, pool, self, shutdown,
                                         status.update_title)
        self.reloader = status.reloader = Reloader(loop, self, pool, consumer, shutdown, status,
                                                   spawner)
        self.link = status.link = Link(loop, self, consumer, acker, replies, copies, dispatcher,
                                       self.intake, pool, shutdown, status, self.counters)
        self.beat = Beat(loop, config, self.counters, shutdown)     # the schedule: periodic.md
        consumer.on_delivery, consumer.connect = self.intake.on_delivery, self.link.channel
        # Remote control and revokes (docs/remote-control.md), opened by the link.
        self.mailbox = self.link.mailbox = Mailbox(loop, self, pool, dispatcher, consumer,
                                                   self.counters, self.hostname,
                                                   lambda: self.link.connected)
        if self.mailbox.enabled:
            outcomes.revoked = self.mailbox.revokes.revoked
        pool.on_started, pool.on_fault = dispatcher.started, outcomes.fault

        def deepen(deep: bool) -> None:     # the adaptive window: QoS and ack batch follow
            consumer.deepen(prefetch_deep(self.concurrency, self.config) if deep else 0)
            acker.batch = max(1, (consumer.base + consumer.deep) // 4)
        dispatcher.deepen = deepen
        acker.on_flushed, shutdown.close = shutdown.check_drained, self.link.close
        self.workflows = outcomes.workflows = self.intake.workflows = Workflows(
            loop, config, copies, lambda: replies.publisher,
            store.backend if store is not None else None, self.counters)
        if store is not None:
            store.wake, dispatcher.gate = dispatcher.dispatch_soon, store.accepting
            shutdown.store = store
            store.start()
        # Served from the start, so that `taskd status` answers while the worker waits
        # for the broker ("connected": false).
        self.control = control.ControlServer(self, config["worker.control_socket"])
        # Observers of the lifecycle seam (None when off): events and metrics.
        self.events = events.for_config(config, self.hostname, loop, pool, self.counters)
        self.metrics = metrics.for_config(config, pool, dispatcher, self.link, shutdown,
                                          self.counters)
        self.lifecycle = observers = lifecycle.combine((self.events, self.metrics))
        for part in (self.intake, dispatcher, outcomes, pool, spawner, self.link, shutdown):
            part.lifecycle = observers

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
        if self.metrics is not None:
            await self.metrics.start()
        try:
            await self._start()
        finally:
            self.control.close()
            self.lifecycle.close()
            # Before the loop closes its wake-up pipe: a signal arriving in between
            # (a child's SIGCHLD) would hit a closed fd and print a traceback.
            for sig in self._signals:
                self.loop.remove_signal_handler(sig)

    async def _start(self) -> None:
        self.spawner.manage()
        if not await self.link.connect():
            if self.shutdown.stopping:  # a signal came while connecting: it ends the run
                await self.shutdown.stopped
                return
            self.shutdown.fail(EX_UNAVAILABLE)
            await self.shutdown.stop_children(cold=True)
            return
        log.info("consuming %s with %d children", ", ".join(self.queues), self.concurrency)
        self.status.announce_ready()
        self.status.tick()
        self.beat.start()
        await self.shutdown.stopped
        await self.beat.close()

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
        self.dispatcher.ran(job, outcome.runtime)    # the adaptive window learns
        self.outcomes.ran(job, outcome)
        self.spawner.recycle(child)
        self.spawner.manage()
        if child.slots > 1:     # outcomes come in bursts: refill once, one write per child
            self.dispatcher.dispatch_soon()
        else:
            self.dispatcher.dispatch()

    def on_child_lost(self, child: Any, job: Any, reason: str, unstarted: list = ()) -> None:
        if unstarted:       # sent in advance, never started: first in line again
            self.dispatcher.first(unstarted)
        if job is not None:
            self.outcomes.lost(job, reason, count=not self.shutdown.cutting)
        self.spawner.manage()
        self.dispatcher.dispatch()
        self.shutdown.check_drained()

    def in_hand(self) -> Any:
        """Work in hand besides what just completed: jobs ready or running."""
        return self.dispatcher.ready or self.pool.busy()

    def ack_batch(self) -> int:
        """Completed deliveries that are acked at once, without waiting for ACK_DELAY."""
        return max(1, prefetch_base(self.concurrency, self.config) // 4)

    def resize(self) -> None:
        """The pool's size changed (TTIN, TTOU, a reload): so do the prefetch and batch."""
        self.acker.batch = self.ack_batch()
        self.consumer.resize(prefetch_base(self.concurrency, self.config))
        self.dispatcher.deepen(self.dispatcher.deep)

    # == signals (SIGHUP: the reloader; SIGCHLD: the pool) ==================================
    def handle_term(self) -> None:
        """TERM: warm shutdown: stop consuming, finish running tasks, give the rest back."""
        if not self.shutdown.stopping:
            log.info("SIGTERM: warm shutdown (waiting up to %gs for running tasks)",
                     self.config["worker.shutdown_timeout"])
            self.shutdown.start(cold=False)

    def handle_int(self) -> None:
        """INT: as TERM; a second INT is a cold shutdown (QUIT)."""
        if self.shutdown.stopping:
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
        self.spawner.manage()
        self.resize()

    def handle_ttou(self) -> None:
        """TTOU: one child fewer (never below one)."""
        if self.concurrency <= 1:
            log.info("SIGTTOU: already at one child")
            return
        self.concurrency -= 1
        self.spawner.shrink()
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
        result_store.reconfigure(self.store, self.backend_url, new)
        self.outcomes.config = self.dispatcher.config = self.consumer.config = new
        self.pool.async_concurrency = new["worker.async_concurrency"]    # children forked
        self.pool.block_warning = new["worker.async_block_warning"]      # from now on
        self.shutdown.config = new
        self.intake.configure(new)
        self.beat.configure(new)
        self.acker.batch = self.ack_batch()
        self.dispatcher.tasks(None)
