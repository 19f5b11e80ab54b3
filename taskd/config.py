"""Configuration: ``/etc/taskd.yaml``, validated completely before use.

One table of settings (:mod:`taskd.settings`) drives validation, the error
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
from dataclasses import dataclass, field

import yaml

from . import periodic
from .broker import tls as tls_mod
from .broker.nodes import Nodes, split_urls
from .exceptions import ConfigError
from .masking import mask_value
# The table of settings lives in taskd.settings; these names are part of this module's
# API too (``config.SETTINGS``, ``config.reference_markdown()``, ...).
from .settings import (  # noqa: F401
    DEAD_LETTER_QUEUE, DEFAULT_BROKER_URL, DEFAULT_QUEUE, EXCHANGE_TYPES, ITEM_SETTINGS,
    LOG_LEVELS, REPLY_TO_PATTERN, SETTINGS, Setting, parse_size, reference_markdown)

DEFAULT_PATH = "/etc/taskd.yaml"

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
        """The first node's URL (:attr:`broker_urls` has them all)."""
        return self.broker_urls[0]

    @property
    def broker_urls(self):
        """The URLs of the broker's nodes (``broker.url``: one, a list, or ``;``-separated)."""
        return split_urls(self.values["broker.url"])

    def nodes(self):
        """A new failover order over the broker's nodes (one per connection owner)."""
        return Nodes(self.broker_urls, self.values["broker.failover"])

    @property
    def system_queue_type(self):
        """``worker.system_queue_type`` resolved: ``auto`` is quorum for several nodes."""
        kind = self.values["worker.system_queue_type"]
        if kind == "auto":
            return "quorum" if len(self.broker_urls) > 1 else "classic"
        return kind

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
        elif top in ("exchanges", "queues", "routes", "schedule"):
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
    if environ.get("TASKD_RESULT_BACKEND"):
        value = chk.value(["result_backend"], _BY_KEY["result_backend"],
                          environ["TASKD_RESULT_BACKEND"])
        if value is not None:
            values["result_backend"] = value
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
    values["schedule"] = periodic.parse_schedule(data.get("schedule"), chk.error, exchange_names)
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
    for node_url in split_urls(url):
        problem = tls_mod.conflict(node_url, raw)
        if problem:
            chk.error(["broker", "tls"], problem)
            break
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
