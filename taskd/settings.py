"""The settings table: every key of the configuration, its check, default and meaning.

One table (:data:`SETTINGS`, plus :data:`ITEM_SETTINGS` for the entries of
``exchanges:``, ``queues:``, ``routes:`` and ``broker.tls:``) drives the
validation in :mod:`taskd.config`, its error messages, the defaults, and the
configuration reference in ``docs/configuration.md`` (:func:`reference_markdown`,
printed by ``taskd config-reference``). No metaclass: a new setting is one
:class:`Setting` row here.

Each check takes the raw value from YAML and returns ``(value, None)`` or
``(None, "what was expected")``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_QUEUE = "celery"   # Celery's default queue, exchange and routing key
DEAD_LETTER_QUEUE = "taskd.dead"
# Reply queues a worker publishes results to: taskd's (taskd.reply.<uuid>), Celery's
# rpc backend (a bare uuid, kombu's oid) and RabbitMQ's direct reply-to.
REPLY_TO_PATTERN = (r"taskd\.reply\.[0-9A-Za-z._-]+"
                    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
                    r"|amq\.rabbitmq\.reply-to(\..+)?")
EXCHANGE_TYPES = ("direct", "topic", "fanout")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# --- value checkers: each returns (value, None) or (None, "what was expected") --

def _str(v):
    return (v, None) if isinstance(v, str) and v else (None, "a non-empty string")


def _int(minimum):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            return None, f"an integer >= {minimum}"
        return v, None
    return check


def _number(minimum=0.0, allow_none=False):
    def check(v):
        if v is None and allow_none:
            return None, None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= minimum:
            return None, f"a number > {minimum:g}" + (" or null" if allow_none else "")
        return float(v), None
    return check


def _seconds_or_off(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        return None, "a number of seconds >= 0 (0: off)"
    return float(v), None


def _bool(v):
    return (v, None) if isinstance(v, bool) else (None, "true or false")


def _readable_file(v):
    if not isinstance(v, str) or not v:
        return None, "the path of a readable file"
    try:
        with open(v, "rb"):
            return v, None
    except OSError as exc:
        return None, f"the path of a readable file ({exc.strerror})"


def _urls(v):
    """``broker.url``: one URL, ``;``-separated URLs, or a list of URLs."""
    if isinstance(v, str) and v.strip(" ;"):
        return v, None
    if isinstance(v, list) and v and all(isinstance(i, str) and i.strip() for i in v):
        return tuple(i.strip() for i in v), None
    return None, "a URL, URLs separated by ';', or a list of URLs"


def _choice(*choices):
    def check(v):
        return (v, None) if v in choices else (None, "one of " + ", ".join(choices))
    return check


def _regex(v):
    if not isinstance(v, str) or not v:
        return None, "a regular expression"
    try:
        re.compile(v)
    except re.error as exc:
        return None, f"a regular expression ({exc})"
    return v, None


def _listen(v):
    """``HOST:PORT`` to listen on (``[::1]:9808`` for IPv6), or null for off."""
    expected = "HOST:PORT such as 127.0.0.1:9808, or null for off"
    if v is None:
        return None, None
    if not isinstance(v, str):
        return None, expected
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None, expected
    return v, None


def _str_list(v):
    if isinstance(v, str):
        v = [p.strip() for p in v.split(",") if p.strip()]
    if not isinstance(v, list) or not all(isinstance(i, str) and i for i in v):
        return None, "a list of non-empty strings"
    return tuple(v), None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}


def parse_size(v):
    """Bytes from an int or a string such as ``512MiB``, ``1.5GB``, ``0`` (= no limit)."""
    if isinstance(v, bool):
        return None, "a size such as 512MiB, or 0 for no limit"
    if isinstance(v, int) and v >= 0:
        return v, None
    if isinstance(v, str):
        m = _SIZE.match(v)
        if m and (m.group(2) or "").lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]), None
    return None, "a size such as 512MiB, or 0 for no limit"


def _result_backend(v):
    from .stores import check_url
    return check_url(v)


def _dashboard_listen(v):
    value, _expected = _listen(v)
    return (value, None) if value else (None, "HOST:PORT, e.g. 127.0.0.1:8080")


DEFAULT_DASHBOARD_DATABASE = "sqlite:////var/lib/taskd/dashboard.sqlite3"


def _database_url(v):
    if isinstance(v, str) and re.match(r"^(sqlite:///.+|postgresql(\+psycopg)?://.+)$", v):
        return v, None
    return None, "sqlite:///PATH or postgresql://USER@HOST/DB"


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    check: Callable[[Any], tuple]
    default: Any
    doc: str
    expected: str = ""


SETTINGS = (
    Setting("broker.url", _urls, DEFAULT_BROKER_URL,
            "AMQP URL of the RabbitMQ broker; for a cluster, a list of the nodes' URLs or "
            "one string of URLs separated by `;` (`docs/clusters.md`). "
            "`$TASKD_BROKER_URL` overrides it."),
    # -- clusters (issue 18) --
    Setting("broker.failover", _choice("round-robin", "shuffle"), "round-robin",
            "Order in which the nodes of `broker.url` are tried: `round-robin` (as listed, "
            "starting after the node that failed last) or `shuffle` (a random order per "
            "process, to spread clients over the cluster). A lost node goes to the back."),
    Setting("worker.system_queue_type", _choice("auto", "classic", "quorum"), "auto",
            "Type of the queues taskd declares for itself (`worker.dead_letter_queue`, the "
            "delay queues): `quorum` survives the loss of a cluster node; `auto` is "
            "`quorum` when `broker.url` lists several nodes, else `classic`. Changing it "
            "for existing queues needs them deleted first (`docs/clusters.md`)."),
    # -- end clusters --
    Setting("broker.connect_timeout", _number(), 4.0,
            "Seconds to establish a connection (TCP and AMQP handshake) before giving up."),
    Setting("broker.heartbeat", _int(0), 60,
            "AMQP heartbeat interval in seconds (0 turns heartbeats off)."),
    Setting("broker.retry_for", _number(), 300.0,
            "Seconds the worker keeps trying to reach the broker, at start and after losing "
            "it, before it exits with code 69."),
    Setting("broker.retry_max_interval", _number(), 10.0,
            "Longest pause between two connection attempts (exponential back-off with jitter)."),
    Setting("broker.tls", None, None,
            "TLS settings: `{ca_file, cert_file, key_file, key_password, verify, "
            "server_hostname}` (see below; `docs/tls.md`). Needs an `amqps://` URL. "
            "Certificates and host names are verified, also for an `amqps://` URL "
            "without this setting."),
    Setting("broker.publish_retries", _int(0), 3,
            "Client: how many times a send that failed for a connection reason is tried "
            "again on a new connection before `apply_async` raises (`retry_policy` "
            "overrides it per call)."),
    Setting("imports", _str_list, (),
            "Modules the worker's children import to find the tasks (e.g. `[tasks]`)."),
    Setting("serializer_modules", _str_list, (),
            "Modules that register custom serializers; imported by the worker and by "
            "`App(config=...)` before anything is encoded or decoded."),
    Setting("default_serializer", _str, "json",
            "Serializer for task messages when neither the call nor the task names one."),
    Setting("accept_content", _str_list, ("json",),
            "Serializer names or content types the worker decodes; anything else is "
            "dead-lettered. Add `pickle` only if every publisher is trusted."),
    Setting("result_accept_content", _str_list, None,
            "Client: serializer names or content types of results it decodes (null: "
            "`accept_content`). A result of any other type becomes a FAILURE without "
            "being decoded. Add `pickle` only if everyone who can publish to the reply "
            "queue is trusted."),
    # -- result stores (docs/results.md) --
    Setting("result_backend", _result_backend, "rpc://",
            "Where results go: `rpc://` (to the caller's reply queue, read once by the "
            "sender), `redis://HOST:PORT/DB` (extra `redis`; Celery's layout) or "
            "`postgresql://USER:PASS@HOST/DB?table=NAME` (extra `postgres`; a jsonb table, "
            "default `taskd_results`). `$TASKD_RESULT_BACKEND` and `App(backend=)` override "
            "it. Workers and clients must name the same store."),
    Setting("result_expires", _int(0), 86400,
            "Seconds a stored result is kept (0: kept until forgotten). Redis expires keys "
            "itself; PostgreSQL rows are deleted by the workers."),
    Setting("track_started", _bool, False,
            "Store the STARTED state (with the worker's name and the child's pid) when a "
            "task starts; a task's `track_started` attribute overrides it."),
    Setting("result_extended", _bool, False,
            "Store the task's name, args, kwargs, worker, retries and queue with its result "
            "(Celery's `result_extended`)."),
    Setting("worker.result_buffer", parse_size, 64 * 1024**2,
            "While the result store is down, finished tasks' results wait in the supervisor "
            "(their deliveries unacknowledged) up to this many bytes; beyond it no new task "
            "is started until the store is back. Nothing is dropped."),
    Setting("default_queue", _str, DEFAULT_QUEUE,
            "Queue for tasks that no call option, task attribute or route places elsewhere. "
            "If it is not listed under `queues:` it is a durable queue bound to a direct "
            "exchange of the same name, as Celery declares it."),
    Setting("default_exchange", _str, None,
            "Exchange used when a call gives a `routing_key` but no `exchange`. Default: "
            "the only exchange listed under `exchanges:`, else `default_queue`'s exchange."),
    Setting("exchanges", None, (),
            "Exchanges to declare: a list of `{name, type, durable}` (see below)."),
    Setting("queues", None, (),
            "Queues to declare and bind: a list of `{name, exchange, binding_key, ...}` "
            "(see below). When empty, the single queue `celery` is used."),
    Setting("routes", None, {},
            "Task name glob -> `{exchange, routing_key, queue}`: where tasks are sent."),
    Setting("worker.queues", _str_list, (),
            "Queues this worker consumes (`-Q` overrides). Empty: every configured queue."),
    Setting("worker.concurrency", _int(1), os.cpu_count() or 1,
            "Number of child processes (`-c` overrides). Default: the number of CPUs."),
    Setting("worker.prefetch_multiplier", _int(1), 4,
            "Unacknowledged messages held per child: QoS = concurrency x this. Running "
            "tasks count (acks come after completion): raise it (e.g. 16) for many short "
            "tasks, lower it to 1 for long tasks shared by several workers."),
    Setting("worker.child_prefetch", _int(1), 1,
            "Tasks a child holds at once. 1: the one it runs (and one short task more, when "
            "the adaptive window allows: `child_prefetch_adaptive`). 2: one more waits in its "
            "pipe, so the child never waits for the supervisor between tasks (more throughput "
            "for short tasks); but that task may wait behind a long one, and a warm shutdown "
            "runs it too."),
    Setting("worker.child_prefetch_adaptive", _seconds_or_off, 0.02,
            "With `child_prefetch` 1: the adaptive window. A child running a task whose name "
            "ran under this many seconds in its last 3 runs (and not longer in the last "
            "minute), and which has run less than this so far, is written one more such "
            "short task ahead, so that it never waits for the supervisor between short "
            "tasks. A long task never gets a task queued behind it. 0: off (strictly one "
            "task per child). See docs/benchmarks.md."),
    Setting("worker.prefetch_multiplier_short", _int(0), 16,
            "The prefetch multiplier while the adaptive window finds every recent task short "
            "(its last 20 runs, none longer than `child_prefetch_adaptive` in the last "
            "minute): QoS = concurrency x this, so that the children are never starved of "
            "short tasks. One long run returns the QoS to `prefetch_multiplier` at once "
            "(messages received before stay with this worker). Not above "
            "`prefetch_multiplier`, or with `async_concurrency` > 1: no effect."),
    Setting("worker.max_tasks_per_child", _int(0), 0,
            "Replace a child after this many tasks (0: never)."),
    Setting("worker.max_memory_per_child", parse_size, 0,
            "Replace a child after a task leaves its memory above this (e.g. `512MiB`; "
            "0: never): its RSS, or, once that is over, its USS (what it shares with the "
            "supervisor since the fork does not count)."),
    Setting("worker.time_limit", _number(allow_none=True), None,
            "Hard time limit per task, in seconds: the child is killed past it (null: none)."),
    Setting("worker.soft_time_limit", _number(allow_none=True), None,
            "Soft time limit per task, in seconds: the task gets SoftTimeLimitExceeded."),
    Setting("worker.max_deliveries", _int(1), 3,
            "Attempts of a task whose child died before it is dead-lettered."),
    Setting("worker.shutdown_timeout", _number(), 60.0,
            "Seconds a warm shutdown (SIGTERM) waits for running tasks."),
    Setting("worker.eta_horizon", _number(), 600.0,
            "Tasks due within this many seconds are held in the worker; later ones are "
            "parked in the broker's delay queues (keep it well below RabbitMQ's "
            "consumer_timeout, 30 min by default)."),
    Setting("worker.max_held", _int(0), 10000,
            "At most this many ETA tasks held in the worker; beyond it they are parked "
            "even when due soon (0: park everything due in a second or more)."),
    Setting("worker.delay_queue_prefix", _str, "taskd.delay",
            "Name prefix of the delay exchanges and queues that park ETA tasks."),
    Setting("worker.dead_letter_queue", _str, DEAD_LETTER_QUEUE,
            "Queue receiving messages that cannot be processed, with the reason in headers."),
    Setting("worker.max_message_size", parse_size, 16 * 1024**2,
            "Larger task messages are dead-lettered without being decoded (0: no limit)."),
    Setting("worker.max_result_size", parse_size, 16 * 1024**2,
            "Larger results are not sent: the caller gets a FAILURE \"result too large\" "
            "instead (0: no limit). Keep it at or below the broker's `max_message_size` "
            "(16 MiB by default from RabbitMQ 4.0); a lower limit the broker reports when it "
            "refuses a result is used from then on."),
    Setting("worker.reply_to_pattern", _regex, REPLY_TO_PATTERN,
            "Regular expression a task's `reply_to` must match (whole) for the worker to "
            "publish its result there; results for any other queue are not sent (logged). "
            "The default matches taskd's and Celery's reply queues and RabbitMQ's direct "
            "reply-to."),
    Setting("worker.control_socket", _str, "/run/taskd/taskd.sock",
            "Unix socket `taskd status` talks to (mode 0600)."),
    # -- periodic tasks (docs/periodic.md) --
    Setting("schedule", None, {},
            "Periodic tasks: entry name -> `{task, every | cron, timezone, args, kwargs, "
            "options, misfire}` (see below; `docs/periodic.md`). `cron` needs the `cron` "
            "extra."),
    Setting("worker.beat", _bool, True,
            "This worker may lead the `schedule:` (one worker leads at a time, elected "
            "through RabbitMQ). A worker with no entries never leads."),
    Setting("worker.beat_queue", _str, "taskd.beat",
            "The queue that elects the leader (single active consumer) and keeps each "
            "entry's position. Workers that share a schedule must share this name."),
    # -- the node name (issue 16; the events and the remote control use it) --
    Setting("worker.hostname", _str, None,
            "The worker's node name (`-n` overrides), as Celery's `-n`: what `celery "
            "inspect`, `taskd inspect` and monitors show, and what `-d/--destination` "
            "picks, and the `hostname` of every event. `%h` is the host name, `%n` its first "
            "label, `%d` its domain. Default: `taskd@%h`. Give each worker on one broker "
            "its own. Read at start."),
    # -- remote control and revoke (issue 16; docs/remote-control.md) --
    Setting("worker.remote_control", _bool, True,
            "Answer Celery's remote-control commands (`celery inspect`, `celery control`, "
            "`taskd inspect`, `taskd control`) and honour revokes. Anyone who may publish "
            "on the vhost can send them: see docs/remote-control.md. `false`: no control "
            "queue, and revokes are not honoured."),
    Setting("worker.control_exchange", _str, "celery",
            "Name space of the remote-control exchanges, as Celery's `control_exchange`: "
            "commands come on `<this>.pidbox` (fanout), replies go to `reply.<this>.pidbox`."),
    Setting("worker.revoke_ttl", _number(), 10800.0,
            "Seconds a revoke is honoured, also by workers started after it was sent (it "
            "is kept in the broker, in `worker.revoke_stream`)."),
    Setting("worker.revokes_max", _int(1), 50000,
            "At most this many revoked task ids are kept in each worker (the oldest are "
            "forgotten first), as Celery's `CELERY_WORKER_REVOKES_MAX`."),
    Setting("worker.revoke_stream", _str, "taskd.revoked",
            "RabbitMQ stream (`x-queue-type: stream`) that keeps revokes for "
            "`worker.revoke_ttl`; each worker replays it at start. Clients and workers "
            "must name the same one."),
    # -- events and metrics (docs/monitoring.md) --
    Setting("worker.send_events", _bool, False,
            "Publish Celery events (task-received/started/succeeded/failed/retried/revoked/"
            "rejected, worker-online/heartbeat/offline) to the `celeryev` exchange, for "
            "Flower and celery-exporter (`-E` turns it on). Best effort, unconfirmed. Read "
            "at start: a reload does not change it."),
    Setting("metrics.listen", _listen, None,
            "`HOST:PORT` where the supervisor serves `/metrics` (Prometheus text format; "
            "needs the `metrics` extra) and `/healthz` (200 while consuming, else 503). "
            "Default: off. Keep it on a private address: it has no authentication. Read at "
            "start."),
    # -- async def tasks and the test mode (docs/asyncio.md, docs/testing.md) --
    Setting("worker.async_concurrency", _int(1), 1,
            "Coroutines (`async def` tasks) each child runs at once on its event loop. The "
            "worker's prefetch becomes concurrency x this x `prefetch_multiplier`. Above 1, "
            "a plain `def` task in the same worker runs on the loop's thread and holds up "
            "the coroutines while it runs: give such tasks their own worker."),
    Setting("worker.async_block_warning", _seconds_or_off, 1.0,
            "Log a warning naming the task when a coroutine keeps its child's event loop "
            "this many seconds without awaiting (0: never)."),
    Setting("task_always_eager", _bool, False,
            "Client: run every task in the calling process instead of sending it (for "
            "tests; `with app.testing():` does it for a block). The message is still "
            "encoded, routed and decoded as it would be for a worker."),
    Setting("task_eager_propagates", _bool, False,
            "Client, in the test mode: a task that fails raises its exception from the "
            "call itself (`delay`, `apply_async`) instead of only from `get()`."),
    Setting("logging.level", _choice(*LOG_LEVELS), "info",
            "Log level: " + ", ".join(LOG_LEVELS) + " (`--loglevel` overrides)."),
    # --- dashboard (taskd dashboard; docs/dashboard.md) ---------------------------
    Setting("dashboard.listen", _dashboard_listen, "127.0.0.1:8080",
            "`HOST:PORT` the dashboard serves on (`--listen` overrides). Reading is open "
            "only on a loopback address; on any other address every page needs the admin "
            "token."),
    Setting("dashboard.database", _database_url, DEFAULT_DASHBOARD_DATABASE,
            "Where the dashboard keeps task history: `sqlite:///PATH` (embedded) or "
            "`postgresql://USER@HOST/DB` (needs psycopg 3)."),
    Setting("dashboard.admin_token", _str, None,
            "Token that unlocks actions (and reading, off loopback). "
            "`$TASKD_DASHBOARD_TOKEN` overrides it. Null: no actions. Never printed."),
    Setting("dashboard.event_queue", _str, "taskd.dashboard.events",
            "Durable queue bound to the `celeryev` exchange that the dashboard consumes "
            "events from; events sent while the dashboard is down wait there."),
    Setting("dashboard.event_queue_max_length", _int(0), 1_000_000,
            "At most this many events wait in the event queue while the dashboard is down "
            "(`x-max-length`, oldest dropped first; 0: no limit)."),
    Setting("dashboard.retention", _number(), 7 * 86400.0,
            "Seconds of task history kept; older tasks are pruned."),
    Setting("dashboard.max_tasks", _int(1000), 1_000_000,
            "At most this many tasks kept in history; the oldest are pruned past it."),
)

ITEM_SETTINGS = {
    "exchanges": (
        Setting("name", _str, None, "Exchange name (required)."),
        Setting("type", _choice(*EXCHANGE_TYPES), "direct", "direct, topic or fanout."),
        Setting("durable", _bool, True, "Survives a broker restart."),
    ),
    "queues": (
        Setting("name", _str, None, "Queue name (required)."),
        Setting("exchange", _str, None,
                "Exchange to bind to; default: a direct exchange named like the queue."),
        Setting("binding_key", _str, None, "Binding key; default: the queue name."),
        Setting("max_priority", _int(1), None,
                "Enables priorities on this queue (`x-max-priority`, at most 255)."),
        Setting("durable", _bool, True, "Survives a broker restart."),
        Setting("queue_type", _choice("classic", "quorum"), "classic",
                "`quorum` for a replicated quorum queue (RabbitMQ cluster): the broker "
                "counts redeliveries (`x-delivery-count`) and dead-letters to "
                "`worker.dead_letter_queue` past `delivery_limit`. No `max_priority`."),
        Setting("delivery_limit", _int(1), None,
                "Quorum queues: the broker's own delivery limit (`x-delivery-limit`). "
                "Keep it above `worker.max_deliveries` so taskd reports first."),
    ),
    "broker.tls": (
        Setting("ca_file", _readable_file, None,
                "PEM file of the CA certificates that signed the broker's certificate. "
                "Default: the system's trust store."),
        Setting("cert_file", _readable_file, None,
                "Client certificate (PEM) for brokers that require one; may also hold the key."),
        Setting("key_file", _readable_file, None, "Private key (PEM) of `cert_file`."),
        Setting("key_password", _str, None,
                "Password of an encrypted `key_file`. Never printed."),
        Setting("verify", _bool, True,
                "Verify the broker's certificate and host name. `false` is logged as a "
                "warning at every connection: the broker is then not authenticated."),
        Setting("server_hostname", _str, None,
                "Name the broker's certificate must carry (and sent as SNI). Default: the "
                "host of `broker.url`."),
    ),
    "schedule": (
        Setting("task", _str, None, "Task name (required)."),
        Setting("every", None, None,
                "Seconds between runs (>= 1), at multiples of it since 1970-01-01 UTC. "
                "Give `every` or `cron`, not both."),
        Setting("cron", None, None,
                "Five cron fields, `minute hour day-of-month month day-of-week`, read in "
                "`timezone`, e.g. `\"*/5 * * * *\"`."),
        Setting("timezone", None, "UTC",
                "IANA time zone of `cron` (e.g. `Europe/Berlin`); DST-correct. No effect "
                "on `every`."),
        Setting("args", None, [], "Positional arguments (a list)."),
        Setting("kwargs", None, {}, "Keyword arguments (a mapping)."),
        Setting("options", None, {},
                "`{queue, routing_key, exchange, expires, priority}` as in `apply_async`; "
                "`expires` counts from the firing."),
        Setting("misfire", None, "run_once",
                "After a gap (no leader, or a late leader): `run_once` runs the latest "
                "missed slot once; `skip` runs it only if at most 10 s late."),
    ),
    "routes": (
        Setting("exchange", _str, None, "Exchange to publish to."),
        Setting("routing_key", _str, None, "Routing key to publish with."),
        Setting("queue", _str, None, "Queue: its exchange and binding key are used."),
    ),
}


def reference_markdown():
    """The configuration reference, generated from the settings table."""
    out = ["# Configuration reference", "",
           "Generated from `taskd/settings.py` by `taskd config-reference`; do not edit by hand.",
           "", "| key | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = s.default
        if s.key == "worker.concurrency":
            default = "number of CPUs"
        cell = _fmt(default).replace("|", "\\|")     # a pipe in a table cell: escaped
        out.append(f"| `{s.key}` | `{cell}` | {s.doc} |")
    for section, table in ITEM_SETTINGS.items():
        out += ["", f"## Entries of `{section}:`", "", "| key | default | meaning |", "|---|---|---|"]
        for s in table:
            out.append(f"| `{s.key}` | `{_fmt(s.default)}` | {s.doc} |")
    return "\n".join(out) + "\n"


def _fmt(value):
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
