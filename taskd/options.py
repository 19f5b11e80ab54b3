"""What one send decides, from the call to the wire (pure; no I/O).

``apply_async`` and ``send_task`` take the same options. They become one frozen
:class:`SendOptions` value at the call, checked there, field by field, against
the checks declared with the fields (so a bad value fails before any
connection is opened, naming the option). :meth:`SendOptions.resolved` then
fills in what the call left out, **call > task attribute > configuration**,
turns ``countdown``/``expires`` seconds into datetimes and picks a task id;
the resolved value goes unchanged to :meth:`SendOptions.encode` (the message)
and to :meth:`~taskd.broker.publisher.Publisher.publish` (how it is sent).

Where a message goes (:func:`resolve_route`), first match wins, for the
three routing options taken together:

1. the options of the call (``queue``, or ``exchange``/``routing_key``);
2. the task's attributes (``Task.queue``, ``Task.exchange``, ``Task.routing_key``);
3. the first ``routes:`` entry of the configuration whose glob matches the task name;
4. ``default_queue`` (``celery`` unless configured).

A ``queue`` resolves to that queue's exchange and binding key. A queue the
configuration does not list is declared the way a Celery client declares it:
durable, bound to a direct exchange of the same name, and published to
through the default exchange (``''``) with the queue's name as routing key.
A ``routing_key`` without an ``exchange`` goes to ``default_exchange``.
"""
from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from numbers import Real
from typing import Any

from . import protocol
from .config import Config, QueueSpec
from .exceptions import OptionError


# --- checks: each raises TypeError (wrong kind) or OptionError (unusable value) ----

def _seconds(name, value):
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value):
        raise OptionError(f"{name} must be a finite number of seconds, got {value!r}")


def _datetime(name, value):
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")


def _seconds_or_datetime(name, value):
    if isinstance(value, datetime):
        return
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be seconds or a datetime, got {type(value).__name__}")
    _seconds(name, value)


def _positive_seconds(name, value):
    _seconds(name, value)
    if value <= 0:
        raise OptionError(f"{name} must be a positive number of seconds, got {value!r}")


def _priority(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
        raise OptionError(f"{name} must be an integer from 0 (highest) to 9 (lowest), "
                          f"got {value!r}")


def _string(name, value):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")


def _mapping(name, value):
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping, got {type(value).__name__}")


def _retries(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError(f"{name} must be a non-negative integer, got {value!r}")


def _signature(name, value):
    if not isinstance(value, Mapping) or not isinstance(value.get("task"), str):
        raise TypeError(f"{name} must be a signature (task.s(...)), got {value!r}")


def _signatures(name, value):
    for sig in ([value] if isinstance(value, Mapping) else value):
        _signature(name, sig)


def _option(check=None, default=None, *, task=False):
    """A field of SendOptions: its check (run when the value is not None) and whether a
    task attribute of the same name fills it in when the call leaves it out."""
    return field(default=default, metadata={"check": check, "task": task})


@dataclass(frozen=True, slots=True)
class SendOptions:
    """The options of one send (every keyword of ``apply_async`` but ``args``/``kwargs``).

    None means "not given": :meth:`resolved` fills it in from the task and the
    configuration. Every value is checked when the value is made.
    """

    #: Seconds from now: the earliest time to run (becomes ``eta``).
    countdown: float | None = _option(_seconds)
    #: The earliest time to run (naive = local time).
    eta: datetime | None = _option(_datetime)
    #: Seconds from now or a datetime: not run after this.
    expires: float | datetime | None = _option(_seconds_or_datetime)
    #: A registered serializer name; default: the task's, then ``default_serializer``.
    serializer: str | None = _option(_string, task=True)
    #: Where it goes (see the module doc); all three default to the task's.
    exchange: str | None = _option(_string)
    routing_key: str | None = _option(_string)
    queue: str | None = _option(_string)
    #: 0 (highest) to 9 (lowest); AMQP priority ``9 - priority`` on the wire.
    priority: int | None = _option(_priority, task=True)
    #: Raise UnroutableError when the message reaches no queue.
    mandatory: bool | None = _option(task=True)
    #: Raise NotDeliveredError when no worker consumes where it goes.
    immediate: bool | None = _option(task=True)
    #: Seconds to connect, when this send has to.
    connect_timeout: float | None = _option(_positive_seconds)
    #: A publisher from ``get_publisher()`` (pipelined confirms) to send with.
    publisher: Any = _option()
    #: A pika BlockingConnection to send on (a channel is opened and closed for the send).
    connection: Any = _option()
    #: The task id; default: a new UUID.
    task_id: str | None = _option(_string)
    #: Extra message headers (``self.request.headers`` in the task).
    headers: Mapping | None = _option(_mapping)
    #: Seconds; the worker kills the child past the hard one, raises in the task at the soft.
    time_limit: float | None = _option(_positive_seconds, task=True)
    soft_time_limit: float | None = _option(_positive_seconds, task=True)
    #: Send no reply queue: nobody can ``get()`` the result.
    ignore_result: bool | None = _option(task=True)
    #: How many times the task was retried already (the ``retries`` header).
    retries: int = _option(_retries, 0)
    #: Whether a send that failed for a connection reason is tried again.
    retry: bool = _option(default=True)
    #: Celery's keys: ``max_retries``, ``interval_start``, ``interval_step``, ``interval_max``.
    retry_policy: Mapping | None = _option(_mapping)
    # -- workflows (docs/workflows.md): Celery's names; signatures travel as dicts ---
    #: Signature(s) sent with this task's result as first argument when it succeeds.
    link: Any = _option(_signatures)
    #: Signature(s) sent with this task's id as argument when it fails.
    link_error: Any = _option(_signatures)
    #: The steps after this one, last step first (Celery's ``chain`` embed).
    chain: Any = _option(_signatures)
    #: The chord body this task is a header part of (with ``group_id``).
    chord: Any = _option(_signature)
    #: The group this task belongs to, and its place in it.
    group_id: str | None = _option(_string)
    group_index: int | None = _option(_retries)
    #: The first task of the workflow, and the task that sent this one.
    root_id: str | None = _option(_string)
    parent_id: str | None = _option(_string)

    def __post_init__(self):
        for name, check in _CHECKS:
            value = getattr(self, name)
            if value is not None:
                check(name, value)

    @classmethod
    def of(cls, options: Mapping[str, Any], caller: str = "send_task") -> SendOptions:
        """From keyword options; an unknown one raises TypeError naming it."""
        unknown = sorted(set(options) - _NAMES)
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
        return cls(**options)

    # -- resolution: call > task > configuration ----------------------------------
    def resolved(self, config: Config, task: Any = None,
                 now: datetime | None = None) -> SendOptions:
        """Everything decided: task attributes and ``default_serializer`` fill in what
        the call left out, ``countdown``/``expires`` seconds become datetimes (out of
        range: OptionError), and the task id is picked."""
        now = now or datetime.now(timezone.utc)
        changes = {name: getattr(task, name, None) for name in _FROM_TASK
                   if getattr(self, name) is None}
        if not _routed(self.queue, self.exchange, self.routing_key):
            changes.update(queue=getattr(task, "queue", None),
                           exchange=getattr(task, "exchange", None),
                           routing_key=getattr(task, "routing_key", None))
        if not (changes.get("serializer") or self.serializer):
            changes["serializer"] = config["default_serializer"]
        if self.countdown is not None:
            changes.update(countdown=None, eta=_after(now, self.countdown, "countdown"))
        if self.expires is not None and not isinstance(self.expires, datetime):
            changes["expires"] = _after(now, self.expires, "expires")
        for name in ("mandatory", "immediate", "ignore_result"):
            changes[name] = bool(changes.get(name, getattr(self, name)))
        changes["task_id"] = self.task_id or str(uuid.uuid4())
        return dataclasses.replace(self, **changes)

    def route(self, config: Config, task_name: str) -> Route:
        """Where the message goes (call it on resolved options)."""
        return resolve_route(config, task_name, queue=self.queue, exchange=self.exchange,
                             routing_key=self.routing_key)

    def encode(self, task_name: str, args, kwargs, reply_to: str | None = None
               ) -> protocol.OutgoingMessage:
        """The task message of these (resolved) options."""
        return protocol.encode_task(
            self.task_id, task_name, args or (), kwargs or {}, serializer=self.serializer,
            eta=self.eta, expires=self.expires, retries=self.retries,
            time_limit=self.time_limit, soft_time_limit=self.soft_time_limit,
            reply_to=reply_to, priority=amqp_priority(self.priority),
            ignore_result=self.ignore_result, extra_headers=self.headers,
            root_id=self.root_id, parent_id=self.parent_id, group=self.group_id,
            group_index=self.group_index, embed=self.embed())

    def embed(self) -> dict | None:
        """The workflow steps of the message body (plain dicts), or None."""
        def dicts(value):
            if value is None:
                return None
            return [_plain(value)] if isinstance(value, Mapping) else [_plain(v) for v in value]
        embed = {"callbacks": dicts(self.link), "errbacks": dicts(self.link_error),
                 "chain": dicts(self.chain),
                 "chord": None if self.chord is None else _plain(self.chord)}
        return embed if any(embed.values()) else None


def _plain(sig: Mapping) -> dict:
    """A signature as the plain dict that goes on the wire (Celery's layout)."""
    as_dict = getattr(sig, "as_dict", None)
    return as_dict() if as_dict is not None else dict(sig)


_FIELDS = dataclasses.fields(SendOptions)
_NAMES = frozenset(f.name for f in _FIELDS)
_CHECKS = tuple((f.name, f.metadata["check"]) for f in _FIELDS if f.metadata["check"])
_FROM_TASK = tuple(f.name for f in _FIELDS if f.metadata["task"])


def _after(now, seconds, option):
    """``now`` plus ``seconds``, or an OptionError naming ``option``."""
    try:
        return now + timedelta(seconds=seconds)
    except OverflowError:
        raise OptionError(f"{option}={seconds!r} seconds is out of range (a date must fall "
                          "between the years 1 and 9999)") from None


def amqp_priority(priority: int | None) -> int | None:
    """taskd priority 0 (highest) .. 9 (lowest) -> AMQP priority 9 .. 0."""
    if priority is None:
        return None
    _priority("priority", priority)
    return 9 - priority


# --- routing -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Route:
    exchange: str
    routing_key: str
    declare: tuple = ()   # QueueSpecs a publisher makes sure exist


def _routed(queue, exchange, routing_key):
    """Whether these routing options decide the route (else the next level does)."""
    return bool(queue) or exchange is not None or routing_key is not None


def auto_queue(name: str) -> QueueSpec:
    """The queue a Celery client would create for an unknown queue name."""
    return QueueSpec(name=name, exchange=name, binding_key=name)


def queue_spec(config: Config, name: str) -> QueueSpec:
    return config.queue(name) or auto_queue(name)


def default_exchange(config: Config) -> str:
    configured = config["default_exchange"]
    if configured:
        return configured
    if len(config.exchanges) == 1:
        return config.exchanges[0].name
    return queue_spec(config, config["default_queue"]).exchange


def resolve_route(config: Config, task_name: str, *, queue=None, exchange=None,
                  routing_key=None, task_queue=None, task_exchange=None,
                  task_routing_key=None) -> Route:
    """Decide exchange and routing key for one message (see the module doc)."""
    if _routed(queue, exchange, routing_key):                           # 1. the call
        return _route(config, task_name, queue, exchange, routing_key)
    if _routed(task_queue, task_exchange, task_routing_key):            # 2. the task
        return _route(config, task_name, task_queue, task_exchange, task_routing_key)
    route = config.route_for(task_name)                                 # 3. routes:
    if route is not None:
        return _route(config, task_name, route.queue, route.exchange, route.routing_key)
    return _via_queue(queue_spec(config, config["default_queue"]), config)  # 4. default


def _route(config, task_name, queue, exchange, routing_key) -> Route:
    if queue:
        return _via_queue(queue_spec(config, queue), config)
    if exchange is None:
        exchange = default_exchange(config)
    if routing_key is None:
        routing_key = task_name
    declare = tuple(q for q in config.queues if q.exchange == exchange)
    if not declare and exchange == config["default_queue"]:
        declare = (queue_spec(config, exchange),)
    return Route(exchange, routing_key, declare)


def _via_queue(spec: QueueSpec, config: Config) -> Route:
    exchange = config.exchange(spec.exchange)
    if exchange is None or exchange.type == "direct":
        # Direct: publish through the default exchange, as Celery does.
        if exchange is None or spec.binding_key == spec.name:
            return Route("", spec.name, (spec,))
    return Route(spec.exchange, spec.binding_key, (spec,))
