"""Configuration: ``/etc/taskd.yaml``, validated completely before use.

One table of settings (:data:`SETTINGS`, plus :data:`ITEM_SETTINGS` for the
entries of ``exchanges:`` and ``queues:``) drives validation, the error
messages, the defaults and the configuration reference in ``docs/``
(``taskd config-reference`` prints it). Every error names the key, the line
of the file and what was expected; all errors are reported at once.

The file is found as ``--config FILE``, else ``$TASKD_CONFIG``, else
``/etc/taskd.yaml``. ``$TASKD_BROKER_URL`` overrides ``broker.url`` so that
credentials can stay out of the file.
"""
from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from .broker import tls as tls_mod
from .exceptions import ConfigError
from .masking import mask_value

DEFAULT_PATH = "/etc/taskd.yaml"
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


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    check: Callable[[Any], tuple]
    default: Any
    doc: str
    expected: str = ""


SETTINGS = (
    Setting("broker.url", _str, DEFAULT_BROKER_URL,
            "AMQP URL of the RabbitMQ broker. `$TASKD_BROKER_URL` overrides it."),
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
            "Tasks a child holds at once. 1: only the one it runs. 2: one more waits in its "
            "pipe, so the child never waits for the supervisor between tasks (more throughput "
            "for short tasks); but that task may wait behind a long one, and a warm shutdown "
            "runs it too."),
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
    Setting("logging.level", _choice(*LOG_LEVELS), "info",
            "Log level: " + ", ".join(LOG_LEVELS) + " (`--loglevel` overrides)."),
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
    "routes": (
        Setting("exchange", _str, None, "Exchange to publish to."),
        Setting("routing_key", _str, None, "Routing key to publish with."),
        Setting("queue", _str, None, "Queue: its exchange and binding key are used."),
    ),
}

_BY_KEY = {s.key: s for s in SETTINGS}
_SECTIONS = {k.split(".")[0] for k in _BY_KEY if "." in k}


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: str = "direct"
    durable: bool = True


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    exchange: str
    binding_key: str
    max_priority: int | None = None
    durable: bool = True
    queue_type: str = "classic"
    delivery_limit: int | None = None

    @property
    def quorum(self):
        return self.queue_type == "quorum"

    def arguments_for(self, dead_letter_queue=DEAD_LETTER_QUEUE):
        """The queue's ``x-`` arguments (None for a plain classic queue, as Celery declares)."""
        args = {}
        if self.max_priority:
            args["x-max-priority"] = self.max_priority
        if self.quorum:
            args["x-queue-type"] = "quorum"
            args["x-dead-letter-exchange"] = ""
            args["x-dead-letter-routing-key"] = dead_letter_queue
            if self.delivery_limit:
                args["x-delivery-limit"] = self.delivery_limit
        return args or None

    @property
    def arguments(self):
        return self.arguments_for()


@dataclass(frozen=True, slots=True)
class RouteSpec:
    pattern: str
    exchange: str | None = None
    routing_key: str | None = None
    queue: str | None = None


@dataclass(frozen=True)
class Config:
    """A validated configuration. ``values`` maps every dotted key to its value."""

    values: dict = field(repr=False)
    exchanges: tuple = ()
    queues: tuple = ()
    routes: tuple = ()
    source: str = "<defaults>"

    def __getitem__(self, key):
        return self.values[key]

    @property
    def broker_url(self):
        return self.values["broker.url"]

    def exchange(self, name):
        for ex in self.exchanges:
            if ex.name == name:
                return ex
        return None

    def queue(self, name):
        for q in self.queues:
            if q.name == name:
                return q
        return None

    def route_for(self, task_name):
        for route in self.routes:
            if fnmatch.fnmatchcase(task_name, route.pattern):
                return route
        return None

    def worker_queues(self):
        names = self.values["worker.queues"] or tuple(q.name for q in self.queues)
        return names


# --- loading -------------------------------------------------------------------

def _line_map(node, path=(), out=None):
    """Map key paths (tuples) to 1-based line numbers from a composed YAML tree."""
    if out is None:
        out = {}
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)
    return out


class _Checker:
    def __init__(self, lines, source):
        self.lines, self.source, self.errors = lines, source, []

    def error(self, path, message):
        line = self.lines.get(tuple(path))
        where = f" (line {line})" if line else ""
        name = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")
        self.errors.append(f"{name or '<top>'}{where}: {message}")

    def value(self, path, setting, raw):
        value, expected = setting.check(raw)
        if expected:
            self.error(path, f"expected {expected}, got {mask_value(setting.key, raw)!r}")
        return value


def validate(data, lines=None, source="<dict>", environ=None) -> Config:
    """Validate a loaded mapping; returns a :class:`Config` or raises ConfigError."""
    environ = os.environ if environ is None else environ
    chk = _Checker(lines or {}, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"<top>: expected a mapping of settings, got {type(data).__name__}"], source)
    values = {s.key: s.default for s in SETTINGS}
    for top, raw in data.items():
        if top in _SECTIONS:
            if not isinstance(raw, dict):
                chk.error([top], f"expected a mapping, got {raw!r}")
                continue
            for sub, sub_raw in raw.items():
                key = f"{top}.{sub}"
                if key not in _BY_KEY:
                    known = ", ".join(k.split(".", 1)[1] for k in _BY_KEY if k.startswith(top + "."))
                    chk.error([top, sub], f"unknown setting (known in {top}: {known})")
                    continue
                if key in ITEM_SETTINGS:       # a nested mapping, checked below
                    continue
                value = chk.value([top, sub], _BY_KEY[key], sub_raw)
                if value is not None or sub_raw is None:
                    values[key] = value
        elif top in ("exchanges", "queues", "routes"):
            continue
        elif top in _BY_KEY:
            value = chk.value([top], _BY_KEY[top], raw)
            if value is not None:
                values[top] = value
        else:
            chk.error([top], "unknown setting (known: " + ", ".join(sorted(
                {k.split(".")[0] for k in _BY_KEY})) + ")")
    if environ.get("TASKD_BROKER_URL"):
        values["broker.url"] = environ["TASKD_BROKER_URL"]
    broker = data.get("broker")
    values["broker.tls"] = _tls(chk, broker.get("tls") if isinstance(broker, dict) else None,
                                values["broker.url"])

    exchanges = _items(chk, data.get("exchanges"), "exchanges", ExchangeSpec)
    queues = _items(chk, data.get("queues"), "queues", None)
    exchange_names = {e.name for e in exchanges}
    queue_specs = []
    for i, q in enumerate(queues):
        ex = q.get("exchange") or q["name"]
        if q.get("exchange") and ex not in exchange_names:
            chk.error(["queues", i, "exchange"], f"exchange {ex!r} is not listed under exchanges:")
        if q.get("max_priority") and q["max_priority"] > 255:
            chk.error(["queues", i, "max_priority"], "expected at most 255")
        if q.get("queue_type") == "quorum":
            if q.get("max_priority"):
                chk.error(["queues", i, "max_priority"], "quorum queues have no priorities")
            if q.get("durable") is False:
                chk.error(["queues", i, "durable"], "quorum queues are always durable")
        queue_specs.append(QueueSpec(name=q["name"], exchange=ex,
                                     binding_key=q.get("binding_key") or q["name"],
                                     max_priority=q.get("max_priority"),
                                     durable=q.get("durable", True),
                                     queue_type=q.get("queue_type") or "classic",
                                     delivery_limit=q.get("delivery_limit")))
    routes = _routes(chk, data.get("routes"), exchange_names, {q.name for q in queue_specs})
    _cross_checks(chk, values, queue_specs)
    _check_duplicates(chk, exchanges, "exchanges")
    _check_duplicates(chk, queue_specs, "queues")
    if chk.errors:
        raise ConfigError(chk.errors, source)
    return Config(values=values, exchanges=tuple(exchanges), queues=tuple(queue_specs),
                  routes=tuple(routes), source=source)


def _items(chk, raw, section, spec_cls):
    if raw is None:
        return []
    if not isinstance(raw, list):
        chk.error([section], f"expected a list of mappings, got {raw!r}")
        return []
    table = {s.key: s for s in ITEM_SETTINGS[section]}
    result = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            chk.error([section, i], f"expected a mapping with at least 'name', got {item!r}")
            continue
        entry, ok = {}, True
        for key, value in item.items():
            if key not in table:
                chk.error([section, i, key], "unknown key (known: " + ", ".join(table) + ")")
                ok = False
                continue
            checked = chk.value([section, i, key], table[key], value)
            ok = ok and checked is not None
            entry[key] = checked
        if "name" not in item:
            chk.error([section, i], "missing required key 'name'")
            ok = False
        if ok:
            for s in table.values():
                entry.setdefault(s.key, s.default)
            result.append(spec_cls(**entry) if spec_cls else entry)
    return result


def _tls(chk, raw, url):
    """``broker.tls``: None when absent, else TLSSettings whose files all load."""
    if raw is None:
        return None
    table = {s.key: s for s in ITEM_SETTINGS["broker.tls"]}
    if not isinstance(raw, dict):
        chk.error(["broker", "tls"], f"expected a mapping of {', '.join(table)}, got {raw!r}")
        return None
    entry, errors = {}, len(chk.errors)
    for key, value in raw.items():
        if key not in table:
            chk.error(["broker", "tls", key], "unknown key (known: " + ", ".join(table) + ")")
        else:
            entry[key] = chk.value(["broker", "tls", key], table[key], value)
    if entry.get("key_file") and not entry.get("cert_file"):
        chk.error(["broker", "tls", "key_file"], "needs cert_file, the certificate of this key")
    if entry.get("key_password") and not entry.get("cert_file"):
        chk.error(["broker", "tls", "key_password"],
                  "is the password of the key of cert_file, which is not set")
    problem = tls_mod.conflict(url, raw)
    if problem:
        chk.error(["broker", "tls"], problem)
    if len(chk.errors) > errors:
        return None
    settings = tls_mod.TLSSettings(**{k: v for k, v in entry.items() if v is not None})
    try:
        settings.context()
    except tls_mod.TLSFileError as exc:
        chk.error(["broker", "tls", exc.key], str(exc))
        return None
    return settings


def _routes(chk, raw, exchange_names, queue_names):
    if raw is None:
        return []
    if not isinstance(raw, dict):
        chk.error(["routes"], f"expected a mapping of task name glob -> route, got {raw!r}")
        return []
    table = {s.key: s for s in ITEM_SETTINGS["routes"]}
    routes = []
    for pattern, spec in raw.items():
        if isinstance(spec, str):   # shorthand: "tasks.x": queue_name
            spec = {"queue": spec}
        if not isinstance(spec, dict) or not spec:
            chk.error(["routes", pattern], "expected {exchange, routing_key} or {queue}")
            continue
        entry = {}
        for key, value in spec.items():
            if key not in table:
                chk.error(["routes", pattern, key], "unknown key (known: exchange, routing_key, queue)")
                continue
            entry[key] = chk.value(["routes", pattern, key], table[key], value)
        if entry.get("queue") and entry["queue"] not in queue_names and queue_names:
            chk.error(["routes", pattern, "queue"], f"queue {entry['queue']!r} is not listed under queues:")
        if entry.get("exchange") and entry["exchange"] not in exchange_names:
            chk.error(["routes", pattern, "exchange"],
                      f"exchange {entry['exchange']!r} is not listed under exchanges:")
        routes.append(RouteSpec(pattern=str(pattern), **entry))
    return routes


def _cross_checks(chk, values, queues):
    names = {q.name for q in queues} or {DEFAULT_QUEUE}
    for name in values["worker.queues"] or ():
        if name not in names:
            chk.error(["worker", "queues"], f"queue {name!r} is not listed under queues:")
    hard, soft = values["worker.time_limit"], values["worker.soft_time_limit"]
    if hard and soft and soft >= hard:
        chk.error(["worker", "soft_time_limit"], f"must be below worker.time_limit ({hard:g})")


def _check_duplicates(chk, items, section):
    seen = set()
    for i, item in enumerate(items):
        if item.name in seen:
            chk.error([section, i, "name"], f"duplicate name {item.name!r}")
        seen.add(item.name)


def load(path=None, environ=None) -> Config:
    """Load and validate the configuration file; raises ConfigError."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("TASKD_CONFIG") or DEFAULT_PATH
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"cannot read the configuration file: {exc.strerror}"], path) from None
    return loads(text, source=path, environ=environ)


def loads(text, source="<string>", environ=None) -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}not valid YAML: {problem}"], source) from None
    lines = _line_map(node) if node is not None else {}
    return validate(data, lines, source, environ)


def from_defaults(broker_url=None, environ=None) -> Config:
    data = {"broker": {"url": broker_url}} if broker_url else {}
    return validate(data, source="<defaults>", environ=environ if broker_url is None else {})


def effective_queues(config):
    """The queues to declare: the configured ones, else Celery's default ``celery``."""
    if config.queues:
        return config.queues
    return (QueueSpec(name=DEFAULT_QUEUE, exchange=DEFAULT_QUEUE, binding_key=DEFAULT_QUEUE),)


def reference_markdown():
    """The configuration reference, generated from the settings table."""
    out = ["# Configuration reference", "",
           "Generated from `taskd/config.py` by `taskd config-reference`; do not edit by hand.",
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
