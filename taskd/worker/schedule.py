"""The ETA schedule: a heap of (due, job), with ``now`` passed in (pure).

Times are monotonic seconds: the supervisor converts each message's
absolute UTC ``eta`` once, on receipt, so a wall-clock step afterwards
cannot fire the schedule early or late.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Any, Optional


class Schedule:
    __slots__ = ("_heap", "_counter")

    def __init__(self) -> None:
        self._heap = []
        self._counter = itertools.count()

    def hold(self, due: float, item: Any) -> None:
        heapq.heappush(self._heap, (due, next(self._counter), item))

    def pop_due(self, now: float) -> list:
        """Remove and return the items due at or before ``now``, earliest first."""
        due = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap)[2])
        return due

    def entries(self) -> list:
        """``(due, item)`` of every item, earliest first (the heap is left as it is)."""
        return [(due, item) for due, _, item in sorted(self._heap, key=lambda e: e[:2])]

    def next_due(self) -> Optional[float]:
        return self._heap[0][0] if self._heap else None

    def drain(self) -> list:
        """Remove and return every item (e.g. to give them back at shutdown)."""
        items = [entry[2] for entry in self._heap]
        self._heap.clear()
        return items

    def __len__(self) -> int:
        return len(self._heap)
