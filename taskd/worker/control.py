"""The control socket: ``taskd status`` asks the running supervisor for its state.

A Unix stream socket (``worker.control_socket``, mode 0600, so only the
worker's own user and root can read it) served by the supervisor's event
loop. A client connects, writes one line (``status``) and reads one JSON
document; the supervisor closes the connection. If the socket cannot be
created (its directory is missing or not writable) the worker logs a warning
and runs without it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import Any, Optional

log = logging.getLogger("taskd.supervisor")


def snapshot(sup: Any) -> dict:
    """The supervisor's state as plain data."""
    now = time.monotonic()
    children = []
    for c in sorted(sup.pool.children.values(), key=lambda c: (c.generation, c.index)):
        job = c.job
        children.append({
            "index": c.index, "pid": c.pid, "generation": c.generation, "state": c.state,
            "task": job.task_name if job else None, "task_id": job.task_id if job else None,
            "running_for": round(now - c.job_started, 3) if job and c.job_started else None,
            "running": len(c.running), "tasks_done": c.tasks_done, "rss": c.rss,
        })
    return {
        "pid": os.getpid(),
        "hostname": sup.hostname,
        "started_at": sup.started_at,
        "uptime": round(time.time() - sup.started_at, 1),
        "config": sup.config.source,
        "config_loaded_at": sup.config_loaded_at,
        "last_reload": sup.reloader.last,
        "queues": list(sup.queues),
        "concurrency": sup.concurrency,
        "connected": sup.link.connected,
        "publishing_blocked": bool(sup.link.publisher and sup.link.publisher.blocked),
        "children": children,
        "child_start_failure": sup.pool.last_failure if sup.pool.failures else None,
        "ready": len(sup.dispatcher.ready),
        "held": len(sup.dispatcher.schedule),
        "counters": dict(sup.counters),
        "stopping": sup.shutdown.stopping,
        "beat": sup.beat.snapshot(),
        "result_store": sup.store.status() if sup.store is not None else None,
    }


def dump(sup: Any) -> str:
    """The state as lines of text, for the log (SIGUSR1)."""
    now = time.monotonic()
    lines = [f"state: {sup.status.line()}"]
    for c in sorted(sup.pool.children.values(), key=lambda c: c.index):
        running = (f"{c.job.describe()} for {now - c.job_started:.1f}s" if c.job else "-")
        lines.append(f"  child {c.index} pid={c.pid} gen={c.generation} {c.state} "
                     f"tasks={c.tasks_done} rss={c.rss >> 20}MiB running={running}")
    lines.append(f"  ready={len(sup.dispatcher.ready)} held={len(sup.dispatcher.schedule)} "
                 f"counters={dict(sup.counters)}")
    return "\n".join(lines)


class ControlServer:
    def __init__(self, sup: Any, path: Optional[str]) -> None:
        self.sup, self.path = sup, path
        self.server = None

    async def start(self) -> None:
        if _in_use(self.path):
            log.warning("control socket %s is in use by another worker: `taskd status` will "
                        "not reach this one", self.path)
            return False
        try:
            if os.path.exists(self.path):
                os.unlink(self.path)          # left over from a worker that died
            old = os.umask(0o177)
            try:
                self.server = await asyncio.start_unix_server(self._serve, path=self.path)
            finally:
                os.umask(old)
        except OSError as exc:
            log.warning("no control socket at %s (%s): `taskd status` is unavailable; set "
                        "worker.control_socket to a writable path", self.path, exc.strerror)
            return False
        return True

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readline(), 2)
            writer.write(json.dumps(snapshot(self.sup), default=str).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _in_use(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def query(path: str, timeout: float = 5.0) -> dict:
    """Ask the worker listening on ``path`` for its state (client side)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"status\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return json.loads(b"".join(chunks))


def _store_lines(store: Optional[dict]) -> list:
    if not store:
        return ["results:    rpc:// (to each caller's reply queue)"]
    line = f"results:    {store['url']} " + ("ok" if store["ok"] else (
        f"DOWN since {time.strftime('%H:%M:%S', time.localtime(store['down_since']))}: "
        f"{store['error']}"))
    if store["waiting"]:
        line += (f"; {store['waiting']} result(s), {store['waiting_bytes']} bytes waiting"
                 + ("" if store["accepting"] else " (buffer full: no new task starts)"))
    return [line]


def format_status(state: dict) -> str:
    """Human-readable ``taskd status`` output."""
    def when(ts: Optional[float]) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"
    c = state["counters"]
    lines = [
        f"pid:        {state['pid']}",
        f"node:       {state.get('hostname', '-')}",
        f"uptime:     {state['uptime']:.0f}s (since {when(state['started_at'])})",
        f"config:     {state['config']} (loaded {when(state['config_loaded_at'])})",
    ]
    reload = state.get("last_reload")
    if reload:
        outcome = "ok" if reload["ok"] else "FAILED: " + "; ".join(reload["errors"])
        lines.append(f"reload:     {when(reload['at'])} {outcome}")
    lines += [
        f"broker:     {'connected' if state['connected'] else 'NOT CONNECTED'}"
        + (" (publishing blocked by the broker)" if state["publishing_blocked"] else ""),
        f"queues:     {', '.join(state['queues'])}",
        *_store_lines(state.get("result_store")),
        f"tasks:      {state['ready']} ready, {state['held']} held (ETA), "
        f"{c.get('parked', 0)} parked so far",
        "counters:   " + ", ".join(f"{k} {c.get(k, 0)}" for k in (
            "received", "succeeded", "failed", "retried", "redelivered", "dead_lettered",
            "revoked", "duplicates")),
        f"children:   {len(state['children'])} (target {state['concurrency']})",
    ]
    if state.get("child_start_failure"):
        lines.append(f"            FAILING TO START: {state['child_start_failure']}")
    for ch in state["children"]:
        task = (f"{ch['task']}[{ch['task_id']}] for {ch['running_for']:.1f}s"
                if ch["task"] else "-")
        lines.append(f"  {ch['index']:>3} pid {ch['pid']:<7} gen {ch['generation']} "
                     f"{ch['state']:<9} done {ch['tasks_done']:<6} {task}")
    lines += format_beat(state.get("beat"))
    return "\n".join(lines)


def format_beat(beat: Optional[dict]) -> list:
    """The ``schedule:`` lines of ``taskd status``: this worker's role, each entry's runs."""
    if not beat or not beat["entries"]:
        return []
    role = beat["role"]
    if not beat["enabled"]:
        role = "off (worker.beat: false)"
    elif role == "leading":
        role = "LEADING" + ("" if beat["leading"] else " (lease lapsed: not firing)")
    lines = [f"schedule:   {role}, queue {beat['queue']}"]
    for e in beat["entries"]:
        last = e["last"]
        ran = f"last {last['slot']} ({last['task_id']})" if last else "last -"
        lines.append(f"  {e['name']}: {e['task']} {e['schedule']}; {ran}; next {e['next']}")
    return lines
