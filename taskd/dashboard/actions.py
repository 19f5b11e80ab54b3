"""The dashboard's actions: log in and out, worker commands, revoke, replay dead letters.

Every action is a POST that :class:`~.security.Guard` checks first (the admin
token's session, the form's CSRF token, the Origin); a refused one gets a 403
page and a warning in the log. Whatever its outcome, an action that was allowed
is written to the audit log with who sent it and the reply.
"""
from __future__ import annotations

import hashlib
import logging
from urllib.parse import quote

import pika
import pika.exceptions
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse

from .. import deadletters
from ..exceptions import TaskdError
from . import mailbox
from .security import COOKIE

log = logging.getLogger(__name__)


class Actions:
    """The POST endpoints of a :class:`~.web.Dashboard` (``d``)."""

    def __init__(self, dashboard):
        self.d = dashboard

    async def _checked_post(self, request, admin=True):
        session = self.d.guard.session(request.cookies.get(COOKIE))
        form = await request.form()
        why = self.d.guard.refuse_post(session, form.get("csrf"), request.headers.get("origin"),
                                       request.headers.get("referer"), _base(request), admin)
        if why:
            log.warning("dashboard: refused %s from %s: %s", request.url.path,
                        request.client.host if request.client else "?", why)
        return session, form, why

    def _back(self, session, to, message):
        session.flash = message
        response = RedirectResponse(to, status_code=303)
        self.d.cookie(response, session)
        return response

    def login_form(self, request):
        session = self.d.guard.session(request.cookies.get(COOKIE))
        return self.d.render(request, session, "login.html")

    async def login(self, request):
        session, form, why = await self._checked_post(request, admin=False)
        if why:
            return self.d.render(request, session, "login.html", status=403, error=why)
        fresh = self.d.guard.login(session, str(form.get("token") or ""))
        if fresh is None:
            log.warning("dashboard: wrong admin token from %s",
                        request.client.host if request.client else "?")
            return self.d.render(request, session, "login.html", status=403,
                                error="wrong token" if self.d.guard.admin_token else
                                "no admin token is configured (dashboard.admin_token)")
        return self._back(fresh, "/", "logged in: actions are enabled")

    async def logout(self, request):
        session, _form, why = await self._checked_post(request, admin=False)
        if not why:
            self.d.guard.logout(session)
        return RedirectResponse("/", status_code=303)

    async def worker_action(self, request):
        session, form, why = await self._checked_post(request)
        if why:
            return self._refused(request, session, why)
        action, worker = str(form.get("action") or ""), str(form.get("worker") or "")
        queue = str(form.get("queue") or "").strip()
        if action not in mailbox.ACTIONS or not worker:
            return self._refused(request, session, f"unknown action {action!r}", 400)
        if action in ("add_consumer", "cancel_consumer") and not queue:
            return self._back(session, "/workers", f"{action}: name a queue")
        arguments = {"queue": queue} if queue else {"n": 1}

        def send():
            with mailbox.Mailbox(self.d.config, timeout=3.0) as mb:
                return mb.call(action, arguments, destination=[worker])
        try:
            replies = await run_in_threadpool(send)
            reply = replies.get(worker)
            outcome = "no reply" if reply is None else str(reply)[:500]
        except (TaskdError, pika.exceptions.AMQPError) as exc:
            outcome = f"mailbox unavailable: {exc}"
        target = f"{worker}" + (f" queue={queue}" if queue else "")
        await run_in_threadpool(self.d.store.record_action, _who(request, session), action, target, outcome)
        return self._back(session, "/workers", f"{action} {target}: {outcome}")

    async def revoke(self, request):
        """Revoke a task on every worker (mailbox ``revoke``, broadcast); ``terminate``
        also signals the process running it."""
        session, form, why = await self._checked_post(request)
        if why:
            return self._refused(request, session, why)
        task_id = str(form.get("id") or "").strip()
        if not task_id:
            return self._refused(request, session, "revoke: no task id", 400)
        terminate = form.get("terminate") == "yes"

        def send():
            with mailbox.Mailbox(self.d.config) as mb:
                return mb.call("revoke", {"task_id": task_id, "terminate": terminate})
        try:
            replies = await run_in_threadpool(send)
            outcome = "; ".join(f"{host}: {reply}" for host, reply in sorted(replies.items()))[:500]
            outcome = outcome or "no worker replied"
        except (TaskdError, pika.exceptions.AMQPError) as exc:
            outcome = f"mailbox unavailable: {exc}"
        action = "revoke+terminate" if terminate else "revoke"
        await run_in_threadpool(self.d.store.record_action, _who(request, session), action, task_id, outcome)
        return self._back(session, f"/tasks/{quote(task_id, safe='')}", f"{action} {task_id}: {outcome}")

    async def replay(self, request):
        session, form, why = await self._checked_post(request)
        if why:
            return self._refused(request, session, why)
        message_id = str(form.get("id") or "") or None
        try:
            done, skipped = await run_in_threadpool(deadletters.replay, self.d.config, None, None,
                                                    None, None, message_id)
            outcome = f"replayed {done}, left {skipped}"
        except (TaskdError, pika.exceptions.AMQPError) as exc:
            outcome = f"failed: {exc}"
        await run_in_threadpool(self.d.store.record_action, _who(request, session),
                                "replay", message_id or "all", outcome)
        return self._back(session, "/dead-letters", f"replay {message_id or 'all'}: {outcome}")

    def _refused(self, request, session, why, status=403):
        return self.d.render(request, session, "refused.html", status=status, why=why)


def _base(request):
    return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"


def _who(request, session):
    label = hashlib.sha256(session.sid.encode()).hexdigest()[:8]   # names it, reveals nothing
    return f"admin@{request.client.host if request.client else '?'} (session {label})"
