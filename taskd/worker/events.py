"""Celery events: what the worker does, published for Flower, celery-exporter and ``celery events``.

``taskd worker -E`` (``worker.send_events: true``) turns them on. The protocol is
Celery's (``celery/events/``), so tools written for Celery read taskd workers
unchanged:

* a durable ``topic`` exchange named ``celeryev``; each message is JSON
  (``application/json``, utf-8), non-persistent, with a ``hostname`` header;
* an event is an object with ``type`` (``task-received`` ...), ``hostname``
  (the node name, ``worker.hostname``, default ``taskd@<host>``), ``timestamp``
  (seconds since the epoch), ``utcoffset`` (hours, as Celery counts them:
  positive west of UTC), ``pid`` (the supervisor's), ``clock`` (a Lamport clock)
  and the fields of its type, Celery's names: ``uuid``, ``name``, ``args``,
  ``kwargs`` (reprs), ``retries``, ``eta``, ``expires``, ``root_id``,
  ``parent_id`` (received); ``result`` (a repr) and ``runtime`` (succeeded);
  ``exception`` and ``traceback`` (failed, retried); ``expired``,
  ``terminated``, ``signum`` (revoked); ``requeue`` (rejected: taskd's
  dead-lettering);
* worker events go one per message, routing key ``worker.online``,
  ``worker.heartbeat`` (every 2 s: ``freq``, ``active``, ``processed``,
  ``loadavg``, ``sw_ident``, ``sw_ver``, ``sw_sys``), ``worker.offline``;
* task events are batched as Celery's prefork worker batches them: a JSON
  list in one message, routing key ``task.multi``, sent :data:`FLUSH_DELAY`
  after the first event of the batch (Celery flushes once per turn of its
  loop; a short window instead of a turn sends one message per window rather
  than one per task at high rates). Celery's receiver (and so Flower and celery-exporter) takes
  both forms; a consumer binding ``task.succeeded`` alone would see nothing,
  with Celery's workers too. Bind ``#`` or ``task.#``.

Events are best effort, as in Celery. They go on a channel of their own on
the worker's publishing connection, without confirms (the results and copies
beside them keep theirs), and never hold up a delivery: they are encoded and
published in a batch after the delivery path has moved on. While the broker is away up
to :data:`BUFFER` events wait and go out after the reconnect (older ones are
dropped first); while the broker blocks the connection (a resource alarm)
events are dropped. Drops are counted (``taskd status``: ``events_dropped``).
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import platform
import re
import reprlib
import socket
import time
from typing import Any, Optional

import pika

from .. import __version__, serialization
from .lifecycle import Observer

log = logging.getLogger("taskd.supervisor")

EXCHANGE = "celeryev"
HEARTBEAT_FREQ = 2.0        # seconds, Celery's default
BUFFER = 10000              # events kept while the broker is away
BATCH = 500                 # task events per task.multi message at most
FLUSH_DELAY = 0.02          # seconds a task event waits for others to share its message
REPR_LIMIT = 1024           # characters of an args/kwargs/result repr (Celery: 1024)
DECODE_LIMIT = 1 << 16      # results larger than this are not decoded for their repr
SOFTWARE = {"sw_ident": "taskd", "sw_ver": __version__, "sw_sys": platform.system()}

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 256
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 32


def node_name(value: Optional[str] = None, host: Optional[str] = None) -> str:
    """The worker's node name: ``value`` (``worker.hostname`` or ``-n``) with Celery's
    ``%h`` (host name), ``%n`` (its first label) and ``%d`` (the domain) expanded;
    default ``taskd@%h``."""
    host = host or socket.gethostname()
    name, _, domain = host.partition(".")
    table = {"%h": host, "%n": name, "%d": domain, "%%": "%"}
    return re.sub(r"%[hnd%]", lambda m: table[m.group(0)], value or "taskd@%h")


def utcoffset(now: Optional[float] = None) -> int:
    """Celery's ``utcoffset()``: the local offset to UTC in whole hours, positive west."""
    return (time.altzone if time.localtime(now).tm_isdst else time.timezone) // 3600


_SCALARS = (int, float, bool, type(None))


def bounded_repr(value: Any) -> str:
    """A repr of at most :data:`REPR_LIMIT` characters (containers and long strings cut)."""
    text = repr(value) if type(value) in _SCALARS else _repr.repr(value)
    return text if len(text) <= REPR_LIMIT else text[:REPR_LIMIT - 3] + "..."


class Events(Observer):
    """The events observer. ``pool`` is read for the tasks running (heartbeat),
    ``counters`` gets ``events_dropped``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, hostname: str, pool: Any,
                 counters: collections.Counter, freq: float = HEARTBEAT_FREQ) -> None:
        self.loop, self.hostname, self.pool, self.counters = loop, hostname, pool, counters
        self.freq = freq
        self.pid = os.getpid()
        self.clock = 0
        self.processed = 0                  # tasks started (Celery's all_total_count)
        self.channel: Any = None            # pika channel for events, once open
        self.publisher: Any = None          # the AsyncChannel whose connection it is on
        self.pending: collections.deque = collections.deque(maxlen=BUFFER)   # JSON texts
        self._flush: Optional[asyncio.TimerHandle] = None
        self._heartbeat: Optional[asyncio.TimerHandle] = None
        self.properties = pika.BasicProperties(content_type="application/json",
                                               content_encoding="utf-8", delivery_mode=1,
                                               headers={"hostname": hostname})
        self._common = ""                   # the fields every task event shares, as JSON
        self._set_offset(utcoffset())

    # == events ===========================================================================
    def event(self, type_: str, fields: dict) -> dict:
        """An event as Celery makes one (``celery.events.Event`` plus the dispatcher's
        fields)."""
        self.clock += 1
        fields.update(type=type_, hostname=self.hostname, timestamp=time.time(),
                      utcoffset=self.offset, pid=self.pid, clock=self.clock)
        return fields

    def task(self, type_: str, job: Any, fields: str = "") -> None:
        """Queue a task event (``fields``: its own fields, as JSON members each after a
        comma); those of the next :data:`FLUSH_DELAY` go out together. Task events are
        written as JSON text here, not as dicts for ``json``: they are most of the cost
        of events, and this is about three times cheaper (see ``bench/monitoring.py``)."""
        self.clock += 1
        if len(self.pending) == BUFFER:     # the oldest goes
            self.counters["events_dropped"] += 1
        self.pending.append(f'{{"type":"{type_}","uuid":{_json(job.task_id)},"timestamp":'
                            f'{time.time()!r},"clock":{self.clock}{self._common}{fields}}}')
        if self._flush is None and self.channel is not None:
            self._flush = self.loop.call_later(FLUSH_DELAY, self.flush)

    def _set_offset(self, offset: int) -> None:
        self.offset = offset
        self._common = (f',"hostname":{_json(self.hostname)},"utcoffset":{offset:d},'
                        f'"pid":{self.pid:d}')

    def worker(self, type_: str) -> None:
        """Publish a worker event now (with the task events queued before it)."""
        self.flush()
        fields = {"freq": self.freq, "active": len(self.pool.busy()),
                  "processed": self.processed, "loadavg": _loadavg(), **SOFTWARE}
        self._publish("worker." + type_.split("-", 1)[1], _dumps(self.event(type_, fields)))

    def flush(self) -> None:
        """Publish the task events queued: lists of up to :data:`BATCH`, ``task.multi``."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        pending = self.pending
        while pending and self.channel is not None and self.channel.is_open:
            batch = [pending.popleft() for _ in range(min(BATCH, len(pending)))]
            self._publish("task.multi", "[" + ",".join(batch) + "]", len(batch))

    def _publish(self, routing_key: str, text: str, events: int = 1) -> None:
        """Publish one message (unconfirmed); dropped, and counted, when the channel is
        gone or the broker blocks the connection."""
        channel = self.channel
        if channel is None or not channel.is_open or self.publisher.blocked:
            self.counters["events_dropped"] += events
            return
        channel.basic_publish(EXCHANGE, routing_key, text.encode(), self.properties)

    # == the lifecycle hooks ================================================================
    def received(self, job: Any) -> None:
        r = job.request
        headers = r.headers
        args, kwargs = headers.get("argsrepr"), headers.get("kwargsrepr")
        args = args[:REPR_LIMIT] if isinstance(args, str) else bounded_repr(r.args)
        kwargs = kwargs[:REPR_LIMIT] if isinstance(kwargs, str) else bounded_repr(r.kwargs)
        eta, expires = r.eta, r.expires
        self.task("task-received", job,
                  f',"name":{_json(r.name)},"args":{_json(args)},"kwargs":{_json(kwargs)},'
                  f'"root_id":{_json(r.root_id)},"parent_id":{_json(r.parent_id)},'
                  f'"retries":{_json(r.retries)},'
                  f'"eta":{_json(eta and eta.isoformat())},'
                  f'"expires":{_json(expires and expires.isoformat())}')

    def started(self, job: Any, pid: int) -> None:
        self.processed += 1
        self.task("task-started", job)

    def succeeded(self, job: Any, outcome: Any) -> None:
        self.task("task-succeeded", job, f',"result":{_json(result_repr(outcome))},'
                                         f'"runtime":{_json(outcome.runtime)}')

    def failed(self, job: Any, outcome: Any = None, exc: Optional[BaseException] = None) -> None:
        exception, traceback = (failure_of(outcome) if outcome is not None
                                else (_exc_repr(type(exc).__name__, list(exc.args)),
                                      f"{type(exc).__name__}: {exc}\n"))
        self.task("task-failed", job,
                  f',"exception":{_json(exception)},"traceback":{_json(traceback)}')

    def retried(self, job: Any, outcome: Any) -> None:
        exception, traceback = failure_of(outcome)
        self.task("task-retried", job,
                  f',"exception":{_json(exception)},"traceback":{_json(traceback)}')

    def revoked(self, job: Any, reason: str, expired: bool = False,
                terminated: bool = False, signum: Optional[int] = None) -> None:
        self.task("task-revoked", job, f',"terminated":{_json(terminated)},'
                                       f'"signum":{_json(signum)},"expired":{_json(expired)}')

    def dead_lettered(self, job: Any, reason: str) -> None:
        self.task("task-rejected", job, ',"requeue":false')

    def connected(self, publisher: Any) -> None:
        """Open the events channel on the publishing connection, declare ``celeryev``,
        then send worker-online, the events that waited, and start the heartbeat."""
        self.publisher = publisher

        def declared(_frame: Any, channel: Any) -> None:
            if publisher is not self.publisher:
                return                      # a later connection replaced this one
            self.channel = channel
            self.worker("worker-online")
            self._beat()

        def opened(channel: Any) -> None:
            channel.add_on_close_callback(self._channel_closed)
            channel.exchange_declare(EXCHANGE, "topic", durable=True,
                                     callback=lambda frame: declared(frame, channel))
        try:
            publisher.connection.channel(on_open_callback=opened)
        except Exception:       # the connection went meanwhile: the next connect tries again
            log.warning("could not open the events channel", exc_info=True)

    def _channel_closed(self, channel: Any, reason: Any) -> None:
        if channel is self.channel or self.channel is None:
            self.channel = None
            self._stop_beat()
            if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
                log.warning("events: the broker closed the events channel (%s); no events "
                            "are sent until the worker reconnects", reason)

    def disconnected(self) -> None:
        self.channel = self.publisher = None
        self._stop_beat()

    def stopping(self) -> None:
        if self.channel is not None:
            self.worker("worker-offline")
        self._stop_beat()

    def close(self) -> None:
        self._stop_beat()

    # == the heartbeat =======================================================================
    def _beat(self) -> None:
        self._stop_beat()
        self._heartbeat = self.loop.call_later(self.freq, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        self._heartbeat = None
        if self.channel is None:
            return
        self._set_offset(utcoffset())
        self.worker("worker-heartbeat")
        self._beat()

    def _stop_beat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None


_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode
_loads = json.JSONDecoder().decode
_string = json.encoder.encode_basestring_ascii      # a str as JSON (C; ASCII-safe)


def _json(value: Any) -> str:
    """``value`` as JSON text: the scalars of task events quickly, anything else by
    ``json``; a float that JSON cannot carry (nan, inf) becomes null."""
    kind = type(value)
    if kind is str:
        return _string(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return float.__repr__(value) if math.isfinite(value) else "null"
    return _dumps(value)


def _loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [0.0, 0.0, 0.0]


def _meta(outcome: Any) -> Optional[dict]:
    """The decoded result message of ``outcome`` (None when too large or undecodable)."""
    if len(outcome.body) > DECODE_LIMIT:
        return None
    try:
        if outcome.content_type == "application/json":     # for a repr: plain JSON will do
            meta = _loads(bytes(outcome.body).decode())
        else:
            meta = serialization.loads(outcome.body, outcome.content_type,
                                       outcome.content_encoding)
    except Exception:
        return None
    return meta if isinstance(meta, dict) else None


def result_repr(outcome: Any) -> str:
    """Celery's ``result`` field: a repr of the return value, bounded."""
    meta = _meta(outcome)
    if meta is None:
        return f"<{len(outcome.body)} bytes of {outcome.content_type}>"
    return bounded_repr(meta.get("result"))


def _exc_repr(exc_type: Any, args: Any) -> str:
    if isinstance(args, (list, tuple)):
        return f"{exc_type}({', '.join(bounded_repr(a) for a in args)})"[:REPR_LIMIT]
    return f"{exc_type}({bounded_repr(args)})"[:REPR_LIMIT]


def failure_of(outcome: Any) -> tuple[str, str]:
    """``(exception, traceback)`` as Celery's task-failed carries them: the exception's
    repr (``ValueError('boom')``) and the traceback's text."""
    meta = _meta(outcome)
    result = meta.get("result") if meta else None
    if isinstance(result, dict) and "exc_type" in result:
        exception = _exc_repr(result.get("exc_type"), result.get("exc_message"))
    else:
        exception = outcome.error or "?"
    traceback = meta.get("traceback") if meta else None
    return exception, traceback if isinstance(traceback, str) else (outcome.error or "")


def for_config(config: Any, hostname: str, loop: asyncio.AbstractEventLoop, pool: Any,
               counters: collections.Counter) -> Optional[Events]:
    """The events observer (for the node ``hostname``), or None when
    ``worker.send_events`` is off."""
    if not config["worker.send_events"]:
        return None
    return Events(loop, hostname, pool, counters)

