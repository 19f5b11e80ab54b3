"""The prefork pool: spawn children, dispatch jobs over pipes, reap, retire.

Each child has two pipes: jobs go down one, outcomes come up the other.
The supervisor's event loop watches every child's outcome pipe; end of file
on it, or SIGCHLD, tells the pool a child has gone. A child that dies while
starting (a task module that does not import) is replaced after a growing
delay (1 s, 2 s, 4 s ... 60 s), so a broken deployment does not fork-bomb.

The supervisor never blocks on a pipe: both of its ends are non-blocking.
Job frames go out through a per-child :class:`~taskd.worker.framing.FrameWriter`:
a write the pipe takes goes out at once; what it cannot take (a large frame
sent in advance to a busy child) waits in the writer and is drained when the
loop reports the pipe writable. A child writing a large outcome and the
supervisor writing it a large job therefore cannot wait on each other.

Each frame from a child is handled on its own: an exception in a supervisor
callback is logged and the job it concerned is handed to ``on_fault`` (the
supervisor gives the delivery back to the broker), and the frames after it,
and the reaping of a dead child, go on. A child whose outcome stream breaks
(a frame over ``max_frame``, bytes that do not unpickle) is killed, and its job
is reported lost with that reason.

A reload starts the next generation with :meth:`Pool.trial`: one child that
imports the new task modules while the current generation keeps serving. It
gets no work and counts for nothing until the reload, told that it is ready,
makes its generation the current one; if it cannot import them, the reload
is abandoned and nothing else changes.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from typing import Any, Callable, Iterable, Optional

from . import child as child_mod
from .childstate import (BUSY, DEAD, IDLE, RETIRING, STARTING, Child,  # noqa: F401
                         describe_exit, exit_cause, free_index)
from . import framing, lifecycle
from .framing import ImportFailed, Outcome, Ready

log = logging.getLogger(__name__)

BACKOFF_MAX = 60.0


class Pool:
    """Children and their pipes. Callbacks go to the supervisor:

    ``on_ready(child, task_limits)``, ``on_outcome(child, job, outcome)`` (a
    :class:`~taskd.worker.framing.Outcome`),
    ``on_started(child, job)`` (a job sent in advance starts),
    ``on_lost(child, job, reason, unstarted)`` (a child died; ``job`` is what it was
    running, ``unstarted`` the jobs it had been sent in advance),
    ``on_fault(job)`` (one of the callbacks above raised while handling ``job``).

    ``memory_limit`` (bytes, 0 for none) is passed to children, which report their
    USS rather than their RSS once the RSS exceeds it; ``max_frame`` bounds an
    outcome frame.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, imports: Iterable[str], *,
                 memory_limit: int, on_ready: Callable, on_outcome: Callable, on_lost: Callable,
                 on_started: Optional[Callable] = None, on_fault: Optional[Callable] = None,
                 max_frame: int = framing.MAX_FRAME, async_concurrency: int = 1,
                 block_warning: float = 1.0) -> None:
        self.loop = loop
        self.imports = tuple(imports)
        self.memory_limit = memory_limit
        self.max_frame = max_frame
        self.async_concurrency = async_concurrency      # jobs at once per child (forked later)
        self.block_warning = block_warning              # worker.async_block_warning
        self.on_ready, self.on_outcome, self.on_lost = on_ready, on_outcome, on_lost
        self.on_started = on_started or (lambda child, job: None)
        self.on_fault = on_fault or (lambda job: None)
        self.children = {}          # pid -> Child
        self.generation = 1
        self.failures = 0           # consecutive start-up failures
        self.next_spawn_at = 0.0    # monotonic; back-off after start-up failures
        self.last_failure = None
        self._emptied = []          # futures resolved once no child is left
        self.lifecycle: lifecycle.Observer = lifecycle.NOBODY

    # -- queries ------------------------------------------------------------
    def busy(self) -> list[Child]:
        return [c for c in self.children.values() if c.state in (BUSY, RETIRING) and c.job]

    def room(self, depth: int) -> dict[Child, int]:
        """``{child: free slots}`` for children of the current generation that may be given
        jobs: an idle child takes up to ``depth`` times the jobs it runs at once, a busy
        one that minus what it holds."""
        rooms = {}
        for c in self.children.values():
            if c.generation != self.generation:
                continue
            capacity = depth * c.slots
            if c.state == IDLE:
                rooms[c] = capacity
            elif c.state == BUSY and len(c.running) + len(c.queued) < capacity:
                rooms[c] = capacity - len(c.running) - len(c.queued)
        return rooms

    def ahead(self) -> list[Child]:
        """Children of the current generation running one job in their only slot with
        nothing written ahead: those the adaptive window may write one job ahead to."""
        return [c for c in self.children.values()
                if c.state == BUSY and c.slots == 1 and len(c.running) == 1
                and not c.queued and c.generation == self.generation]

    def serving(self) -> list[Child]:
        """Children of the current generation that are not retiring."""
        return [c for c in self.children.values()
                if c.generation == self.generation and c.state in (STARTING, IDLE, BUSY)]

    def emptied(self) -> asyncio.Future:
        """A future resolved once every child has been reaped (at once if none is left)."""
        future = self.loop.create_future()
        self._emptied.append(future)
        if not self.children:
            self._emptied = _settle_all(self._emptied)
        return future

    # -- spawning -----------------------------------------------------------
    def spawn(self, generation: Optional[int] = None, imports: Optional[Iterable[str]] = None,
              memory_limit: Optional[int] = None) -> Child:
        generation = self.generation if generation is None else generation
        imports = self.imports if imports is None else tuple(imports)
        memory_limit = self.memory_limit if memory_limit is None else memory_limit
        index = free_index(self.children.values(), generation)
        job_r, job_w = os.pipe()
        out_r, out_w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # in the child: never returns
            os.close(job_w)
            os.close(out_r)
            child_mod.main(index, job_r, out_w, imports, memory_limit, parent,
                           self.async_concurrency, self.block_warning)
        os.close(job_r)
        os.close(out_w)
        os.set_blocking(out_r, False)
        os.set_blocking(job_w, False)
        child = Child(index, pid, generation, job_w, out_r, self.max_frame,
                      self.async_concurrency)
        self.children[pid] = child
        self.loop.add_reader(out_r, self._on_readable, child)
        log.debug("spawned child %d (pid %d, generation %d)", index, pid, generation)
        self.lifecycle.child_started(child)
        return child

    def trial(self, imports: Iterable[str], memory_limit: int) -> tuple[Child, asyncio.Future]:
        """Fork the first child of the next generation with ``imports``. Returns it and a
        future of ``(task_limits, None)`` once it is ready, or ``(None, why)`` if it
        cannot import them or dies first. It serves once ``generation`` reaches its own."""
        child = self.spawn(self.generation + 1, imports, memory_limit)
        child.trial = self.loop.create_future()
        return child, child.trial

    # -- dispatch -------------------------------------------------------------
    def send(self, child: Child, batch: list, data: bytes) -> Any:
        """Give a child the jobs of ``batch`` (``data``: their frames, written at once).
        It starts as many as it has free slots, the rest after. Returns the jobs that
        started now; a child found gone is reported lost with every job it held.
        What the pipe cannot take now is written as it drains (never blocking)."""
        try:
            sent = child.writer.send(data)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                raise
            self._unwritable(child, batch)
            return []
        if not sent:
            self.loop.add_writer(child.to_child, self._on_writable, child)
        free = 0 if child.queued else max(0, child.slots - len(child.running))
        started = batch[:free]
        if started:
            now = time.monotonic()
            child.state = BUSY
            for job in started:
                child.running[job] = now
        child.queued.extend(batch[free:])
        return started

    def _on_writable(self, child: Child) -> None:
        try:
            done = child.writer.flush()
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                raise
            self._unwritable(child, ())
            return
        if done:
            self.loop.remove_writer(child.to_child)

    def _unwritable(self, child: Child, batch: Iterable) -> None:
        """The child's job pipe is closed at its end: it is gone (SIGCHLD follows). Jobs
        sent in advance never started; they are reported at once."""
        self._close_job_pipe(child)
        child.state = DEAD
        unstarted = [*child.queued, *batch]
        child.queued.clear()
        self._call(self.on_lost, child, None, "pipe closed", unstarted)

    def _on_readable(self, child: Child) -> None:
        try:
            data = os.read(child.from_child, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._take(child, data)
            return
        self.loop.remove_reader(child.from_child)       # end of file: it has gone
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = child.pid, None
        if pid:
            self._died(child, status)
        # else: SIGCHLD will come and reap() will finish the job

    def _take(self, child: Child, data: bytes, alive: bool = True) -> None:
        """Handle every frame ``data`` completes, each on its own. A child whose stream
        broke is killed (if ``alive``: not yet reaped); its job is then reported lost."""
        for frame in child.reader.feed(data):
            self._on_frame(child, frame)
        if child.reader.error is not None and child.fault is None:
            child.fault = f"sent an outcome that cannot be read ({child.reader.error})"
            log.error("child %d (pid %d) %s: killing it", child.index, child.pid, child.fault)
            self.loop.remove_reader(child.from_child)
            if alive:
                self.kill(child)    # its SIGCHLD reports the job lost, with this reason

    def _call(self, callback: Callable, child: Child, *args: Any, give_back: Any = None) -> None:
        """Run a supervisor callback; if it raises, log it and hand ``give_back`` (the job
        it was settling) to on_fault, so that one bad frame loses neither that job nor
        the frames read after it."""
        try:
            callback(child, *args)
        except Exception:
            log.exception("internal error in %s for child %d", callback.__name__, child.index)
            if give_back is not None:
                try:
                    self.on_fault(give_back)
                except Exception:
                    log.exception("internal error giving back a job of child %d", child.index)

    def _on_frame(self, child: Child, frame: tuple) -> None:
        record = framing.up(frame)
        if type(record) is Outcome:
            self._on_outcome(child, record)
        elif type(record) is Ready:
            self._started_up(child, record.limits)
        elif type(record) is ImportFailed:
            self._started_up(child, None, record)
        else:
            log.error("child %d sent a frame of no known kind: ignored", child.index)

    def _on_outcome(self, child: Child, outcome: Outcome) -> None:
        job = child.running_job(outcome.seq)
        if job is None:
            log.error("child %d sent the outcome of a job it was not running (seq %r): "
                      "ignored", child.index, outcome.seq)
            return
        del child.running[job]
        started = None
        child.tasks_done += 1
        child.rss = outcome.rss
        if child.queued:
            started = child.queued.popleft()
            child.running[started] = time.monotonic()
        elif not child.running:
            child.state = RETIRING if child.state == RETIRING else IDLE
        if child.state == RETIRING:
            self.retire(child)
        self._call(self.on_outcome, child, job, outcome, give_back=job)
        if started is not None:
            self._call(self.on_started, child, started)     # it runs: not given back

    def _started_up(self, child: Child, limits: Optional[dict],
                    error: Optional[ImportFailed] = None) -> None:
        """The child reports that it imported the task modules (``limits``), or could
        not (``error``, and it exits)."""
        if error is not None:
            log.error("child %d could not start: %s\n%s", child.index, error.message,
                      error.traceback)
        if child.trial is not None:         # the reload that started it decides
            if child.state == STARTING and error is None:
                child.state = IDLE
            _settle(child.trial, (limits, error and error.message))
        elif error is not None:
            self.last_failure = error.message
        else:
            self.failures = 0
            if child.state == STARTING:
                child.state = IDLE
                self._call(self.on_ready, child, limits)
            # else retired while importing (a reload): its job pipe is closed, so it
            # reads end of file now and exits; it must not be given work.

    # -- ending ---------------------------------------------------------------
    def retire(self, child: Child) -> None:
        """Let ``child`` finish its current job, then exit (its job pipe is closed)."""
        if child.state == DEAD:
            return
        if child.job is not None:
            child.state = RETIRING
            return
        child.state = RETIRING
        self._close_job_pipe(child)

    def _close_job_pipe(self, child: Child) -> None:
        if child.to_child is not None:
            if child.writer.pending:
                self.loop.remove_writer(child.to_child)
            try:
                os.close(child.to_child)
            except OSError:
                pass
            child.to_child = None

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        """Collect every exited child (called on SIGCHLD)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.get(pid)
            if child is not None:
                try:
                    self._drain(child)
                finally:
                    self._died(child, status)

    def _drain(self, child: Child) -> None:
        """Read what the child wrote before it died (its last outcome, maybe)."""
        if child.from_child is None:
            return
        while child.fault is None:
            try:
                data = os.read(child.from_child, 1 << 16)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self._take(child, data, alive=False)

    def _died(self, child: Child, status: Optional[int]) -> None:
        if child.pid not in self.children:
            return
        del self.children[child.pid]
        if not self.children and self._emptied:
            self._emptied = _settle_all(self._emptied)
        child.exit_status = status
        was_starting = child.state == STARTING
        job, unstarted = child.job, list(child.queued)
        self.lifecycle.child_exited(child, exit_cause(child, status, job, was_starting))
        others = list(child.running)[1:]    # coroutines beside it (async_concurrency)
        child.state, child.job = DEAD, None
        child.queued.clear()
        if child.from_child is not None:
            try:
                self.loop.remove_reader(child.from_child)
                os.close(child.from_child)
            except (OSError, ValueError):
                pass
            child.from_child = None
        self._close_job_pipe(child)
        reason = child.fault or describe_exit(status)
        if was_starting and child.trial is not None:
            _settle(child.trial, (None, f"its first child {reason} while starting"))
            log.error("child %d (pid %d) of the new generation %s while starting", child.index,
                      child.pid, reason)
        elif was_starting:
            self.failures += 1
            delay = min(BACKOFF_MAX, 2.0 ** (self.failures - 1))
            self.next_spawn_at = time.monotonic() + delay
            log.error("child %d (pid %d) %s while starting (%s); next attempt in %.0fs",
                      child.index, child.pid, reason,
                      self.last_failure or "no reason given", delay)
        elif job is not None and getattr(job, "terminated", None):     # asked for: no error
            log.info("child %d (pid %d) %s (a revoke terminated its task)", child.index,
                     child.pid, reason)
        elif job is not None:
            log.error("child %d (pid %d) %s while running %s", child.index, child.pid, reason,
                      ", ".join(str(getattr(j, "describe", lambda: j)()) for j in [job, *others]))
        else:
            log.debug("child %d (pid %d) %s", child.index, child.pid, reason)
        self._call(self.on_lost, child, job, reason, unstarted, give_back=job)
        for other in others:        # each redelivered (or failed, if it timed out) as well
            self._call(self.on_lost, child, other, reason, [], give_back=other)


def _settle(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _settle_all(futures: list) -> list:
    for future in futures:
        _settle(future, None)
    return []
