"""Celery's worker events folded into rows of history (pure: no I/O).

Workers publish events to the ``celeryev`` topic exchange, one JSON object per
message (routing key ``task.succeeded``, ``worker.heartbeat``, ...) or, from a
prefork Celery worker, a JSON list of task events under ``task.multi``. The
field names are Celery's (``celery/events/dispatcher.py``, ``celery/worker/
state.py``): ``uuid``, ``name``, ``args``, ``kwargs``, ``result``,
``exception``, ``traceback``, ``runtime``, ``retries``, ``hostname``,
``timestamp``, ``parent_id``, ``root_id``; heartbeats carry ``freq``,
``active``, ``processed``, ``loadavg``, ``sw_ident``, ``sw_ver``.

:func:`fold` turns a batch of events into one :class:`Batch`: a merged row per
task (later events win field by field; the state is the one of the newest
event, so events that arrive out of order never move a task backwards), one
timeline row per task event, a row per worker and per-minute counters. The
store writes a batch in one transaction.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

#: Celery event type -> the state a task is in after it.
TASK_STATES = {
    "task-sent": "PENDING", "task-received": "RECEIVED", "task-started": "STARTED",
    "task-succeeded": "SUCCESS", "task-failed": "FAILURE", "task-retried": "RETRY",
    "task-revoked": "REVOKED", "task-rejected": "REJECTED",
}
#: Event type -> the timestamp column it fills.
TIME_COLUMNS = {"task-sent": "sent_at", "task-received": "received_at",
                "task-started": "started_at", "task-succeeded": "succeeded_at",
                "task-failed": "failed_at"}
#: Task fields copied as they are (Celery's names; ``uuid`` becomes ``id``).
COPIED = ("name", "args", "kwargs", "result", "exception", "traceback", "runtime",
          "retries", "parent_id", "root_id", "eta", "expires", "queue")
NUMBERS = {"runtime": float, "retries": int}
TEXT_LIMIT = 8 * 1024           # reprs longer than this are cut (Celery cuts args at 1 KiB)
TRACEBACK_LIMIT = 64 * 1024
LIMITS = {"traceback": TRACEBACK_LIMIT, "name": 255, "queue": 255, "parent_id": 255,
          "root_id": 255}


class BadEvent(ValueError):
    """A message on the event exchange that is not a Celery event."""


@dataclass(slots=True)
class Batch:
    tasks: dict = field(default_factory=dict)       # id -> merged column values
    timeline: list = field(default_factory=list)    # one dict per task event
    workers: dict = field(default_factory=dict)     # hostname -> column values
    minutes: dict = field(default_factory=dict)     # minute -> {succeeded, failed, retried}
    events: int = 0


def decode(body: bytes, content_type: str | None) -> list[dict]:
    """The events in one message body; raises :class:`BadEvent` naming what is wrong."""
    if content_type not in (None, "", "application/json"):
        raise BadEvent(f"content type {content_type!r} (only application/json is read)")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadEvent(f"body is not JSON ({exc})") from None
    items = data if isinstance(data, list) else [data]
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise BadEvent("expected an event object with a 'type' field")
    return items


def _text(value, limit=TEXT_LIMIT):
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _timestamp(event, now):
    ts = event.get("timestamp")
    return float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else now


def fold(events, now: float | None = None) -> Batch:
    """Fold decoded events (oldest first) into a :class:`Batch`."""
    now = time.time() if now is None else now
    batch = Batch()
    for event in events:
        batch.events += 1
        kind = event.get("type", "")
        if kind in TASK_STATES and isinstance(event.get("uuid"), str):
            _fold_task(batch, event, kind, _timestamp(event, now))
        elif kind.startswith("worker-") and isinstance(event.get("hostname"), str):
            _fold_worker(batch, event, kind, _timestamp(event, now))
    return batch


def _fold_task(batch, event, kind, ts):
    task_id = event["uuid"][:255]
    row = batch.tasks.setdefault(task_id, {"id": task_id, "state": None, "state_at": None,
                                           "updated_at": ts})
    for name in COPIED:
        value = event.get(name)
        if value is None:
            continue
        if name in NUMBERS:         # a number or nothing: a bad field never fails a batch
            if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 2**31:
                row[name] = NUMBERS[name](value)
        else:
            row[name] = _text(value, LIMITS.get(name, TEXT_LIMIT))
    if isinstance(event.get("hostname"), str) and kind != "task-sent":    # sent: the client
        row["worker"] = event["hostname"][:255]
    if kind in TIME_COLUMNS:
        row[TIME_COLUMNS[kind]] = ts
    if row["state_at"] is None or ts >= row["state_at"]:
        row["state"], row["state_at"] = TASK_STATES[kind], ts
    row["updated_at"] = max(row["updated_at"], ts)
    detail = event.get("exception") if kind in ("task-failed", "task-retried") else None
    if kind == "task-succeeded" and row.get("runtime") is not None:
        detail = f"runtime {row['runtime']:.3f} s"
    batch.timeline.append({"task_id": task_id, "type": kind, "at": ts,
                           "hostname": _text(event.get("hostname"), 255),
                           "retries": row.get("retries") if "retries" in event else None,
                           "detail": _text(detail)})
    counter = {"task-succeeded": "succeeded", "task-failed": "failed",
               "task-retried": "retried"}.get(kind)
    if counter:
        minute = batch.minutes.setdefault(int(ts // 60), {"succeeded": 0, "failed": 0, "retried": 0})
        minute[counter] += 1


def _fold_worker(batch, event, kind, ts):
    host = event["hostname"][:255]
    row = batch.workers.setdefault(host, {"hostname": host})
    row["status"] = "offline" if kind == "worker-offline" else "online"
    row["last_seen"] = max(ts, row.get("last_seen") or 0)
    for name, kind in (("freq", float), ("active", int), ("processed", int)):
        value = event.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 2**62:
            row[name] = kind(value)
    load = event.get("loadavg")
    if isinstance(load, (list, tuple)):
        row["loadavg"] = " ".join(f"{x:.2f}" for x in load if isinstance(x, (int, float)))
    for name in ("sw_ident", "sw_ver", "sw_sys"):
        if isinstance(event.get(name), str):
            row[name] = event[name][:100]
