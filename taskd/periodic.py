"""Periodic tasks: the ``schedule:`` entries and when each is due (pure; the clock is passed in).

An entry fires at *slots*, instants in UTC:

* ``every: N`` - the multiples of N seconds since 1970-01-01 00:00 UTC, so every
  worker computes the same slots without talking to the others (``every: 3600``
  fires at the top of each UTC hour);
* ``cron: "m h dom mon dow"`` - five fields read in the entry's ``timezone``
  (default UTC) by the optional ``cronsim`` library (the ``cron`` extra), which
  follows Debian's cron across daylight-saving changes: a time that does not exist
  (spring forward) fires at the first minute after the gap, a time that exists
  twice (fall back) fires once, and an hourly or finer field fires by elapsed time,
  so ``*/30 * * * *`` fires in both copies of the repeated hour.

:func:`decide` says what to do when the leader finds slots due: after a gap,
``run_once`` runs the latest due slot once and counts the others as missed;
``skip`` runs it only if it is at most ``grace`` seconds late. Either way the
schedule goes on from the latest due slot: a gap never becomes a burst.

Each firing has the task id :func:`task_id` (uuid5 of the entry name and the
slot), the same whichever worker fires it.
"""
from __future__ import annotations

import json
import uuid
from types import MappingProxyType
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping, Optional

UTC = timezone.utc
MISFIRE_POLICIES = ("run_once", "skip")
OPTION_KEYS = ("queue", "routing_key", "exchange", "expires", "priority")
ENTRY_KEYS = ("task", "every", "cron", "timezone", "args", "kwargs", "options", "misfire")
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "taskd:periodic")
GRACE = 10.0        # seconds a slot may be late and still run under ``misfire: skip``
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Entry:
    """One validated ``schedule:`` entry."""

    name: str
    task: str
    every: Optional[float] = None
    cron: Optional[str] = None
    timezone: str = "UTC"
    args: tuple = ()
    kwargs: Mapping = field(default_factory=dict)      # read-only once validated
    options: Mapping = field(default_factory=dict)
    misfire: str = "run_once"

    @property
    def zone(self) -> Any:
        from zoneinfo import ZoneInfo
        return ZoneInfo(self.timezone)

    def describe(self) -> str:
        if self.every is not None:
            return f"every {self.every:g}s"
        return f"cron {self.cron!r} {self.timezone}"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with the slots due: ``fire`` (a slot, or None), how many were
    ``missed`` (due, not run), and ``last``, the slot the schedule goes on from."""

    fire: Optional[datetime]
    missed: int
    last: datetime


# --- slots -------------------------------------------------------------------------

def _micros(t: datetime) -> int:
    delta = t - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _at(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _cronsim(expr: str, start: datetime) -> Any:
    try:
        from cronsim import CronSim
    except ImportError:
        raise ImportError("cron schedules need the cron extra: pip install 'taskd-queue[cron]'") \
            from None
    return CronSim(expr, start)


def next_slot(entry: Entry, after: datetime) -> datetime:
    """The first slot of ``entry`` strictly after ``after`` (aware), in UTC."""
    if entry.every is not None:
        step = round(entry.every * 1_000_000)
        return _at((_micros(after) // step + 1) * step)
    return next(_cronsim(entry.cron, after.astimezone(entry.zone))).astimezone(UTC)


def latest_slot(entry: Entry, now: datetime, first: datetime) -> datetime:
    """The last slot at or before ``now``, given that ``first`` (<= now) is one."""
    if entry.every is not None:
        step = round(entry.every * 1_000_000)
        return _at(_micros(now) // step * step)
    # Windows growing ~30x: the first that holds a slot holds only a few to walk.
    for window in (120, 7200, 172800, 5356800, 69120000, 316224000):
        start = max(first - timedelta(microseconds=1), now - timedelta(seconds=window))
        last, slot = None, next_slot(entry, start)
        while slot <= now:
            last, slot = slot, next_slot(entry, slot)
        if last is not None:
            return last
    return first


def count_slots(entry: Entry, first: datetime, last: datetime, cap: int = 1000) -> int:
    """How many slots lie in [first, last] (both slots), at most ``cap`` for cron."""
    if entry.every is not None:
        return (_micros(last) - _micros(first)) // round(entry.every * 1_000_000) + 1
    n, slot = 1, first
    while n < cap:
        slot = next_slot(entry, slot)
        if slot > last:
            break
        n += 1
    return n


def decide(entry: Entry, due: datetime, now: datetime, grace: float = GRACE) -> Decision:
    """The slots from ``due`` to ``now`` are due: which one runs (see the module's notes)."""
    latest = latest_slot(entry, now, due)
    due_count = count_slots(entry, due, latest)
    if entry.misfire == "skip" and (now - latest).total_seconds() > grace:
        return Decision(None, due_count, latest)
    return Decision(latest, due_count - 1, latest)


def task_id(entry_name: str, slot: datetime) -> str:
    """The task id of ``entry_name``'s firing for ``slot``: the same on every worker."""
    return str(uuid.uuid5(NAMESPACE, f"{entry_name}@{iso(slot)}"))


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


def upcoming(entries: tuple, count: int, now: Optional[datetime] = None) -> list:
    """Each entry with its next ``count`` runs (local to its time zone), as plain data."""
    now = now or datetime.now(UTC)
    rows = []
    for entry in entries:
        runs, slot = [], now
        zone = entry.zone if entry.cron is not None else UTC
        for _ in range(count):
            slot = next_slot(entry, slot)
            runs.append(slot.astimezone(zone).isoformat())
        rows.append({"name": entry.name, "task": entry.task, "schedule": entry.describe(),
                     "misfire": entry.misfire, "next": runs})
    return rows


# --- cursors: the position of an entry, kept in the beat queue ------------------------

def encode_cursor(name: str, last: datetime) -> bytes:
    return json.dumps({"entry": name, "last": iso(last)}).encode()


def decode_cursor(body: bytes) -> tuple[str, datetime]:
    """(entry name, last slot handled); ValueError when ``body`` is not a cursor."""
    try:
        data = json.loads(body)
        last = datetime.fromisoformat(data["last"])
        name = data["entry"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a schedule cursor: {exc}") from None
    if not isinstance(name, str) or last.tzinfo is None:
        raise ValueError("not a schedule cursor: bad entry name or naive time")
    return name, last.astimezone(UTC)


# --- validation -----------------------------------------------------------------------

def parse_schedule(raw: Any, error: Callable[[list, str], None], exchanges: set,
                   now: Optional[datetime] = None) -> tuple:
    """The ``schedule:`` mapping as Entries; each problem goes to ``error(path, message)``
    (path like ``["schedule", "heartbeat", "cron"]``) and its entry is left out."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        error(["schedule"], f"expected a mapping of entry name -> entry, got {raw!r}")
        return ()
    now = now or datetime.now(UTC)
    entries = []
    for name, spec in raw.items():
        before = []
        entry = _entry(str(name), spec, lambda key, msg: before.append((key, msg)),
                       exchanges, now)
        for key, message in before:
            error(["schedule", str(name)] + ([key] if key else []), message)
        if entry is not None and not before:
            entries.append(entry)
    return tuple(entries)


def _entry(name: str, spec: Any, error: Callable, exchanges: set, now: datetime) -> Any:
    if not isinstance(spec, dict):
        error(None, f"expected a mapping with task and every or cron, got {spec!r}")
        return None
    for key in spec:
        if key not in ENTRY_KEYS:
            error(key, "unknown key (known: " + ", ".join(ENTRY_KEYS) + ")")
    task = spec.get("task")
    if not isinstance(task, str) or not task:
        error("task", f"expected a task name, got {task!r}")
    every, cron = spec.get("every"), spec.get("cron")
    if every is not None and cron is not None:
        error(None, "has both every and cron: give one")
    elif every is None and cron is None:
        error(None, "needs every (seconds) or cron (\"m h dom mon dow\")")
    if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float))
                              or not every >= 1):
        error("every", f"expected a number of seconds >= 1, got {every!r}")
    tz = spec.get("timezone", "UTC")
    try:
        from zoneinfo import ZoneInfo
        zone = ZoneInfo(tz) if isinstance(tz, str) and tz else None
    except (KeyError, ValueError, OSError):
        zone = None
    if zone is None:
        error("timezone", f"unknown time zone {tz!r} (expected an IANA name such as "
                          "Europe/Berlin, or UTC)")
    if cron is not None:
        if not isinstance(cron, str):
            error("cron", f"expected a cron string such as \"*/5 * * * *\", got {cron!r}")
        else:
            problem = _check_cron(cron, zone, now)
            if problem:
                error("cron", problem)
    args, kwargs = spec.get("args", []), spec.get("kwargs", {})
    if not isinstance(args, list):
        error("args", f"expected a list, got {args!r}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        error("kwargs", f"expected a mapping of names to values, got {kwargs!r}")
    options = _options(spec.get("options", {}), error, exchanges)
    misfire = spec.get("misfire", "run_once")
    if misfire not in MISFIRE_POLICIES:
        error("misfire", f"expected one of {', '.join(MISFIRE_POLICIES)}, got {misfire!r}")
    try:
        return Entry(name, task, float(every) if every is not None else None, cron,
                     tz if isinstance(tz, str) else "UTC", tuple(args) if isinstance(args, list)
                     else (), MappingProxyType(dict(kwargs) if isinstance(kwargs, dict) else {}),
                     MappingProxyType(options), misfire)
    except (TypeError, ValueError):
        return None


def _check_cron(expr: str, zone: Any, now: datetime) -> Optional[str]:
    try:
        from cronsim import CronSimError
    except ImportError:
        return "cron schedules need the cron extra: pip install 'taskd-queue[cron]'"
    try:
        next(_cronsim(expr, now.astimezone(zone or UTC)))
    except CronSimError as exc:
        return f"not a valid cron expression {expr!r}: {exc} (five fields: minute hour " \
               "day-of-month month day-of-week)"
    except StopIteration:
        return f"cron expression {expr!r} never fires"
    return None


def _options(raw: Any, error: Callable, exchanges: set) -> dict:
    if not isinstance(raw, dict):
        error("options", f"expected a mapping of {', '.join(OPTION_KEYS)}, got {raw!r}")
        return {}
    out = {}
    for key, value in raw.items():
        if key not in OPTION_KEYS:
            error("options", f"unknown option {key!r} (known: {', '.join(OPTION_KEYS)})")
        elif key in ("queue", "routing_key", "exchange") and not (isinstance(value, str)
                                                                 and (value or key != "queue")):
            error("options", f"{key}: expected a string, got {value!r}")
        elif key == "exchange" and value and value not in exchanges:
            error("options", f"exchange {value!r} is not listed under exchanges:")
        elif key == "expires" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                   or value <= 0):
            error("options", f"expires: expected seconds > 0, got {value!r}")
        elif key == "priority" and (isinstance(value, bool) or not isinstance(value, int)
                                    or not 0 <= value <= 9):
            error("options", f"priority: expected an integer from 0 (highest) to 9, got "
                             f"{value!r}")
        else:
            out[key] = value
    return out
