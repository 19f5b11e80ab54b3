"""The dashboard's pages and actions (Starlette; Jinja2 templates, escaped by default).

Every page handler is a plain function that Starlette runs in a thread, since
the store, the broker and the mailbox are blocking clients; :meth:`Dashboard._page`
wraps each with the session and the read check. The actions (POSTs) are in
:mod:`.actions`.
"""
from __future__ import annotations

import datetime
import logging
import os
import time

import jinja2
import pika
import pika.exceptions
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import config as config_mod, deadletters, periodic as periodic_mod
from ..broker.connection import connect_blocking
from ..exceptions import TaskdError
from . import charts, mailbox
from .actions import Actions
from .security import COOKIE, Guard

log = logging.getLogger(__name__)
HERE = os.path.dirname(__file__)
STATES = ("PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "RETRY", "REVOKED", "REJECTED")


def _when(ts):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


class Dashboard:
    """The Starlette application with its store, guard and configuration."""

    def __init__(self, config, store, guard: Guard, ingest=None):
        self.config, self.store, self.guard, self.ingest = config, store, guard, ingest
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(HERE, "templates")),
                                      autoescape=True, undefined=jinja2.StrictUndefined)
        self.env.filters["when"] = _when
        routes = [Route(path, self._page(fn), methods=["GET"]) for path, fn in (
            ("/", self.overview), ("/workers", self.workers), ("/queues", self.queues),
            ("/tasks", self.tasks), ("/tasks/{task_id:path}", self.task),
            ("/scheduled", self.scheduled), ("/dead-letters", self.dead_letters),
            ("/periodic", self.periodic),
            ("/audit", self.audit))]
        acts = Actions(self)
        routes += [Route("/login", acts.login_form, methods=["GET"]),
                   Route("/login", acts.login, methods=["POST"]),
                   Route("/logout", acts.logout, methods=["POST"]),
                   Route("/workers/action", acts.worker_action, methods=["POST"]),
                   Route("/dead-letters/replay", acts.replay, methods=["POST"]),
                   Route("/revoke", acts.revoke, methods=["POST"]),
                   Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")), name="static")]
        self.app = Starlette(routes=routes)
        self.app.add_middleware(_Guardrails, guard=guard)

    # --- plumbing --------------------------------------------------------------

    def render(self, request, session, template, status=200, **ctx):
        flash, session.flash = session.flash, None
        html = self.env.get_template(template).render(
            request=request, session=session, flash=flash, path=request.url.path,
            actions_on=bool(self.guard.admin_token), **ctx)
        response = HTMLResponse(html, status_code=status)
        self.cookie(response, session)
        return response

    def cookie(self, response, session):
        response.set_cookie(COOKIE, session.sid, httponly=True, samesite="strict")

    def _page(self, fn):
        def endpoint(request):
            session = self.guard.session(request.cookies.get(COOKIE))
            if not self.guard.may_read(session):
                response = RedirectResponse("/login", status_code=303)
                self.cookie(response, session)
                return response
            template, ctx = fn(request)
            return self.render(request, session, template, **ctx)
        return endpoint

    # --- pages -----------------------------------------------------------------

    def overview(self, request):
        now_minute = int(time.time() // 60)
        rows = self.store.per_minute(now_minute - 59)
        totals = {k: sum(r[k] for r in rows) for k in ("succeeded", "failed", "retried")}
        workers = with_liveness(self.store.workers())
        waits = sorted(w for w in self.store.recent_waits() if w >= 0)
        wait = {"n": len(waits), "median": waits[len(waits) // 2] if waits else None,
                "p95": waits[int(len(waits) * 0.95)] if waits else None}
        return "overview.html", dict(chart=charts.per_minute(rows, now_minute - 59), totals=totals,
                                     wait=wait,
                                     workers=workers, queues=queue_depths(self.config, self.store)[:10],
                                     ingest=self.ingest)

    def workers(self, request):
        workers = with_liveness(self.store.workers())
        online = [w["hostname"] for w in workers if w["alive"]]
        stats, queues, error = {}, {}, None
        if online:
            try:
                with mailbox.Mailbox(self.config) as mb:
                    stats = mb.call("stats", destination=online)
                    queues = mb.call("active_queues", destination=online)
            except (TaskdError, pika.exceptions.AMQPError) as exc:
                error = f"the mailbox is unavailable: {exc}"
        for w in workers:
            s = stats.get(w["hostname"]) or {}
            w["pool"] = s.get("pool") if isinstance(s, dict) else None
            q = queues.get(w["hostname"])
            w["queues"] = [x.get("name") for x in q if isinstance(x, dict)] if isinstance(q, list) else None
        return "workers.html", dict(workers=workers, mailbox_error=error)

    def queues(self, request):
        return "queues.html", dict(queues=queue_depths(self.config, self.store))

    def tasks(self, request):
        q = request.query_params
        state = q.get("state") or None
        if state and state not in STATES:
            state = None
        since = _moment(q.get("since"))
        until = _moment(q.get("until"))
        before = None
        if q.get("before") and ":" in q["before"]:
            at, _, tid = q["before"].partition(":")
            if _number(at) is not None:
                before = (float(at), tid)
        filters = dict(task_id=(q.get("id") or "").strip() or None,
                       name=(q.get("name") or "").strip() or None, state=state,
                       since=since, until=until)
        rows = self.store.search(before=before, **filters)
        more = None
        if len(rows) == 50:
            more = f"{rows[-1]['updated_at']!r}:{rows[-1]['id']}"
        return "tasks.html", dict(rows=rows, states=STATES, query=q, more=more)

    def task(self, request):
        task_id = request.path_params["task_id"]
        task = self.store.task(task_id)
        return "task.html", dict(task_id=task_id, task=task, attempts=self.store.attempts(task_id),
                                 children=self.store.children(task_id) if task else [])

    def scheduled(self, request):
        workers = [w["hostname"] for w in with_liveness(self.store.workers()) if w["alive"]]
        entries, error = [], None
        if workers:
            try:
                with mailbox.Mailbox(self.config) as mb:
                    replies = mb.call("scheduled", destination=workers)
            except (TaskdError, pika.exceptions.AMQPError) as exc:
                replies, error = {}, f"the mailbox is unavailable: {exc}"
            for host, items in sorted(replies.items()):
                for item in items if isinstance(items, list) else []:
                    if not isinstance(item, dict):
                        continue
                    req = item.get("request") if isinstance(item.get("request"), dict) else {}
                    entries.append({"worker": host, "eta": item.get("eta"),
                                    "id": req.get("id"), "name": req.get("name"),
                                    "args": req.get("args"), "kwargs": req.get("kwargs")})
        return "scheduled.html", dict(entries=entries, asked=workers, mailbox_error=error)

    def periodic(self, request):
        """The ``schedule:`` entries, their next runs, and their tasks' last runs from history."""
        entries = tuple(self.config["schedule"] or ())
        upcoming = {r["name"]: r["next"] for r in periodic_mod.upcoming(entries, 3)}
        rows = [{"name": e.name, "task": e.task, "schedule": e.describe(),
                 "next": upcoming.get(e.name, []),
                 "last": self.store.search(name=e.task, limit=3)} for e in entries]
        return "periodic.html", dict(rows=rows)

    def dead_letters(self, request):
        try:
            rows = list(deadletters.list_dead(self.config, limit=200))
            error = None
        except (TaskdError, pika.exceptions.AMQPError) as exc:
            rows, error = [], str(exc)
        return "dead.html", dict(rows=rows, error=error, queue=self.config["worker.dead_letter_queue"])

    def audit(self, request):
        return "audit.html", dict(rows=self.store.audit_log())


def with_liveness(workers, now=None):
    """Mark each worker ``alive``: online and heard from within three heartbeat intervals."""
    now = time.time() if now is None else now
    for w in workers:
        freq = w.get("freq") or 2.0
        w["alive"] = w["status"] == "online" and now - (w["last_seen"] or 0) < freq * 3 + 2
    return workers


def queue_depths(config, store):
    """Ready messages and consumers of the configured queues and those seen in events."""
    names = [q.name for q in config_mod.effective_queues(config)]
    names += [n for n in store.known_queues() if n not in names]
    try:
        conn = connect_blocking(config.broker_url, config["broker.connect_timeout"], 0,
                                "taskd-dashboard-queues", config["broker.tls"])
    except TaskdError as exc:
        return [{"name": n, "error": str(exc)} for n in names]
    out = []
    try:
        channel = conn.channel()
        for name in names:
            try:
                frame = channel.queue_declare(name, passive=True)
                out.append({"name": name, "depth": frame.method.message_count,
                            "consumers": frame.method.consumer_count})
            except pika.exceptions.ChannelClosedByBroker:
                out.append({"name": name, "error": "not declared on the broker"})
                channel = conn.channel()
    finally:
        if conn.is_open:
            conn.close()
    return out


#: Sent with every response: no script but the package's own, no framing (clickjacking
#: of the action buttons), no MIME sniffing, no referrer beyond this dashboard.
HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; "
     b"img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
     b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class _Guardrails:
    """ASGI middleware: refuse requests addressed to a name the guard does not allow
    (DNS rebinding on loopback) and add :data:`HEADERS` to every response."""

    def __init__(self, app, guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if not self.guard.host_allowed(host):
            response = Response("this dashboard answers only on a loopback address\n",
                                status_code=421, media_type="text/plain")
            await response(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + HEADERS)
            await send(message)
        await self.app(scope, receive, send_with_headers)


def _moment(text):
    """Seconds since the epoch from a number or a local ``YYYY-MM-DDTHH:MM`` (None if neither)."""
    value = _number(text)
    if value is None and text:
        try:
            value = datetime.datetime.fromisoformat(text).timestamp()
        except ValueError:
            return None
    return value


def _number(text):
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None
