"""A child as the supervisor sees it: its pipes, its state and the jobs it holds.

States: ``starting`` (importing the task modules), ``idle``, ``busy``,
``retiring`` (its job pipe is closed, or will be after its current job: it
exits once done) and ``dead`` (reaped).

A child runs up to ``slots`` jobs at once: 1, or ``worker.async_concurrency``
for a child that runs coroutines. ``running`` holds them in the order they
started (the child starts them in the order they came down its pipe), each
with the time it started; ``queued`` the jobs sent in advance.
"""
from __future__ import annotations

import collections
import os
import signal
import time
from typing import Any, Iterable, Optional

from . import framing

STARTING, IDLE, BUSY, RETIRING, DEAD = "starting", "idle", "busy", "retiring", "dead"


class Child:
    __slots__ = ("index", "pid", "generation", "to_child", "from_child", "reader", "writer",
                 "state", "running", "slots", "queued", "tasks_done", "started_at", "rss",
                 "exit_status", "fault", "trial")

    def __init__(self, index: int, pid: int, generation: int, to_child: Optional[int],
                 from_child: Optional[int], max_frame: int = framing.MAX_FRAME,
                 slots: int = 1) -> None:
        self.index, self.pid, self.generation = index, pid, generation
        self.to_child, self.from_child = to_child, from_child
        self.reader = framing.FrameReader(max_frame)
        self.writer = framing.FrameWriter(to_child) if to_child is not None else None
        self.state = STARTING
        self.running: dict = {}            # job -> when it started, oldest first
        self.slots = slots                 # jobs it runs at once
        self.queued = collections.deque()  # jobs sent in advance (worker.child_prefetch)
        self.tasks_done = 0
        self.started_at = time.monotonic()
        self.rss = 0                       # memory it reported: RSS, or USS over the limit
        self.exit_status = None
        self.fault = None                  # why the pool killed it, if it did
        self.trial = None                  # a reload's first child: future of its start

    @property
    def job(self) -> Any:
        """The oldest job it is running, or None."""
        return next(iter(self.running), None)

    @job.setter
    def job(self, job: Any) -> None:
        self.running = {} if job is None else {job: time.monotonic()}

    @property
    def job_started(self) -> Optional[float]:
        """When its oldest running job started (monotonic), or None."""
        return next(iter(self.running.values()), None)

    def running_job(self, seq: Any) -> Any:
        """The running job an outcome is for: the only one, else the one with that
        ``seq`` (None if there is none)."""
        if len(self.running) == 1:
            return self.job
        for job in self.running:
            if getattr(job, "seq", None) == seq:
                return job
        return None

    def __repr__(self) -> str:
        return f"<child {self.index} pid={self.pid} {self.state}>"


def describe_exit(status: Optional[int]) -> str:
    if status is None:
        return "exited"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def exit_cause(child: Child, status: Optional[int], job: Any, was_starting: bool) -> str:
    """Why ``child`` left, in one word (a metric's label: a short, fixed set)."""
    if was_starting:
        return "start_failed"
    if child.fault:
        return "broken_stream"
    if job is not None and getattr(job, "timed_out", False):
        return "time_limit"
    if child.state == RETIRING and job is None:
        return "retired"
    if status is not None and os.WIFSIGNALED(status):
        return "killed"
    return "exited"


def free_index(children: Iterable[Child], generation: int) -> int:
    """The lowest index no serving child of ``generation`` has."""
    used = {c.index for c in children
            if c.generation == generation and c.state in (STARTING, IDLE, BUSY)}
    i = 1
    while i in used:
        i += 1
    return i
