"""Revoked task ids, and the records that carry a revoke through the broker (pure).

A revoke is honoured for ``worker.revoke_ttl`` seconds from the moment it
was *sent* (not from when this worker heard of it), so a worker started an
hour after a revoke honours it for the two hours left, as every other worker
does. :class:`RevokedSet` is bounded twice, as Celery's ``LimitedSet``: by
that age and by a count (``worker.revokes_max``; the oldest go first).

A revoke travels two ways (:mod:`taskd.worker.mailbox`): Celery's ``revoke``
control command, to the workers running now, and a record appended to a
RabbitMQ stream, which every worker replays at start. A record is a JSON
object::

    {"task_id": ["id", ...], "terminate": false, "signal": "SIGTERM",
     "revoked_at": 1764870000.0, "destination": null}

plus, on the stream only, ``{"sync": "<uuid>"}`` markers: a starting worker
appends one and replays until it reads it back, so it knows it has read
every revoke sent before it started.
"""
from __future__ import annotations

import collections
import math
import signal as signal_mod
import time
from typing import Any, Iterable, Optional


class RevokedSet:
    """Task id -> when it was revoked (wall clock), oldest first."""

    def __init__(self, ttl: float, maxlen: int) -> None:
        self.ttl, self.maxlen = ttl, maxlen
        self._ids: collections.OrderedDict = collections.OrderedDict()

    def add(self, task_id: str, at: Optional[float] = None, now: Optional[float] = None) -> bool:
        """Remember ``task_id`` as revoked at ``at`` (default: now). True if it is news:
        False when it was known already, or when that revoke is past the ttl (an old
        record replayed)."""
        now = time.time() if now is None else now
        at = now if at is None else min(at, now)
        if at + self.ttl <= now:
            return False
        known = self._ids.get(task_id)
        if known is None or at < known:
            self._ids[task_id] = at
        self.purge(now)
        return known is None or known + self.ttl <= now

    def revoked(self, task_id: str, now: Optional[float] = None) -> bool:
        at = self._ids.get(task_id)
        if at is None:
            return False
        return at + self.ttl > (time.time() if now is None else now)

    __contains__ = revoked

    def purge(self, now: Optional[float] = None) -> None:
        """Forget revokes past the ttl, and the oldest beyond ``maxlen``."""
        now = time.time() if now is None else now
        ids = self._ids
        while len(ids) > self.maxlen:
            ids.popitem(last=False)
        # Insertion order is nearly time order (replayed records come first, oldest
        # first); an entry that is not yet expired stops the sweep.
        while ids:
            task_id, at = next(iter(ids.items()))
            if at + self.ttl > now:
                break
            ids.popitem(last=False)

    def ids(self, now: Optional[float] = None) -> list:
        """The ids still revoked, oldest first."""
        self.purge(now)
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def stream_arguments(ttl: float) -> dict:
    """The revoke stream's declaration: records older than ``ttl`` seconds are removed
    by the broker a segment at a time (segments of 1 MB, so that it happens)."""
    return {"x-queue-type": "stream", "x-max-age": f"{max(1, math.ceil(ttl))}s",
            "x-stream-max-segment-size-bytes": 1_000_000}


def signal_number(name: Any) -> int:
    """``"SIGTERM"``, ``"TERM"``, ``"term"`` or ``15`` -> 15; ValueError otherwise."""
    if isinstance(name, bool):
        raise ValueError(f"not a signal: {name!r}")
    if isinstance(name, int):
        return signal_mod.Signals(name).value
    if not isinstance(name, str) or not name:
        raise ValueError(f"not a signal: {name!r}")
    text = name.strip().upper()
    if text.isdigit():
        return signal_mod.Signals(int(text)).value
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal_mod.Signals[text].value
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


def task_ids(value: Any) -> list:
    """The ``task_id`` argument of a revoke (one id or a list) as a list of strings;
    ValueError for anything else."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value \
            or not all(isinstance(i, str) and i for i in value):
        raise ValueError("task_id must be a task id or a non-empty list of task ids")
    return list(value)


def record(ids: Iterable[str], terminate: bool = False, signal: str = "SIGTERM",
           destination: Optional[list] = None, at: Optional[float] = None) -> dict:
    """A revoke record, as appended to the stream."""
    return {"task_id": list(ids), "terminate": bool(terminate), "signal": signal,
            "revoked_at": time.time() if at is None else at, "destination": destination}


def parse_record(body: Any) -> dict:
    """Check a decoded revoke record (or sync marker); returns it, ValueError if bad."""
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    if "sync" in body:
        if not isinstance(body["sync"], str):
            raise ValueError("'sync' must be a string")
        return body
    ids = task_ids(body.get("task_id"))
    at = body.get("revoked_at")
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        raise ValueError("'revoked_at' must be a number (seconds since the epoch)")
    destination = body.get("destination")
    if destination is not None and not (isinstance(destination, list)
                                        and all(isinstance(d, str) for d in destination)):
        raise ValueError("'destination' must be null or a list of node names")
    return {"task_id": ids, "terminate": bool(body.get("terminate")),
            "signal": body.get("signal") or "SIGTERM", "revoked_at": float(at),
            "destination": destination}
