"""``async def`` tasks in a child: one asyncio event loop per child, made once.

A task whose ``run`` is a coroutine function runs on the child's event loop,
created on first use and kept for the child's life (connection pools and
clients bound to a loop stay valid from one task to the next). Two ways to
serve:

* ``worker.async_concurrency`` 1 (the default): the child serves jobs one at a
  time as it always has (:func:`taskd.worker.child._serve`); an ``async def``
  task is run to completion on the loop (:func:`run_alone`).
* ``worker.async_concurrency`` N > 1: :func:`serve` runs the loop for good and
  keeps up to N jobs going at once, each coroutine an asyncio task; the
  supervisor counts N running jobs per child. Jobs start in the order they
  came down the pipe (the supervisor's view of which are running matches), an
  outcome goes up as soon as its coroutine ends. A plain (``def``) task met in
  this mode runs on the loop's thread and blocks the coroutines while it runs.

The rules of plain tasks hold: the outcome (result, failure, retry) is
encoded here and acked by the supervisor after it is published.

Time limits. The soft limit is a timer on the loop: it cancels the
coroutine, and :class:`Guarded` turns that cancellation into
:class:`~taskd.exceptions.SoftTimeLimitExceeded` raised at the ``await``
where the coroutine was waiting (catch it to clean up, as with plain tasks).
A coroutine that never awaits cannot be interrupted that way; the hard limit
(the supervisor kills the child) ends it, and the other coroutines of that
child, which are redelivered.

A coroutine that keeps the loop for longer than ``worker.async_block_warning``
seconds in one step (between two awaits) is logged with its task's name and
id: :class:`Guarded` times each step, so it costs two clock reads per step
and no thread.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import time
from typing import Any, Generator, Optional

from setproctitle import setproctitle

from .. import current
from ..exceptions import SoftTimeLimitExceeded
from . import child as child_mod
from . import framing

log = logging.getLogger("taskd.child")

_loop: Optional[asyncio.AbstractEventLoop] = None
_block_warning = 1.0


def is_async(task: Any) -> bool:
    """Whether ``task`` runs as a coroutine (its ``run`` is an ``async def``)."""
    run = getattr(task, "run", None)
    return inspect.iscoroutinefunction(run) or inspect.iscoroutinefunction(
        getattr(run, "__func__", None))


def configure(block_warning: float) -> None:
    global _block_warning
    _block_warning = block_warning


def loop() -> asyncio.AbstractEventLoop:
    """This child's event loop, made on first use."""
    global _loop
    if _loop is None:
        # Forked from inside the supervisor's loop: Python before 3.12 still records
        # that loop as running in this thread, and would refuse to run ours.
        asyncio._set_running_loop(None)
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop


class Guarded:
    """Await a task's coroutine, step by step: time each step (a step that holds the
    loop past the block warning is logged) and turn the soft limit's cancellation
    into SoftTimeLimitExceeded inside the coroutine."""

    __slots__ = ("coro", "label", "soft", "expired", "_timer")

    def __init__(self, coro: Any, label: str, soft: Optional[float]) -> None:
        self.coro, self.label, self.soft = coro, label, soft
        self.expired = False
        self._timer: Optional[asyncio.TimerHandle] = None

    def _expire(self, task: asyncio.Task) -> None:
        self.expired = True
        task.cancel("soft time limit")

    def __await__(self) -> Generator[Any, Any, Any]:
        if self.soft:
            self._timer = asyncio.get_running_loop().call_later(
                self.soft, self._expire, asyncio.current_task())
        send, throw = self.coro.send, self.coro.throw
        value: Any = None
        error: Optional[BaseException] = None
        warn = _block_warning
        try:
            while True:
                began = time.monotonic()
                try:
                    yielded = send(value) if error is None else throw(error)
                except StopIteration as stop:
                    return stop.value
                finally:
                    held = time.monotonic() - began
                    if warn and held > warn:
                        log.warning("task %s blocked the event loop for %.2fs without "
                                    "awaiting (worker.async_block_warning: %gs); other "
                                    "coroutines of this child waited", self.label, held, warn)
                value, error = None, None
                try:
                    value = yield yielded
                except asyncio.CancelledError as exc:
                    if self.expired and self._timer is not None:
                        self._timer = None
                        asyncio.current_task().uncancel()
                        error = SoftTimeLimitExceeded(
                            f"soft time limit ({self.soft:g}s) exceeded")
                    else:
                        error = exc
                except BaseException as exc:        # thrown in by the loop: pass it on
                    error = exc
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self.coro.close()


async def run_job(task: Any, task_id: str, name: str, args: Any, kwargs: Any,
                  meta: dict) -> tuple:
    """The coroutine twin of :func:`taskd.worker.child.run_job`: same outcome tuple."""
    token = None
    try:
        try:
            request = child_mod.begin(task, task_id, name, args, kwargs, meta)
            token = current.async_request.set(request)
            value = await Guarded(task.run(*args, **kwargs), f"{name}[{task_id}]",
                                  meta.get("soft_time_limit"))
        except Exception as exc:
            return child_mod.finish(task, task_id, name, args, kwargs, meta,
                                    exc=child_mod.autoretried(task, exc))
        return child_mod.finish(task, task_id, name, args, kwargs, meta, value=value)
    finally:
        if token is not None:
            current.async_request.reset(token)


def run_alone(task: Any, task_id: str, name: str, args: Any, kwargs: Any, meta: dict) -> tuple:
    """Run one ``async def`` task to completion on this child's loop."""
    return loop().run_until_complete(run_job(task, task_id, name, args, kwargs, meta))


def serve(index: int, read_fd: int, write_fd: int, memory_limit: int, slots: int) -> None:
    """Serve jobs from the pipe, up to ``slots`` at once, until it closes and the last
    job is done."""
    ev = loop()
    server = Server(ev, index, read_fd, write_fd, memory_limit, slots)
    server.start()
    ev.run_forever()
    if server.error is not None:
        raise server.error


class Server:
    """The jobs of a child with ``worker.async_concurrency`` > 1: waiting, running."""

    def __init__(self, ev: asyncio.AbstractEventLoop, index: int, read_fd: int, write_fd: int,
                 memory_limit: int, slots: int) -> None:
        self.ev, self.index, self.read_fd, self.write_fd = ev, index, read_fd, write_fd
        self.memory_limit, self.slots = memory_limit, slots
        self.process = child_mod.memory_probe(memory_limit)
        self.reader = framing.FrameReader()
        self.waiting: collections.deque = collections.deque()
        self.running: set = set()           # asyncio tasks of the coroutines under way
        self.busy = 0                       # jobs started and not reported
        self.closed = False                 # the supervisor closed the job pipe
        self.error: Optional[BaseException] = None    # what ends the child (a bug)
        self.outbox: list = []              # outcome frames not yet written

    def start(self) -> None:
        self.ev.add_reader(self.read_fd, self._on_readable)

    def _fatal(self, exc: BaseException) -> None:
        """Stop serving: ``serve`` raises ``exc`` and the child exits non-zero, as a plain
        child does when its pipes break."""
        if self.error is None:
            self.error = exc
        self.ev.stop()

    def _on_readable(self) -> None:
        try:
            self._read()
        except BaseException as exc:
            self._fatal(exc)

    def _read(self) -> None:
        try:
            data = os.read(self.read_fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.ev.remove_reader(self.read_fd)
            self.closed = True
        else:
            self.waiting.extend(framing.job(f) for f in self.reader.feed(data))
            if self.reader.error is not None:
                raise ValueError(f"broken job stream: {self.reader.error}")
        self._start_jobs()

    def _start_jobs(self) -> None:
        while self.waiting and self.busy < self.slots:
            job = self.waiting.popleft()
            self.busy += 1
            task = child_mod.task_mod.registry.get(job.name)
            started = time.monotonic()
            if task is not None and is_async(task):
                coro = self._run(task, job, started)
                handle = self.ev.create_task(coro)
                self.running.add(handle)
                handle.add_done_callback(self.running.discard)
            else:                           # a plain task: on this thread, blocking
                outcome = child_mod.run_job(job.task_id, job.name, job.args, job.kwargs,
                                            job.meta)
                self._done(job, outcome, started)
        self._title()
        if self.closed and not self.busy:
            self.ev.call_soon(self.ev.stop)     # after the last outcomes are written

    async def _run(self, task: Any, job: framing.Job, started: float) -> None:
        try:
            outcome = await run_job(task, job.task_id, job.name, job.args, job.kwargs,
                                    job.meta)
            self._done(job, outcome, started)
            self._start_jobs()
        except BaseException as exc:
            self._fatal(exc)

    def _done(self, job: framing.Job, outcome: tuple, started: float) -> None:
        """Report ``job``'s outcome; the outcomes of coroutines that end in the same turn
        of the loop go up in one write."""
        self.busy -= 1
        self.outbox.append(child_mod.outcome_frame(job, outcome, started, self.process,
                                                   self.memory_limit))
        if len(self.outbox) == 1:
            self.ev.call_soon(self._flush)

    def _flush(self) -> None:
        try:
            data, self.outbox = b"".join(self.outbox), []
            framing.write_all(self.write_fd, data)
        except BaseException as exc:
            self._fatal(exc)

    def _title(self) -> None:
        setproctitle(f"taskd: child {self.index} {self.busy} running" if self.busy
                     else f"taskd: child {self.index} idle")
