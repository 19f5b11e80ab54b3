"""The records the supervisor and its children exchange over their pipes.

Each frame is a named, immutable record (a ``NamedTuple``: frozen, with
``__slots__ = ()``), read by field name at both ends. On the wire a record
travels as a plain tuple, ``(kind, *fields)`` upwards and ``(*fields)``
downwards (only jobs go down): pickle writes a tuple for a fraction of what an
instance of a class costs it (measured on an outcome: 0.4 µs to dump and 0.4 µs
to load a tuple; 2.2 and 1.8 µs for a NamedTuple; 3.5 and 3.8 µs for a frozen,
slotted dataclass), and two frames cross the pipes per task. :func:`up` and
:func:`job` turn a received tuple back into its record.

Supervisor -> child: :class:`Job`. Child -> supervisor: :class:`Ready` once the
task modules are imported, :class:`ImportFailed` (then the child exits 3) when
they cannot be, and one :class:`Outcome` per job.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

from . import framing


class Job(NamedTuple):
    """Run a task. ``meta``: ``serializer``, ``parent_id``, ``soft_time_limit`` and
    ``request`` (the keyword arguments of the task's :class:`taskd.task.Request`)."""
    seq: int
    task_id: str
    name: str
    args: Any
    kwargs: Any
    meta: dict


class Ready(NamedTuple):
    """The child imported the task modules: ``limits`` is ``{task name: (time_limit,
    soft_time_limit)}``."""
    pid: int
    limits: dict


class ImportFailed(NamedTuple):
    message: str
    traceback: str


class RetryMessage(NamedTuple):
    """The message that retries a task, encoded by the child; the supervisor publishes
    it (only on the retry path: it travels pickled as a record)."""
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict
    retries: int


class Outcome(NamedTuple):
    """A job ran: its result already encoded (``body``), ``rss`` the memory the child
    reported, ``error`` a one-line reason unless it succeeded, ``retry`` the message
    that retries it, if it asked for one."""
    seq: int
    status: str
    body: bytes
    content_type: str
    content_encoding: str
    runtime: float
    rss: int
    error: Optional[str]
    retry: Optional[RetryMessage]


KINDS = {Ready: "ready", ImportFailed: "import-failed", Outcome: "done"}
_BY_KIND = {kind: cls for cls, kind in KINDS.items()}
_new = tuple.__new__


def encode(record: NamedTuple) -> bytes:
    """A child's record, framed for its pipe."""
    return framing.encode((KINDS[type(record)], *record))


def up(frame: tuple) -> Optional[NamedTuple]:
    """The record a child sent, or None for a frame of no known kind."""
    cls = _BY_KIND.get(frame[0]) if type(frame) is tuple and frame else None
    if cls is None or len(frame) != len(cls._fields) + 1:
        return None
    return _new(cls, frame[1:])


def encode_job(job: Job) -> bytes:
    return framing.encode(tuple(job))


def job(frame: tuple) -> Job:
    return _new(Job, frame)
