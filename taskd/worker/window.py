"""The adaptive child window: which tasks may be written ahead to a busy child.

With ``worker.child_prefetch`` 1 (the default) a child holds only the task it
runs, and between two tasks it waits for the supervisor: its outcome goes up,
the supervisor wakes, writes the next job, the child wakes again. For tasks of
a few hundred microseconds that round trip costs as much as the task.
``worker.child_prefetch: 2`` hides it by writing one job ahead to every child,
but then a job may wait in the pipe of a child stuck on a long task while
another child is free.

The window writes one job ahead only where that cannot happen, as far as the
recent past tells: to a child (one slot, nothing queued) whose running task

* has a *short* name: its last ``STREAK`` runs on this worker each took under
  ``short`` seconds (``worker.child_prefetch_adaptive``), and none took longer
  in the last ``MEMORY`` seconds; and
* has run for less than ``short`` seconds so far;

and only a job whose own name is short. A name with one long run falls back to
depth 1 at once, and needs ``STREAK`` short runs and ``MEMORY`` quiet seconds
to earn the window back. Everything here is O(1) per task: two dict look-ups
and a clock reading; the clock is passed in (the dispatcher's
:func:`time.monotonic`), so the rules are unit-tested without sleeping.

The same record tells the consumer how deep its QoS may be: while the last
``DEEP_STREAK`` runs of any task were short and none ran long in the last
``MEMORY`` seconds (:meth:`Window.deep`), the worker prefetches with
``worker.prefetch_multiplier_short`` instead of ``worker.prefetch_multiplier``;
one long run ends that at once.

What it cannot know: a name short so far whose next run is long. The one job
written ahead behind that run waits for it (at most one job per child, and it
is never a long one).
"""
from __future__ import annotations

from typing import Optional

STREAK = 3          # short runs in a row before a name counts as short
MEMORY = 60.0       # seconds a long run keeps its name out of the window
DEEP_STREAK = 20    # short runs of any task in a row before the QoS deepens


class Window:
    """Recent runtimes per task name, and the write-ahead decision.

    ``short`` (seconds, 0: off) is the bound under which a run is short; the
    dispatcher sets it from the configuration (a reload may change it)."""

    __slots__ = ("short", "_streak", "_long_at", "_all", "_any_long_at")

    def __init__(self, short: float) -> None:
        self.short = short
        self._streak: dict = {}         # task name -> short runs in a row
        self._long_at: dict = {}        # task name -> when a run of it last took long
        self._all = 0                   # short runs of any task in a row
        self._any_long_at: Optional[float] = None

    def ran(self, name: str, runtime: float, now: float) -> None:
        """A task of ``name`` ran for ``runtime`` seconds, reported at ``now``."""
        if runtime < self.short:
            self._streak[name] = self._streak.get(name, 0) + 1
            self._all += 1
        else:
            self._streak[name] = self._all = 0
            self._long_at[name] = self._any_long_at = now

    def deep(self, now: float) -> bool:
        """Whether every recent task was short (the QoS may deepen; see the notes)."""
        return bool(self.short) and self._all >= DEEP_STREAK and (
            self._any_long_at is None or now - self._any_long_at >= MEMORY)

    def is_short(self, name: str, now: float) -> bool:
        """Whether ``name`` counts as short at ``now`` (see the module's notes)."""
        if not self.short or self._streak.get(name, 0) < STREAK:
            return False
        long_at: Optional[float] = self._long_at.get(name)
        return long_at is None or now - long_at >= MEMORY

    def behind(self, name: str, started: float, now: float) -> bool:
        """Whether a job may wait behind a running task of ``name`` started at
        ``started``: its name is short and it has not run long so far."""
        return now - started < self.short and self.is_short(name, now)

