"""``taskd inspect`` and ``taskd control``: remote control from the command line.

The commands go to the workers over the broker (:mod:`taskd.control`), so they
reach every worker on the vhost (or those named with ``-d``), taskd and Celery
workers alike. Answers print as tables, or as JSON with ``--json``
(``{node: answer}``, Celery's field names). Exit codes: 0 when every worker
that answered succeeded, 1 when one answered with an error, 69 when no worker
answered within ``--timeout``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Optional

from .app import App
from .exceptions import ConfigError, TaskdError

EX_UNAVAILABLE, EX_CONFIG, EX_USAGE = 69, 78, 64

INSPECT = {
    "ping": "ask each worker for a pong",
    "stats": "PID, uptime, pool, broker, prefetch, tasks run by name",
    "active": "tasks running now",
    "scheduled": "tasks held for their ETA",
    "reserved": "tasks received and waiting for a child",
    "revoked": "task ids revoked (kept worker.revoke_ttl seconds)",
    "registered": "task names the children know",
    "conf": "the configuration (secrets masked; --with-defaults for every key)",
    "active_queues": "queues consumed",
    "query_task": "where the given task ids are: active, reserved or scheduled",
}
CONTROL = {
    "revoke": "ID... [--terminate [--signal SIG]]: never run these tasks (kept for "
              "worker.revoke_ttl seconds, also for workers started later)",
    "add_consumer": "QUEUE [EXCHANGE [TYPE [ROUTING_KEY]]]: consume one more queue",
    "cancel_consumer": "QUEUE: stop consuming a queue",
    "pool_grow": "[N]: N more children (default 1)",
    "pool_shrink": "[N]: N children fewer (default 1)",
    "shutdown": "warm shutdown (as SIGTERM)",
}


def _table(kind: str, commands: dict) -> str:
    width = max(map(len, commands))
    return f"{kind} commands:\n" + "\n".join(f"  {name:<{width}}  {text}"
                                             for name, text in commands.items())


def add_parsers(sub: Any, config_arg: Callable) -> None:
    """Add ``inspect`` and ``control`` to the ``taskd`` parser."""
    for kind, commands, about in (
            ("inspect", INSPECT, "ask the workers about their state"),
            ("control", CONTROL, "tell the workers to do something (revoke, queues, pool)")):
        p = sub.add_parser(kind, help=about, description=f"{about[0].upper()}{about[1:]}, "
                           "over the broker (Celery's remote-control protocol): every "
                           "worker on the vhost answers, or those named with -d.",
                           epilog=_table(kind, commands),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        config_arg(p)
        p.add_argument("name", choices=list(commands), metavar="COMMAND",
                       help="one of: " + ", ".join(commands))
        p.add_argument("args", nargs="*", metavar="ARG", help="the command's arguments")
        p.add_argument("-d", "--destination", metavar="NODE,NODE",
                       help="only these workers (node names, comma-separated)")
        p.add_argument("--timeout", type=_seconds, default=1.0,
                       help="seconds to wait for answers (default 1)")
        p.add_argument("--json", action="store_true", help="print {node: answer} as JSON")
        if kind == "inspect":
            p.add_argument("--with-defaults", action="store_true",
                           help="conf: every key, also those left at their default")
        else:
            p.add_argument("--terminate", action="store_true",
                           help="revoke: also signal the child running the task")
            p.add_argument("--signal", default="SIGTERM",
                           help="revoke --terminate: the signal (default SIGTERM)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected more than 0 seconds, got {text!r}")
    return value


def _usage(kind: str, message: str) -> int:
    print(f"taskd {kind}: {message}", file=sys.stderr)
    return EX_USAGE


def run(args: Any) -> int:
    """``taskd inspect|control``. The broker is the configuration's (``--config``, else
    ``$TASKD_CONFIG``, else /etc/taskd.yaml if it exists, else the defaults), as for
    ``taskd call``; ``$TASKD_BROKER_URL`` overrides it."""
    kind = args.command
    destination = [d.strip() for d in args.destination.split(",") if d.strip()] \
        if args.destination else None
    try:
        app = App(config=args.config, set_as_current=False) if args.config \
            else App.from_environment()
    except ConfigError as exc:
        for error in exc.errors:
            print(f"taskd: {exc.source}: {error}", file=sys.stderr)
        return EX_CONFIG
    try:
        if kind == "inspect":
            answers = _inspect(app, args, destination)
        else:
            answers = _control(app, args, destination)
    except _UsageError as exc:
        return _usage(kind, str(exc))
    except (TaskdError, ConfigError, ValueError) as exc:
        print(f"taskd {kind}: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE if isinstance(exc, TaskdError) else EX_USAGE
    if not answers:
        where = f" among {', '.join(destination)}" if destination else ""
        print(f"taskd {kind}: no worker answered{where} within {args.timeout:g}s",
              file=sys.stderr)
        return EX_UNAVAILABLE
    if args.json:
        print(json.dumps(answers, indent=2, sort_keys=True, default=str))
    else:
        print(format_answers(args.name, answers))
    failed = any(isinstance(a, dict) and "error" in a for a in answers.values())
    return 1 if failed else 0


class _UsageError(Exception):
    pass


def _inspect(app: Any, args: Any, destination: Optional[list]) -> dict:
    command, extra = args.name, args.args
    if command == "query_task":
        if not extra:
            raise _UsageError("query_task needs at least one task id")
    elif extra:
        raise _UsageError(f"{command} takes no arguments (got {' '.join(extra)})")
    inspect = app.control.inspect(destination=destination, timeout=args.timeout)
    if command == "query_task":
        return inspect.query_task(*extra) or {}
    if command == "conf":
        return inspect.conf(with_defaults=args.with_defaults) or {}
    return getattr(inspect, command)() or {}


def _control(app: Any, args: Any, destination: Optional[list]) -> dict:
    command, extra, control = args.name, args.args, app.control
    common = {"destination": destination, "reply": True, "timeout": args.timeout}
    if command == "revoke":
        if not extra:
            raise _UsageError("revoke needs at least one task id")
        replies = control.revoke(extra, terminate=args.terminate, signal=args.signal, **common)
    elif command in ("add_consumer", "cancel_consumer"):
        most = 4 if command == "add_consumer" else 1
        if not 1 <= len(extra) <= most:
            raise _UsageError(f"{command} takes {CONTROL[command].split(':')[0]}")
        if command == "add_consumer":
            names = ("queue", "exchange", "exchange_type", "routing_key")
            replies = control.add_consumer(**dict(zip(names, extra)), **common)
        else:
            replies = control.cancel_consumer(extra[0], **common)
    elif command in ("pool_grow", "pool_shrink"):
        if len(extra) > 1 or (extra and not extra[0].isdigit()) or extra == ["0"]:
            raise _UsageError(f"{command} takes [N], a whole number of children >= 1")
        replies = getattr(control, command)(int(extra[0]) if extra else 1, **common)
    else:
        if extra:
            raise _UsageError(f"{command} takes no arguments (got {' '.join(extra)})")
        replies = control.shutdown(**common)
    nodes: dict = {}
    for reply in replies or ():
        nodes.update(reply)
    return nodes


# == tables ===============================================================================
def _rows(header: tuple, rows: list) -> str:
    rows = [tuple("-" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).upper().ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


def _tasks(answers: dict, eta: bool = False) -> list:
    rows = []
    for node, tasks in sorted(answers.items()):
        if not isinstance(tasks, list):
            rows.append((node, "-", "-", _short(tasks)) + (("-",) if eta else ()))
            continue
        for t in tasks:
            info = t.get("request", t) if eta else t
            extra = (t.get("eta"),) if eta else ()
            rows.append((node, info.get("id"), info.get("name"),
                         _short([info.get("args"), info.get("kwargs")])) + extra)
    return rows


def format_answers(command: str, answers: dict) -> str:
    """``{node: answer}`` as a table."""
    nodes = sorted(answers.items())
    if command in ("active", "reserved"):
        rows, header = _tasks(answers), ("node", "id", "task", "args, kwargs")
        if command == "active":
            now = time.time()
            running = {(n, t.get("id")): t.get("time_start") for n, ts in nodes
                       if isinstance(ts, list) for t in ts}
            rows = [r + (f"{now - running[(r[0], r[1])]:.1f}s"
                         if running.get((r[0], r[1])) else "-",) for r in rows]
            header += ("running for",)
    elif command == "scheduled":
        rows, header = _tasks(answers, eta=True), ("node", "id", "task", "args, kwargs", "eta")
    elif command in ("revoked", "registered"):
        header = ("node", "task id" if command == "revoked" else "task")
        rows = [(n, item) for n, items in nodes for item in (items or ["-"])]
    elif command == "stats":
        header = ("node", "pid", "uptime", "children", "prefetch", "tasks run", "broker")
        rows = []
        for n, s in nodes:
            b, pool = s.get("broker") or {}, s.get("pool") or {}
            rows.append((n, s.get("pid"), f"{s.get('uptime')}s",
                         f"{len(pool.get('processes') or [])}/{pool.get('max-concurrency')}",
                         s.get("prefetch_count"), sum((s.get("total") or {}).values()),
                         f"{b.get('hostname')}:{b.get('port')}{b.get('virtual_host')}"))
    elif command == "conf":
        header = ("node", "key", "value")
        rows = [(n, k, _short(v, 60)) for n, c in nodes for k, v in sorted(c.items())]
    elif command == "active_queues":
        header = ("node", "queue", "exchange", "type", "routing key")
        rows = [(n, q.get("name"), (q.get("exchange") or {}).get("name"),
                 (q.get("exchange") or {}).get("type"), q.get("routing_key"))
                for n, qs in nodes for q in qs]
    elif command == "query_task":
        header = ("node", "id", "state", "task")
        rows = [(n, tid, state_info[0], state_info[1].get("name"))
                for n, found in nodes for tid, state_info in sorted(found.items())]
        if not rows:
            return "no worker holds these tasks"
    else:                   # ping and every control command: {"ok": ...} or {"error": ...}
        header = ("node", "status", "reply")
        rows = [(n, "error" if "error" in a else "ok", a.get("error") or a.get("ok"))
                if isinstance(a, dict) else (n, "?", _short(a)) for n, a in nodes]
    if not rows:
        return f"{len(answers)} worker(s) answered: nothing to list"
    return _rows(header, rows)
