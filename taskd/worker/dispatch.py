"""Dispatch: the jobs waiting for a child, and handing them over.

Decoded jobs wait in ``ready`` (in order) or, with an ETA not yet due, in the
``schedule`` (a timer moves them to ``ready`` when due). :meth:`Dispatcher.dispatch`
gives ready jobs to idle children, then (``worker.child_prefetch`` > 1) more in
advance to busy ones, so that they never wait for the supervisor. With the
default ``child_prefetch`` 1, the adaptive window (:mod:`~taskd.worker.window`,
``worker.child_prefetch_adaptive``) writes one job ahead to a busy child only
behind a task that is short and for a job that is short. Jobs go
round the children one at a time; each child's share is written at once. On
the way out a job is checked once more: an unknown task is dead-lettered, an
expired or revoked one settled REVOKED, one whose arguments cannot be pickled
dead-lettered. A child starting a job arms the job's hard time limit.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Callable, Optional

from .. import protocol
from ..exceptions import InvalidTaskMessage, NotRegistered
from . import lifecycle
from .framing import encode_job
from .schedule import Schedule
from .window import Window

log = logging.getLogger("taskd.supervisor")


class Dispatcher:
    """``held(n)``: ``n`` jobs are now held for their ETA (the consumer's QoS follows)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Any, outcomes: Any,
                 held: Callable[[int], None], config: Any) -> None:
        self.loop, self.pool, self.outcomes, self.held, self.config = (
            loop, pool, outcomes, held, config)
        self.ready: collections.deque = collections.deque()   # decoded jobs for a child
        self.schedule = Schedule()          # jobs waiting for their ETA
        self.task_names: Optional[frozenset] = None     # known once a child is ready
        self.task_limits: dict = {}         # task name -> (time_limit, soft_time_limit)
        self._timer: Optional[asyncio.TimerHandle] = None       # the schedule's
        self._handle: Optional[asyncio.Handle] = None           # dispatch_soon's
        self.total: collections.Counter = collections.Counter()    # task name -> started
        self.lifecycle: lifecycle.Observer = lifecycle.NOBODY
        # False while new tasks must wait (the result store's buffer is full):
        self.gate: Callable[[], bool] = lambda: True
        self.window = Window(config["worker.child_prefetch_adaptive"])
        self.deep = False                   # the window's verdict, last told to ``deepen``
        self.deepen: Callable[[bool], None] = lambda deep: None    # the consumer's QoS

    def __len__(self) -> int:
        """Jobs waiting here: ready and held."""
        return len(self.ready) + len(self.schedule)

    def tasks(self, task_limits: Optional[dict]) -> None:
        """The tasks the children know (None: not known yet), with their time limits."""
        self.task_names = frozenset(task_limits) if task_limits is not None else None
        if task_limits is not None:
            self.task_limits = task_limits

    def limits_for(self, request: Any) -> tuple:
        """(hard, soft) seconds: the call's, else the task's, else the config's."""
        task_hard, task_soft = self.task_limits.get(request.name, (None, None))
        return (request.time_limit or task_hard or self.config["worker.time_limit"],
                request.soft_time_limit or task_soft or self.config["worker.soft_time_limit"])

    # == waiting =============================================================================
    def add(self, job: Any) -> None:
        """``job`` is to run now."""
        self.ready.append(job)
        if self.config["worker.child_prefetch"] > 1:
            self.dispatch_soon()    # batch the burst: several jobs per child per write
        else:
            self.dispatch()

    def first(self, jobs: list) -> None:
        """Jobs sent in advance to a child that died unstarted: first in line again."""
        self.ready.extendleft(reversed(jobs))

    def hold(self, job: Any, delay: float) -> None:
        """Hold ``job`` until ``delay`` seconds from now."""
        self.schedule.hold(time.monotonic() + delay, job)
        self.held(len(self.schedule))
        self._arm_schedule_timer()

    def scheduled(self) -> list:
        """``(due, job)`` of the jobs held for their ETA, earliest first (``due`` in
        :func:`time.monotonic` seconds)."""
        return self.schedule.entries()

    def drop(self) -> int:
        """Forget every waiting job (they stay unacked: the broker requeues them)."""
        dropped = len(self)
        self.ready.clear()
        self.schedule.drain()
        return dropped

    def _arm_schedule_timer(self) -> None:
        due = self.schedule.next_due()
        if due is None:
            return
        if self._timer is not None:
            if self._timer.when() <= due:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(due, self._release_due)

    def _release_due(self) -> None:
        self._timer = None
        self.ready.extend(self.schedule.pop_due(time.monotonic()))
        self.held(len(self.schedule))
        self._arm_schedule_timer()
        self.dispatch()

    # == handing over ===========================================================================
    def dispatch_soon(self) -> None:
        """Dispatch once the deliveries that arrived together are all decoded, so that
        a child given several jobs gets them in one write."""
        if not self._handle:
            self._handle = self.loop.call_soon(self.dispatch)

    def dispatch(self) -> None:
        """Give ready jobs to children with room (see the module's notes)."""
        self._handle = None
        if not self.ready or not self.gate():
            return
        depth = self.config["worker.child_prefetch"]
        rooms = self.pool.room(depth)
        batches: dict = {}
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
        if depth == 1 and self.ready:
            self._write_ahead(batches)
        for child, (batch, frames) in batches.items():
            data = b"".join(frames) if len(frames) > 1 else frames[0]
            for started in self.pool.send(child, batch, data):
                self.started(child, started)

    def _write_ahead(self, batches: dict) -> None:
        """The adaptive window: one more job, of a short task, to each busy child whose
        running task is short (see :mod:`~taskd.worker.window`) and that is not retired
        after it (``worker.max_tasks_per_child``). Jobs keep their order: the first
        ready job not short stops it."""
        window = self.window
        window.short = self.config["worker.child_prefetch_adaptive"]
        if not window.short:
            return
        now, max_tasks = time.monotonic(), self.config["worker.max_tasks_per_child"]
        for child in self.pool.ahead():
            if not self.ready or not window.is_short(self.ready[0].request.name, now):
                return
            if max_tasks and child.tasks_done + 1 >= max_tasks:
                continue        # retired after its current task: it would run one too many
            running, started = next(iter(child.running.items()))
            if not window.behind(running.task_name, started, now):
                continue
            picked = self._next_runnable()
            if picked is None:
                return
            if not window.is_short(picked[0].request.name, now):
                self.ready.appendleft(picked[0])     # checked again when it goes out
                return
            batches[child] = ([picked[0]], [picked[1]])

    def ran(self, job: Any, runtime: float) -> None:
        """``job`` ran for ``runtime`` seconds (the child's measure): the window learns."""
        window, now = self.window, time.monotonic()
        window.short = self.config["worker.child_prefetch_adaptive"]
        window.ran(job.task_name, runtime, now)
        deep = window.deep(now)
        if deep is not self.deep:
            self.deep = deep
            self.deepen(deep)

    def started(self, child: Any, job: Any) -> None:
        """A child starts ``job``: arm its hard time limit."""
        self.total[job.task_name] += 1
        self.lifecycle.started(job, child.pid)
        if job.hard_limit:
            job.timer = self.loop.call_later(job.hard_limit, self._time_limit_hit, child, job,
                                             job.hard_limit)

    def _next_runnable(self) -> Optional[tuple]:
        """The next ready job a child may run and its frame; unknown or expired ones, and
        those that cannot be framed, are settled here."""
        while self.ready:
            job = self.ready.popleft()
            if self.task_names is not None and job.request.name not in self.task_names:
                name = protocol.short_repr(job.request.name)
                self.outcomes.dead_letter(job, f"NotRegistered: unknown task {name}",
                                          NotRegistered(f"task {name} is not registered in "
                                                        "this worker"))
            elif not self.outcomes.expire(job) and not self.outcomes.revoke(job):
                frame = self._frame(job)
                if frame is not None:
                    return job, frame
        return None

    def _frame(self, job: Any) -> Optional[bytes]:
        """The frame that hands ``job`` to a child, or None when it cannot be made: the
        job is then dead-lettered. Arguments nested deeper than pickle recurses (JSON
        decodes deeper), or objects from a custom serializer that do not pickle."""
        job.hard_limit, soft = self.limits_for(job.request)
        try:
            return encode_job(job.job_frame(soft))
        except Exception as exc:
            reason = (f"InvalidTaskMessage: the arguments cannot be handed to a child "
                      f"process: {type(exc).__name__}: {exc}")
            self.outcomes.dead_letter(job, reason, InvalidTaskMessage(reason))
            return None

    def _time_limit_hit(self, child: Any, job: Any, limit: float) -> None:
        if job in child.running:
            log.error("task %s exceeded its hard time limit (%gs): killing child %d (pid %d)",
                      job.describe(), limit, child.index, child.pid)
            job.timed_out = limit
            self.pool.kill(child)
