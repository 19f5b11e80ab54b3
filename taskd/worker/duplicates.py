"""Duplicates: redelivered copies of work this worker finished, or is still running.

After a connection drop the broker redelivers what the lost channel held. A
copy of a delivery finished here (:class:`~taskd.worker.recovery.RecentlyDone`
remembers it) is settled without running; a copy of a task still running here
(a *twin*) is held and settled with its original. See
:mod:`taskd.worker.recovery` for what keeps the record from mistaking a new
message for an old one.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Iterable, Optional

from .recovery import Done, RecentlyDone

log = logging.getLogger("taskd.supervisor")


class Duplicates:
    def __init__(self, counters: collections.Counter,
                 recent: Optional[RecentlyDone] = None) -> None:
        self.counters = counters
        self.recent = recent if recent is not None else RecentlyDone()
        self.twins: dict = {}           # delivery key -> redelivered copies of running tasks
        self.delivering: Any = None     # the channel of the last delivery

    def epoch_of(self, channel: Any) -> int:
        """The number of the consuming channel ``channel`` (a new one starts an epoch)."""
        if channel is not self.delivering:     # the first delivery on a new channel
            self.delivering = channel
            self.recent.next_channel()
            self.twins.clear()      # held for the old channel: the broker requeued them
        return self.recent.epoch

    def finished(self, job: Any) -> Optional[Done]:
        """The record of ``job`` if this worker finished it before its channel was lost."""
        done = self.recent.find(job.key, job.epoch)
        if done is not None:
            self.counters["duplicates"] += 1
            log.warning("task %s was finished before the connection dropped: acknowledging "
                        "the redelivered copy without running it", job.describe())
        return done

    def hold_twin(self, job: Any, busy: Iterable[Any]) -> bool:
        """True, and ``job`` held, if it is a redelivered copy of a task still running
        on one of the ``busy`` children, received on a channel since lost."""
        for child in busy:
            for running in (child.job, *child.queued):
                if running.key == job.key and running.epoch < job.epoch:
                    log.warning("task %s is still running here: its redelivered copy will be "
                                "acknowledged when it finishes", job.describe())
                    self.counters["duplicates"] += 1
                    self.twins.setdefault(job.key, []).append(job)
                    return True
        return False

    def done(self, job: Any, result: Optional[tuple] = None) -> list:
        """Record ``job`` finished; returns its twins, to be settled with it."""
        if job.key is None:         # never decoded: no copy of it is held as a twin
            return []
        self.recent.add(job.key, job.epoch, result)
        return self.twins.pop(job.key, [])

    def unfinished(self, job: Any) -> list:
        """``job`` goes back to its queue unfinished: returns its twins, to go back too."""
        return self.twins.pop(job.key, []) if job.key is not None else []
