"""Prometheus metrics and a health check, served by the supervisor.

``metrics.listen: "127.0.0.1:9808"`` (off by default) serves, over HTTP on the
supervisor's own asyncio loop:

* ``GET /metrics``: the Prometheus text format (``prometheus_client``, the
  ``metrics`` extra);
* ``GET /healthz``: ``200 ok`` while the worker consumes (connected, not
  stopping), ``503`` with the reason otherwise.

Only the supervisor counts: it sees every outcome, so there is one registry
and no multiprocess directory. Counts and timings come from the lifecycle hooks
(:mod:`taskd.worker.lifecycle`); gauges (tasks in progress, held ETAs,
children, the broker link) are read from the parts when scraped, so they cost
nothing between scrapes. Served from the loop rather than from a thread: the
gauges read the pool's and the dispatcher's state, which only the loop's thread
may touch, and a scrape of a few dozen series takes well under a millisecond.

Labels stay few: ``task`` is a name the children registered (any other name,
say a message for a task this worker does not have, counts as ``unknown``),
``queue`` one this worker consumes, ``outcome`` and ``reason`` fixed words.
Never arguments, never exception text. The names are the contract of
``docs/monitoring.md``; add, never rename.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Iterator, Optional

from ..exceptions import ConfigError
from .lifecycle import Observer

log = logging.getLogger("taskd.supervisor")

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
           900.0, 3600.0)
OUTCOMES = ("succeeded", "failed", "retried", "revoked", "expired", "dead_lettered")
UNKNOWN = "unknown"
RETRY_BIND = 5.0            # seconds between attempts to listen, when the port is taken
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192          # bytes of request line and headers


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(["metrics.listen is set, but prometheus_client is not installed: "
                           "install the metrics extra (pip install 'taskd-queue[metrics]')"]) from None
    return prometheus_client


def check_config(config: Any) -> list:
    """Errors that stop a worker with this configuration from serving metrics."""
    if config["metrics.listen"] is None:
        return []
    try:
        _prometheus()
    except ConfigError as exc:
        return exc.errors
    return []


class Metrics(Observer):
    """The metrics observer and its HTTP server. Reads ``pool`` (children, tasks
    running), ``dispatcher`` (held ETAs, the task names children registered),
    ``link`` (connected, blocked), ``shutdown`` (stopping) and ``counters``."""

    def __init__(self, listen: tuple, pool: Any, dispatcher: Any, link: Any, shutdown: Any,
                 counters: collections.Counter) -> None:
        prom = _prometheus()
        self.listen = listen
        self.pool, self.dispatcher, self.link, self.shutdown = pool, dispatcher, link, shutdown
        self.counters = counters
        prom.disable_created_metrics()      # no *_created series (this process only)
        self.registry = registry = prom.CollectorRegistry(auto_describe=True)
        self.prom = prom
        self.tasks = prom.Counter("taskd_tasks_total", "Tasks ended, by task, queue and outcome "
                                  "(" + ", ".join(OUTCOMES) + ").",
                                  ("task", "queue", "outcome"), registry=registry)
        self.runtime = prom.Histogram("taskd_task_runtime_seconds", "Time a task ran in its "
                                      "child, by task.", ("task",), buckets=BUCKETS,
                                      registry=registry)
        self.queue_wait = prom.Histogram(
            "taskd_task_queue_wait_seconds", "Time from the worker receiving a task (or its "
            "ETA falling due) to a child starting it, by task.", ("task",), buckets=BUCKETS,
            registry=registry)
        self.restarts = prom.Counter("taskd_child_restarts_total", "Children replaced, by "
                                     "reason.", ("reason",), registry=registry)
        self.reconnects = prom.Counter("taskd_broker_reconnects_total", "Connections to the "
                                       "broker made again after losing one.", registry=registry)
        registry.register(_Gauges(self))
        self._tasks: dict = {}          # (task, queue, outcome) -> labelled counter
        self._timings: dict = {}        # task -> (runtime, queue_wait) labelled histograms
        self._connections = 0
        self.server: Optional[asyncio.AbstractServer] = None
        self._retry: Optional[asyncio.TimerHandle] = None
        self._bind_failed = False

    # == counting ===========================================================================
    def task_label(self, job: Any) -> str:
        names = self.dispatcher.task_names
        name = job.request.name if job.request is not None else None
        return name if names is not None and name in names else UNKNOWN

    def count(self, job: Any, outcome: str) -> None:
        key = (self.task_label(job), job.queue, outcome)
        child = self._tasks.get(key)
        if child is None:
            child = self._tasks[key] = self.tasks.labels(*key)
        child.inc()

    def timings(self, job: Any) -> tuple:
        task = self.task_label(job)
        pair = self._timings.get(task)
        if pair is None:
            pair = self._timings[task] = (self.runtime.labels(task), self.queue_wait.labels(task))
        return pair

    # == the lifecycle hooks ===============================================================
    def received(self, job: Any) -> None:
        job.received_at = time.time()

    def started(self, job: Any, pid: int) -> None:
        received = getattr(job, "received_at", None)
        if received is None:
            return
        now = time.time()
        eta = job.request.eta
        since = max(received, eta.timestamp()) if eta is not None else received
        self.timings(job)[1].observe(max(0.0, now - since))

    def succeeded(self, job: Any, outcome: Any) -> None:
        self.count(job, "succeeded")
        self.timings(job)[0].observe(outcome.runtime)

    def failed(self, job: Any, outcome: Any = None, exc: Optional[BaseException] = None) -> None:
        self.count(job, "failed")
        if outcome is not None:
            self.timings(job)[0].observe(outcome.runtime)

    def retried(self, job: Any, outcome: Any) -> None:
        self.count(job, "retried")
        self.timings(job)[0].observe(outcome.runtime)

    def revoked(self, job: Any, reason: str, expired: bool = False,
                terminated: bool = False, signum: Optional[int] = None) -> None:
        self.count(job, "expired" if expired else "revoked")

    def dead_lettered(self, job: Any, reason: str) -> None:
        self.count(job, "dead_lettered")

    def child_exited(self, child: Any, cause: str) -> None:
        if cause != "retired":
            self.restarts.labels(cause).inc()

    def child_recycled(self, child: Any, why: str) -> None:
        self.restarts.labels(why).inc()

    def connected(self, publisher: Any) -> None:
        self._connections += 1
        if self._connections > 1:
            self.reconnects.inc()

    # == serving ==============================================================================
    def health(self) -> tuple[int, str]:
        """``(status, reason)`` of ``/healthz``: 200 only while consuming."""
        if self.shutdown.stopping:
            return 503, "stopping"
        if not self.link.connected:
            return 503, "not connected to the broker"
        return 200, "ok"

    async def start(self) -> None:
        """Listen on ``metrics.listen``; if the address is taken, say so and try again
        every :data:`RETRY_BIND` seconds (the worker runs meanwhile)."""
        self._retry = None
        host, port = self.listen
        try:
            self.server = await asyncio.start_server(self._serve, host, port)
        except OSError as exc:
            if not self._bind_failed:
                log.error("metrics: cannot listen on %s:%d (%s); trying again every %gs",
                          host, port, exc.strerror or exc, RETRY_BIND)
            self._bind_failed = True
            loop = asyncio.get_running_loop()
            self._retry = loop.call_later(RETRY_BIND, lambda: loop.create_task(self.start()))
            return
        if self._bind_failed:
            log.info("metrics: listening on %s:%d now", host, port)
        self._bind_failed = False

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            status, ctype, body = self.respond(method, path)
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                      503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` for a request."""
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, text, b"only GET\n"
        if path == "/metrics":
            return 200, self.prom.CONTENT_TYPE_LATEST, self.prom.generate_latest(self.registry)
        if path == "/healthz":
            status, reason = self.health()
            return status, text, reason.encode() + b"\n"
        return 404, text, b"taskd worker: /metrics, /healthz\n"


class _Gauges:
    """What is read from the parts at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> list:
        return []       # nothing to check for clashes: these names are fixed

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        m = self.m
        pool, link = m.pool, m.link
        yield GaugeMetricFamily("taskd_tasks_in_progress", "Tasks running in children now.",
                                value=len(pool.busy()))
        yield GaugeMetricFamily("taskd_eta_held", "Tasks held in the worker until their ETA.",
                                value=len(m.dispatcher.schedule))
        yield CounterMetricFamily("taskd_eta_parked", "Tasks parked in a delay queue (an ETA "
                                  "beyond worker.eta_horizon, or over worker.max_held).",
                                  value=m.counters["parked"])
        yield GaugeMetricFamily("taskd_children", "Child processes alive.",
                                value=len(pool.children))
        yield GaugeMetricFamily("taskd_broker_connected", "1 while connected and consuming.",
                                value=1 if link.connected else 0)
        publisher = link.publisher
        yield GaugeMetricFamily("taskd_publisher_blocked", "1 while the broker blocks the "
                                "publishing connection (a resource alarm).",
                                value=1 if publisher is not None and publisher.blocked else 0)


def parse_listen(value: str) -> Optional[tuple]:
    """``(host, port)`` from ``HOST:PORT`` (``[v6]:PORT`` for IPv6); None if malformed."""
    if not isinstance(value, str):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def for_config(config: Any, pool: Any, dispatcher: Any, link: Any, shutdown: Any,
               counters: collections.Counter) -> Optional[Metrics]:
    """The metrics observer, or None when ``metrics.listen`` is not set."""
    listen = config["metrics.listen"]
    if listen is None:
        return None
    return Metrics(parse_listen(listen), pool, dispatcher, link, shutdown, counters)
