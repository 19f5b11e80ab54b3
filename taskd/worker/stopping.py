"""Stopping the worker: a warm shutdown finishes the running tasks, a cold one cuts them.

Either way consuming stops first, and the unstarted and held jobs stay
unacked: the broker requeues them when the channel closes. A warm shutdown
waits (up to ``worker.shutdown_timeout``) until it is *drained*: no task
running, no ack waiting for the coalescing timer, no confirm awaited; then the
children leave. If the time runs out it turns cold: the children are killed
and their tasks published again without counting a delivery. Before closing,
the confirms of copies just published for cut tasks are awaited (bounded), so
that their originals are acked rather than delivered twice.

Exit codes: 0, or 1 when tasks were cut; 69 when the broker stayed away; 78
for a configuration the broker refuses; 70 for an internal error.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Optional

from . import lifecycle
from .amqp import ChannelLost

log = logging.getLogger("taskd.supervisor")

EX_OK, EX_TASKS_CUT, EX_USAGE, EX_UNAVAILABLE, EX_SOFTWARE, EX_CONFIG = 0, 1, 64, 69, 70, 78


class Shutdown:
    """``close()``: a coroutine closing the broker connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Any, consumer: Any,
                 dispatcher: Any, acker: Any, replies: Any, notifier: Any, config: Any,
                 close: Optional[Callable[[], Awaitable[None]]]) -> None:
        self.loop, self.pool, self.consumer, self.dispatcher = loop, pool, consumer, dispatcher
        self.acker, self.replies, self.notifier, self.config = acker, replies, notifier, config
        self.close = close
        self.store: Any = None                  # the ResultStore, with a result store
        self.stopping = False
        self.cutting = False                    # the children are being killed
        self.exit_code = EX_OK
        self.requested = asyncio.Event()        # set when a shutdown starts
        self.stopped = loop.create_future()     # resolved once it is over
        self._drained: Optional[asyncio.Future] = None
        self.lifecycle: lifecycle.Observer = lifecycle.NOBODY

    def fail(self, code: int) -> None:
        """Exit with ``code``, unless an earlier failure named one."""
        self.exit_code = self.exit_code or code

    def start(self, cold: bool) -> None:
        self.loop.create_task(self.run(cold))

    async def run(self, cold: bool) -> None:
        first = not self.stopping
        self.stopping = True
        self.requested.set()
        self.notifier.stopping()
        if first:
            try:
                await self.consumer.cancel_all()
            except ChannelLost:
                pass
        returned = self.dispatcher.drop()
        if returned:
            log.info("giving %d unstarted task(s) back to the broker", returned)
        if not cold:
            self._drained = self.loop.create_future()
            self.check_drained()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained),
                                       self.config["worker.shutdown_timeout"])
            except asyncio.TimeoutError:
                log.error("shutdown_timeout reached: killing children; these tasks go back to "
                          "the queue: %s", ", ".join(self._running()))
                self.fail(EX_TASKS_CUT)
                cold = True
        elif self.pool.busy():
            log.warning("cold shutdown: these tasks are cut and go back to the queue: %s",
                        ", ".join(self._running()))
            self.fail(EX_TASKS_CUT)
        self.cutting = cold
        await self.stop_children(cold)
        await self._settle(timeout=5.0)
        self.replies.report_unsent()
        self.lifecycle.stopping()
        if self.store is not None:
            self.store.report_unwritten()
            self.store.stop()
        await self.close()
        log.info("stopped (exit code %d)", self.exit_code)
        if not self.stopped.done():
            self.stopped.set_result(None)

    def _running(self) -> list:
        return [job.describe() for c in self.pool.busy() for job in c.running]

    def check_drained(self) -> None:
        """A warm shutdown is drained once no task runs and no ack, confirm or result
        store write waits."""
        done = self._drained
        if done is None or done.done():
            return
        publisher = self.replies.publisher
        if not self.pool.busy() and not self.acker.waiting and \
                not (publisher and publisher.unconfirmed) and \
                not (self.store is not None and self.store.waiting):
            done.set_result(None)

    async def _settle(self, timeout: float) -> None:
        publisher = self.replies.publisher
        if publisher is not None and publisher.is_open:
            try:
                await asyncio.wait_for(publisher.all_confirmed(), timeout)
            except asyncio.TimeoutError:
                pass
        if self.acker.waiting:
            self.acker.flush()

    async def stop_children(self, cold: bool) -> None:
        """Kill (``cold``) or retire every child; wait (10 s at most) until all are reaped."""
        pool = self.pool
        for child in list(pool.children.values()):
            if cold:
                pool.kill(child)
            else:
                pool.retire(child)
        pool.reap()             # those gone already; SIGCHLD reports the others
        try:
            await asyncio.wait_for(pool.emptied(), 10)
        except asyncio.TimeoutError:
            pass
        for child in list(pool.children.values()):
            pool.kill(child)
