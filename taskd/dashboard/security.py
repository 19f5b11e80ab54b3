"""Who may read and who may act: sessions, the admin token, CSRF and Origin checks.

* Reading is open when the dashboard listens on a loopback address only; on
  any other address every page needs a session unlocked with the admin token.
* An action (a POST) needs all of: an admin token configured; a session
  unlocked with it (``/login``); the session's CSRF token in the form; an
  ``Origin`` (or, failing that, ``Referer``) header naming this dashboard's host
  and port (the scheme is not compared: a TLS-terminating proxy changes it).
  The session cookie is ``HttpOnly`` and ``SameSite=Strict``, so another
  site's page cannot even send it.
* On loopback, a request whose ``Host`` is not a loopback name is refused
  (DNS rebinding).
* Sessions live in memory (a restart logs everyone out), expire after
  :data:`SESSION_TTL`, and a login gets a fresh session id.
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

COOKIE = "taskd_dashboard"
SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 10_000


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class Session:
    sid: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    admin: bool = False
    created: float = field(default_factory=time.monotonic)
    flash: str | None = None


class Guard:
    """Sessions and the checks every request passes."""

    def __init__(self, admin_token: str | None, listen_host: str):
        self.admin_token = admin_token
        self.open_reading = is_loopback(listen_host)
        self._sessions: dict[str, Session] = {}

    def session(self, sid: str | None) -> Session:
        """The session named by the cookie, or a new one."""
        s = self._sessions.get(sid or "")
        if s is not None and time.monotonic() - s.created < SESSION_TTL:
            return s
        return self._new()

    def _new(self) -> Session:
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = sorted(self._sessions.values(), key=lambda s: s.created)[:MAX_SESSIONS // 10]
            for s in oldest:
                del self._sessions[s.sid]
        s = Session(secrets.token_urlsafe(32))
        self._sessions[s.sid] = s
        return s

    def may_read(self, s: Session) -> bool:
        return self.open_reading or s.admin

    def host_allowed(self, host_header: str | None) -> bool:
        """On loopback, only requests addressed to a loopback name: another site that
        points its own name at 127.0.0.1 (DNS rebinding) gets nothing."""
        if not self.open_reading:
            return True
        host = host_header or ""
        host = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        return is_loopback(host)

    def login(self, s: Session, token: str) -> Session | None:
        """A new unlocked session when ``token`` is the admin token, else None."""
        if not self.admin_token or not hmac.compare_digest(
                token.encode("utf-8", "replace"), self.admin_token.encode("utf-8")):
            return None
        self._sessions.pop(s.sid, None)
        fresh = self._new()
        fresh.admin = True
        return fresh

    def logout(self, s: Session) -> None:
        self._sessions.pop(s.sid, None)

    def refuse_post(self, s: Session, form_csrf: str | None, origin: str | None,
                    referer: str | None, base: str, admin: bool = True) -> str | None:
        """Why this POST is refused (None: allowed). ``base`` is ``scheme://host[:port]``."""
        source = origin or referer
        # Host and port only: behind a TLS-terminating proxy the page is https and the
        # dashboard sees http; the cookie's SameSite=Strict keeps other sites out.
        if not source or urlsplit(source).netloc != urlsplit(base).netloc:
            return "the request did not come from this dashboard's own pages (Origin check)"
        if not form_csrf or not hmac.compare_digest(form_csrf, s.csrf):
            return "the form's CSRF token is missing or stale; reload the page"
        if admin and not self.admin_token:
            return ("actions are off: no admin token is configured (dashboard.admin_token "
                    "or $TASKD_DASHBOARD_TOKEN)")
        if admin and not s.admin:
            return "actions need the admin token: log in first"
        return None
