"""The remote-control commands: what a worker answers to ``celery inspect``/``control``.

Each command is a function ``(view, **arguments) -> reply`` registered in
:data:`COMMANDS` with its kind (``inspect`` reads, ``control`` acts). The
replies use Celery's field names (``celery/worker/control.py``), because
Flower, celery-exporter and Celery's CLI read them: ``stats`` has ``total``,
``pid``, ``clock``, ``uptime``, ``pool``, ``broker``, ``prefetch_count`` and
``rusage``; a task is described as Celery's ``Request.info()``; a queue as
kombu's ``Queue.as_dict()``. A control command answers ``{"ok": text}`` or
``{"error": text}``. :func:`decode_command` checks a message before any of
this runs: JSON only, never pickle.

``view`` is the :class:`~taskd.worker.mailbox.Mailbox`: it holds the parts
the answers read (``host``: the supervisor, ``pool``, ``dispatcher``,
``consumer``, ``revoked``) through their public methods. A command that
must wait for the broker (``add_consumer``) returns a coroutine; the mailbox
replies once it is done.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import resource
import time
from typing import Any, Callable, Optional

import pika

from .. import __version__
from ..broker import topology
from ..masking import mask_value
from ..settings import SETTINGS, EXCHANGE_TYPES
from . import revokes

COMMANDS: dict = {}     # name -> (kind, function)
JSON = "application/json"
PICKLE = ("application/x-python-serialize", "application/python-pickle")


def command(kind: str, name: Optional[str] = None) -> Callable:
    def register(fn: Callable) -> Callable:
        COMMANDS[name or fn.__name__] = (kind, fn)
        return fn
    return register


def ok(text: str) -> dict:
    return {"ok": text}


def nok(text: str) -> dict:
    return {"error": text}


# == describing tasks and queues, as Celery does ============================================
def task_info(view: Any, job: Any, child: Any = None) -> dict:
    """A job as Celery's ``Request.info()``."""
    r = job.request
    started = None
    if child is not None and child.job is job and child.job_started is not None:
        started = time.time() - (time.monotonic() - child.job_started)
    return {"id": r.id, "name": r.name, "args": list(r.args), "kwargs": r.kwargs,
            "type": r.name, "hostname": view.hostname, "time_start": started,
            "acknowledged": False,
            "delivery_info": {"exchange": job.exchange, "routing_key": job.routing_key,
                              "priority": job.properties.priority,
                              "redelivered": job.redelivered},
            "worker_pid": child.pid if started is not None else None}


def _running(view: Any) -> list:
    return [(child, child.job) for child in view.pool.busy()]


def _reserved(view: Any) -> list:
    """Jobs received and not running nor held for an ETA: ready here, or sent in
    advance to a busy child."""
    jobs = [(None, job) for job in view.dispatcher.ready]
    for child in view.pool.busy():
        jobs += [(None, job) for job in child.queued]
    return jobs


def queue_info(config: Any, name: str) -> dict:
    """A consumed queue as kombu's ``Queue.as_dict(recurse=True)``."""
    spec = config.queue(name)
    exchange = spec.exchange if spec else name
    ex = config.exchange(exchange)
    arguments = (spec.arguments_for(config["worker.dead_letter_queue"]) if spec else None)
    return {
        "name": name,
        "exchange": {"name": exchange, "type": ex.type if ex else "direct", "arguments": None,
                     "durable": ex.durable if ex else True, "passive": False,
                     "auto_delete": False, "delivery_mode": None, "no_declare": False},
        "routing_key": spec.binding_key if spec else name,
        "queue_arguments": arguments, "binding_arguments": None, "consumer_arguments": None,
        "durable": spec.durable if spec else True, "exclusive": False, "auto_delete": False,
        "no_ack": False, "alias": None, "bindings": [], "no_declare": False,
        "expires": None, "message_ttl": None, "max_length": None, "max_length_bytes": None,
        "max_priority": spec.max_priority if spec else None,
    }


def broker_info(config: Any) -> dict:
    """The broker connection as kombu's ``Connection.info()``, without the password."""
    params = pika.URLParameters(config.broker_url)
    return {"hostname": params.host, "userid": params.credentials.username,
            "virtual_host": params.virtual_host, "port": params.port, "insist": False,
            "ssl": params.ssl_options is not None, "transport": "amqp",
            "connect_timeout": config["broker.connect_timeout"], "transport_options": {},
            "login_method": "PLAIN", "uri_prefix": None,
            "heartbeat": config["broker.heartbeat"], "failover_strategy": "round-robin",
            "alternates": []}


# == inspect ================================================================================
@command("inspect")
def ping(view: Any, **_: Any) -> dict:
    return ok("pong")


@command("inspect")
def clock(view: Any, **_: Any) -> dict:
    return {"clock": view.clock}


@command("inspect")
def stats(view: Any, **_: Any) -> dict:
    host, pool = view.host, view.pool
    cfg = host.config
    limits = (cfg["worker.soft_time_limit"] or 0, cfg["worker.time_limit"] or 0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "total": dict(view.dispatcher.total),
        "pid": os.getpid(),
        "clock": str(view.clock),
        "uptime": round(time.time() - host.started_at),
        "pool": {
            "implementation": "taskd.worker.pool:Pool",
            "max-concurrency": host.concurrency,
            "processes": sorted(c.pid for c in pool.serving()),
            "max-tasks-per-child": cfg["worker.max_tasks_per_child"] or "N/A",
            "put-guarded-by-semaphore": False,
            "timeouts": list(limits),
            "writes": "N/A",
        },
        "broker": broker_info(cfg),
        "prefetch_count": view.consumer.prefetch,
        "rusage": {name: getattr(usage, "ru_" + name) for name in (
            "utime", "stime", "maxrss", "ixrss", "idrss", "isrss", "minflt", "majflt",
            "nswap", "inblock", "oublock", "msgsnd", "msgrcv", "nsignals", "nvcsw",
            "nivcsw")},
        "sw_ident": "taskd", "sw_ver": __version__,
    }


@command("inspect")
def active(view: Any, **_: Any) -> list:
    return [task_info(view, job, child) for child, job in _running(view)]


@command("inspect")
def reserved(view: Any, **_: Any) -> list:
    return [task_info(view, job) for _, job in _reserved(view)]


@command("inspect")
def scheduled(view: Any, **_: Any) -> list:
    out = []
    for _, job in view.dispatcher.scheduled():
        eta = job.request.eta
        out.append({"eta": eta.isoformat() if eta else None,
                    "priority": job.properties.priority or 0,
                    "request": task_info(view, job)})
    return out


@command("inspect")
def revoked(view: Any, **_: Any) -> list:
    return view.revokes.revoked.ids()


@command("inspect")
def registered(view: Any, taskinfoitems: Any = None, **_: Any) -> list:
    names = view.dispatcher.task_names
    return sorted(names) if names is not None else []


@command("inspect")
def conf(view: Any, with_defaults: bool = False, **_: Any) -> dict:
    """The configuration, secrets masked (``broker.url``'s password, ``broker.tls``)."""
    cfg = view.host.config
    out = {}
    for setting in SETTINGS:
        value = cfg[setting.key]
        if not with_defaults and value == setting.default:
            continue
        if setting.key == "broker.tls":
            value = None if value is None else "(set)"
        elif isinstance(value, tuple):
            value = list(value)
        out[setting.key] = mask_value(setting.key, value)
    return out


@command("inspect")
def active_queues(view: Any, **_: Any) -> list:
    return [queue_info(view.host.config, name) for name in view.consumer.queues]


@command("inspect")
def query_task(view: Any, ids: Any = (), **_: Any) -> dict:
    wanted = set(revokes.task_ids(ids))
    found = {}
    held = [(None, job) for _, job in view.dispatcher.scheduled()]
    for state, jobs in (("active", _running(view)), ("reserved", _reserved(view)),
                        ("scheduled", held)):
        for child, job in jobs:
            if job.task_id in wanted and job.task_id not in found:
                found[job.task_id] = [state, task_info(view, job, child)]
    return found


# == control ================================================================================
@command("control")
def revoke(view: Any, task_id: Any = None, terminate: bool = False, signal: Any = None,
           **extra: Any) -> dict:
    ids = revokes.task_ids(task_id)
    signame = signal or "SIGTERM"
    signum = revokes.signal_number(signame) if terminate else None
    terminated = view.revokes.revoke(ids, terminate=bool(terminate), signum=signum,
                             persisted=bool(extra.get("persisted")))
    if terminate:
        return ok("terminate: " + (", ".join(terminated) if terminated else "tasks unknown"))
    return ok(f"tasks {', '.join(ids)} flagged as revoked")


@command("control")
def terminate(view: Any, signal: Any = None, task_id: Any = None, **_: Any) -> dict:
    return revoke(view, task_id, terminate=True, signal=signal)


@command("control")
def add_consumer(view: Any, queue: Any = None, exchange: Any = None,
                 exchange_type: Any = None, routing_key: Any = None, **_: Any) -> Any:
    if not isinstance(queue, str) or not queue:
        return nok("add_consumer needs a queue name")
    if not view.consumer.is_open or view.host.shutdown.stopping:
        return nok("not consuming now (connecting to the broker, or stopping)")
    exchange_type = exchange_type or "direct"
    if exchange_type not in EXCHANGE_TYPES:
        return nok(f"exchange_type must be one of {', '.join(EXCHANGE_TYPES)}")
    ops = []
    if exchange and view.host.config.queue(queue) is None:
        ops = [topology.DeclareExchange(exchange, exchange_type),
               topology.DeclareQueue(queue), topology.Bind(queue, exchange, routing_key or queue)]

    async def add() -> dict:
        if not await view.consumer.add_queue(queue, ops):
            return ok(f"already consuming from {queue}")
        view.host.queues = view.consumer.queues
        return ok(f"add consumer {queue}")
    return add()


@command("control")
def cancel_consumer(view: Any, queue: Any = None, **_: Any) -> Any:
    if not isinstance(queue, str) or not queue:
        return nok("cancel_consumer needs a queue name")
    if not view.consumer.is_open or view.host.shutdown.stopping:
        return nok("not consuming now (connecting to the broker, or stopping)")
    if queue in view.consumer.queues and len(view.consumer.queues) == 1:
        return nok(f"{queue} is the only queue consumed: not cancelled (stop the worker "
                   "instead)")

    async def cancel() -> dict:
        if not await view.consumer.cancel_queue(queue):
            return nok(f"not consuming from {queue}")
        view.host.queues = view.consumer.queues
        return ok(f"no longer consuming from {queue}")
    return cancel()


def _count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a whole number >= 1, got {n!r}")
    return n


@command("control")
def pool_grow(view: Any, n: Any = 1, **_: Any) -> dict:
    for _ in range(_count(n)):
        view.host.handle_ttin()
    return ok(f"pool will grow (concurrency {view.host.concurrency})")


@command("control")
def pool_shrink(view: Any, n: Any = 1, **_: Any) -> dict:
    n = _count(n)
    if view.host.concurrency - n < 1:
        return nok(f"cannot shrink below one child (concurrency {view.host.concurrency})")
    for _ in range(n):
        view.host.handle_ttou()
    return ok(f"pool will shrink (concurrency {view.host.concurrency})")


@command("control")
def shutdown(view: Any, **_: Any) -> dict:
    view.host.handle_term()
    return ok("shutting down (warm: running tasks finish)")


# == decoding (pure) ============================================================================
def decode_json(content_type: Optional[str], body: bytes) -> Any:
    """``body`` as JSON; ValueError naming the problem (pickle is refused)."""
    if content_type != JSON:
        if content_type in PICKLE or "pickle" in str(content_type):
            raise ValueError(f"pickle ({content_type}) refused: remote control reads JSON "
                             "only (a pickle from the broker would run code)")
        raise ValueError(f"content type {content_type!r} refused: remote control reads "
                         "JSON only")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None


def decode_command(content_type: Optional[str], body: bytes) -> dict:
    """A control message, checked: ValueError naming the first problem."""
    message = decode_json(content_type, body)
    if not isinstance(message, dict):
        raise ValueError(f"expected a JSON object, got {type(message).__name__}")
    name = message.get("method")
    if not isinstance(name, str) or not name:
        raise ValueError("no command: 'method' must be a non-empty string")
    arguments = message.get("arguments") or {}
    if not isinstance(arguments, dict) or not all(
            isinstance(k, str) and k.isidentifier() for k in arguments):
        raise ValueError(f"command {name[:100]!r}: 'arguments' must be an object of names")
    destination = message.get("destination")
    if destination is not None and not (isinstance(destination, list)
                                        and all(isinstance(d, str) for d in destination)):
        raise ValueError(f"command {name[:100]!r}: 'destination' must be a list of names")
    for key in ("pattern", "matcher"):
        if message.get(key) is not None and not isinstance(message[key], str):
            raise ValueError(f"command {name[:100]!r}: {key!r} must be a string")
    reply_to = message.get("reply_to")
    if reply_to is not None and not (
            isinstance(reply_to, dict) and isinstance(reply_to.get("exchange"), str)
            and isinstance(reply_to.get("routing_key"), str)):
        raise ValueError(f"command {name[:100]!r}: 'reply_to' must be "
                         "{exchange, routing_key}")
    return {"method": name, "arguments": arguments, "destination": destination,
            "pattern": message.get("pattern"), "matcher": message.get("matcher"),
            "ticket": message.get("ticket"), "reply_to": reply_to}


def brief(arguments: dict) -> str:
    text = json.dumps(arguments, default=repr)
    return text if len(text) <= 300 else text[:297] + "..."


def jsonable(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)
