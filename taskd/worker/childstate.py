"""A child as the supervisor sees it: its pipes, its state and the jobs it holds.

States: ``starting`` (importing the task modules), ``idle``, ``busy``,
``retiring`` (its job pipe is closed, or will be after its current job: it
exits once done) and ``dead`` (reaped).
"""
from __future__ import annotations

import collections
import os
import signal
import time
from typing import Optional

from . import framing

STARTING, IDLE, BUSY, RETIRING, DEAD = "starting", "idle", "busy", "retiring", "dead"


class Child:
    __slots__ = ("index", "pid", "generation", "to_child", "from_child", "reader", "writer",
                 "state", "job", "queued", "tasks_done", "started_at", "job_started", "rss",
                 "exit_status", "fault", "trial")

    def __init__(self, index: int, pid: int, generation: int, to_child: Optional[int],
                 from_child: Optional[int], max_frame: int = framing.MAX_FRAME) -> None:
        self.index, self.pid, self.generation = index, pid, generation
        self.to_child, self.from_child = to_child, from_child
        self.reader = framing.FrameReader(max_frame)
        self.writer = framing.FrameWriter(to_child) if to_child is not None else None
        self.state = STARTING
        self.job = None                    # the job it is running
        self.queued = collections.deque()  # jobs sent in advance (worker.child_prefetch)
        self.tasks_done = 0
        self.started_at = time.monotonic()
        self.job_started = None
        self.rss = 0                       # memory it reported: RSS, or USS over the limit
        self.exit_status = None
        self.fault = None                  # why the pool killed it, if it did
        self.trial = None                  # a reload's first child: future of its start

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
