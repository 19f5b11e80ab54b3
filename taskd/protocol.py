"""Celery's task message protocol v2 and rpc result format (pure; no I/O).

A task message is an AMQP message whose

* properties carry ``correlation_id`` (the task id), ``reply_to`` (the
  caller's result queue, or empty), ``content_type``/``content_encoding``,
  ``priority`` and ``delivery_mode``;
* headers carry ``lang``, ``task`` (name), ``id``, ``root_id``, ``parent_id``,
  ``group``, ``eta``, ``expires`` (ISO 8601), ``retries``, ``timelimit``
  (``[hard, soft]``), ``argsrepr``, ``kwargsrepr``, ``origin``, ``shadow``
  and ``ignore_result``;
* body is ``[args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]``
  encoded in the content type.

A result is a message to ``reply_to`` through the default exchange with
``correlation_id`` = task id and body ``{"task_id", "status", "result",
"traceback", "children", "date_done"}``; a failure's ``result`` is
``{"exc_type", "exc_message", "exc_module"}``. This is what Celery 5's rpc
backend produces and consumes, so both sides interoperate with Celery.
"""
from __future__ import annotations

import os
import socket
import sys
import traceback as tb_module
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from reprlib import Repr

from . import serialization
from .exceptions import ContentDisallowed, InvalidTaskMessage, TaskdError

# States, with Celery's names.
PENDING = "PENDING"
RECEIVED = "RECEIVED"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
RETRY = "RETRY"
REVOKED = "REVOKED"
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
EXCEPTION_STATES = frozenset({FAILURE, RETRY, REVOKED})

_repr = Repr()
_repr.maxstring = 200
_repr.maxother = 200
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 20


def short_repr(value):
    """A bounded repr (200 characters a string, 20 items a container, 6 levels): for
    error messages that quote what a sender wrote."""
    return _repr.repr(value)


def origin_name():
    return f"{os.getpid()}@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A fully encoded task message, ready to publish."""

    task_id: str
    task_name: str
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict
    correlation_id: str
    reply_to: str | None
    priority: int | None = None
    expiration: str | None = None


def to_utc_iso(value):
    """A datetime (naive = local time) as an aware ISO 8601 string in UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.astimezone()  # naive means the caller's local time
    return value.astimezone(timezone.utc).isoformat()


def encode_task(task_id, name, args=(), kwargs=None, *, serializer="json", eta=None,
                expires=None, retries=0, time_limit=None, soft_time_limit=None, reply_to=None,
                priority=None, root_id=None, parent_id=None, group=None, ignore_result=False,
                extra_headers=None, origin=None, embed=None, group_index=None) -> OutgoingMessage:
    """Build a protocol v2 task message. ``eta``/``expires`` are datetimes or None;
    ``embed``: the workflow steps (``callbacks``, ``errbacks``, ``chain``, ``chord``)."""
    kwargs = kwargs or {}
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"task args must be a list or tuple, not {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise TypeError(f"task kwargs must be a dict, not {type(kwargs).__name__}")
    body, content_type, content_encoding = serialization.dumps(
        [list(args), kwargs, dict(dict.fromkeys(WORKFLOW_KEYS), **(embed or {}))],
        serializer,
    )
    headers = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": to_utc_iso(eta),
        "expires": to_utc_iso(expires),
        "group": group,
        "group_index": group_index,
        "retries": retries,
        "timelimit": [time_limit, soft_time_limit],
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": _repr.repr(tuple(args)),
        "kwargsrepr": _repr.repr(kwargs),
        "origin": origin or origin_name(),
        "ignore_result": bool(ignore_result),
    }
    if extra_headers:
        headers.update(extra_headers)
    return OutgoingMessage(
        task_id=task_id,
        task_name=name,
        body=body,
        content_type=content_type,
        content_encoding=content_encoding,
        headers=headers,
        correlation_id=task_id,
        reply_to=reply_to or None,
        priority=priority,
    )


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded, validated task message, as the worker sees it."""

    id: str
    name: str
    args: tuple
    kwargs: dict
    reply_to: str | None = None
    correlation_id: str | None = None
    eta: datetime | None = None
    expires: datetime | None = None
    retries: int = 0
    time_limit: float | None = None
    soft_time_limit: float | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    ignore_result: bool = False
    #: The workflow steps that follow (see :func:`check_embed`); None when there are none.
    embed: dict | None = None
    group_index: int | None = None
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    headers: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def serializer(self):
        return serialization.name_of(self.content_type)


def parse_datetime(value, what):
    """Parse an ISO 8601 header into an aware UTC datetime (naive = UTC)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidTaskMessage(f"header {what!r} is not an ISO 8601 datetime: "
                                     f"{short_repr(value)}") from None
    else:
        raise InvalidTaskMessage(f"header {what!r} must be an ISO 8601 string, not {type(value).__name__}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt


def _limit(value, what):
    """A time limit in seconds. An integral one stays an int (pika cannot encode a float
    header, and the limit goes back out in the headers of a retry); a Decimal is what a
    worker's copy carries for a fractional one."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)) or \
            not value > 0 or value == float("inf"):
        raise InvalidTaskMessage(f"timelimit {what} must be a positive number, got {value!r}")
    return int(value) if value == int(value) else float(value)


def peek_task_id(headers, correlation_id=None):
    """The best guess at a message's task id, for error reports (a string, or None:
    the header of a bad message may hold anything)."""
    for tid in ((headers or {}).get("id"), correlation_id):
        if tid and isinstance(tid, str):
            return tid
    return None


def decode_task(headers, body, content_type, content_encoding=None, *, reply_to=None,
                correlation_id=None, accept=None) -> Request:
    """Validate and decode a task message; raises a :class:`TaskdError` subclass.

    Raises ``InvalidTaskMessage`` for bad headers or a body of the wrong
    shape, ``ContentDisallowed`` for a content type outside ``accept``, and
    ``DecodeError`` for a body that is not valid in its content type. Every
    header the worker uses is checked for its type here, before anything
    else touches it.
    """
    headers = headers or {}
    name = headers.get("task")
    if not name or not isinstance(name, str):
        raise InvalidTaskMessage(
            "no 'task' header: not a task message of protocol v2 "
            f"(headers present: {', '.join(sorted(map(str, headers))) or 'none'})"
        )
    task_id = headers.get("id") or correlation_id
    if not task_id or not isinstance(task_id, str):
        raise InvalidTaskMessage(f"task {name}: no 'id' header and no correlation_id"
                                 if not task_id else
                                 f"task {name}: header 'id' must be a string, "
                                 f"not {type(task_id).__name__}")
    eta = parse_datetime(headers.get("eta"), "eta")
    expires = parse_datetime(headers.get("expires"), "expires")
    retries = headers.get("retries") or 0
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidTaskMessage(f"header 'retries' must be a non-negative integer, "
                                 f"got {short_repr(retries)}")
    timelimit = headers.get("timelimit") or (None, None)
    if not isinstance(timelimit, (list, tuple)) or len(timelimit) != 2:
        raise InvalidTaskMessage(f"header 'timelimit' must be [hard, soft], "
                                 f"got {short_repr(timelimit)}")
    hard, soft = _limit(timelimit[0], "hard"), _limit(timelimit[1], "soft")
    root_id, parent_id, group = (_optional_str(headers, key)
                                 for key in ("root_id", "parent_id", "group"))

    payload = serialization.loads(body, content_type, content_encoding, accept=accept)
    if not isinstance(payload, (list, tuple)) or len(payload) != 3:
        raise InvalidTaskMessage(
            f"task {name}: body must be [args, kwargs, embed], got {type(payload).__name__}"
            + (f" of length {len(payload)}" if isinstance(payload, (list, tuple)) else "")
        )
    args, kwargs, embed = payload
    if not isinstance(args, (list, tuple)):
        raise InvalidTaskMessage(f"task {name}: args must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise InvalidTaskMessage(f"task {name}: kwargs must be a mapping, got {type(kwargs).__name__}")
    embed = check_embed(name, embed)
    group_index = headers.get("group_index")
    if group_index is not None and (isinstance(group_index, bool)
                                    or not isinstance(group_index, int)):
        raise InvalidTaskMessage(f"header 'group_index' must be an integer, "
                                 f"got {short_repr(group_index)}")
    return Request(
        id=task_id,
        name=name,
        args=tuple(args),
        kwargs=kwargs,
        reply_to=reply_to or None,
        correlation_id=correlation_id or task_id,
        eta=eta,
        expires=expires,
        retries=retries,
        time_limit=hard,
        soft_time_limit=soft,
        root_id=root_id,
        parent_id=parent_id,
        group=group,
        ignore_result=bool(headers.get("ignore_result")),
        embed=embed,
        group_index=group_index,
        content_type=content_type or "application/json",
        content_encoding=content_encoding or "utf-8",
        headers=dict(headers),
    )


def _optional_str(headers, key):
    value = headers.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidTaskMessage(f"header {key!r} must be a string, not {type(value).__name__}")
    return value or None


WORKFLOW_KEYS = ("callbacks", "errbacks", "chain", "chord")


def check_embed(name, embed):
    """The body's third part: the workflow steps that follow the task (Celery's
    ``callbacks`` = ``link``, ``errbacks`` = ``link_error``, ``chain``, ``chord``), as
    signature dicts. Returns the steps present (None when there are none); raises
    InvalidTaskMessage for what the worker cannot honour as a whole (an unknown key, a
    step that is not a plain task signature), so that a workflow is never half-run."""
    if embed is None:
        return None
    if not isinstance(embed, dict):
        raise InvalidTaskMessage(f"task {name}: the body's third part (the workflow embed) "
                                 f"must be a mapping, got {type(embed).__name__}")
    unknown = sorted(str(k) for k, v in embed.items() if k not in WORKFLOW_KEYS and v)
    if unknown:
        raise InvalidTaskMessage(f"task {name}: unknown workflow field(s) in the embed: "
                                 f"{', '.join(unknown)}; refused rather than half-run")
    steps = {key: embed[key] for key in WORKFLOW_KEYS if embed.get(key)}
    for key, value in steps.items():
        sigs = [value] if key == "chord" else value
        if not isinstance(sigs, (list, tuple)):
            raise InvalidTaskMessage(f"task {name}: embed {key!r} must be a list of "
                                     f"signatures, got {type(value).__name__}")
        for sig in sigs:
            check_signature(name, key, sig)
    return steps or None


def check_signature(name, where, sig):
    """One step of a workflow: a plain task signature ``{"task", "args", "kwargs",
    "options", "subtask_type": None, "immutable"}`` (checked all the way down its own
    options' steps)."""
    if not isinstance(sig, dict) or not isinstance(sig.get("task"), str) or not sig["task"]:
        raise InvalidTaskMessage(f"task {name}: a step in embed {where!r} is not a task "
                                 f"signature: {short_repr(sig)}")
    kind = sig.get("subtask_type")
    if kind:
        raise InvalidTaskMessage(
            f"task {name}: embed {where!r} holds a {kind!r} signature ({sig['task']}); taskd "
            "workers run steps that are single tasks (a group or chord nested inside a "
            "chain is not run); refused rather than half-run")
    if not isinstance(sig.get("args") or [], (list, tuple)) or \
            not isinstance(sig.get("kwargs") or {}, dict) or \
            not isinstance(sig.get("options") or {}, dict):
        raise InvalidTaskMessage(f"task {name}: step {sig['task']} in embed {where!r} has "
                                 "args/kwargs/options of the wrong type")
    options = sig.get("options") or {}
    nested = {"callbacks": options.get("link"), "errbacks": options.get("link_error"),
              "chain": options.get("chain"), "chord": options.get("chord")}
    for key, value in nested.items():
        if value:
            for inner in ([value] if isinstance(value, dict) else value
                          if isinstance(value, (list, tuple)) else [None]):
                check_signature(name, key, inner)


# --- results -------------------------------------------------------------------

def exception_to_dict(exc):
    cls = type(exc)
    args = exc.args
    try:
        serialization.json_dumps(args)
    except Exception:
        args = (repr(exc),)
    return {"exc_type": cls.__qualname__, "exc_message": list(args), "exc_module": cls.__module__}


def format_traceback(exc):
    return "".join(tb_module.format_exception(type(exc), exc, exc.__traceback__))


def result_meta(task_id, status, result, traceback=None, *, parent_id=None, group=None):
    meta = {
        "task_id": task_id,
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": datetime.now(timezone.utc).isoformat() if status in READY_STATES else None,
    }
    if group:
        meta["group_id"] = group
    if parent_id:
        meta["parent_id"] = parent_id
    return meta


def encode_result(task_id, status, result, traceback=None, *, serializer="json",
                  parent_id=None, group=None):
    """Encode a result; returns ``(status, body, content_type, content_encoding)``.

    A value the serializer cannot encode becomes a FAILURE naming the problem,
    so the caller always gets an answer.
    """
    if status in EXCEPTION_STATES and isinstance(result, BaseException):
        result = exception_to_dict(result)
    meta = result_meta(task_id, status, result, traceback, parent_id=parent_id, group=group)
    try:
        return (status, *serialization.dumps(meta, serializer))
    except TaskdError as exc:
        failure = exception_to_dict(exc)
        meta = result_meta(task_id, FAILURE, failure, f"{exc}\n", parent_id=parent_id, group=group)
        return (FAILURE, *serialization.dumps(meta, "json"))


def decode_result(body, content_type, content_encoding=None, accept=None):
    """Decode a result message; ``accept`` is the set of content types allowed
    (``result_accept_content``). A type outside it raises ContentDisallowed
    before the body is touched."""
    if accept is not None and (content_type or "application/json") not in accept:
        raise ContentDisallowed(
            f"result content type {content_type!r} not accepted; add it to "
            f"result_accept_content (now: {', '.join(sorted(accept))}) only if every "
            "process that can publish to this client's reply queue is trusted")
    meta = serialization.loads(body, content_type, content_encoding, accept=accept)
    if not isinstance(meta, dict) or "status" not in meta:
        raise InvalidTaskMessage(f"not a result message: {type(meta).__name__}")
    return meta
