"""The lifecycle seam: what happens to tasks, children and the broker link, told to observers.

The parts that make things happen call one hook each at the point where it
happens: :class:`~taskd.worker.intake.Intake` (received),
:class:`~taskd.worker.dispatch.Dispatcher` (started),
:class:`~taskd.worker.outcomes.Outcomes` (succeeded, failed, retried, revoked,
dead-lettered), :class:`~taskd.worker.pool.Pool` and
:class:`~taskd.worker.spawner.Spawner` (children), the
:class:`~taskd.worker.link.Link` (connected, disconnected) and
:class:`~taskd.worker.stopping.Shutdown` (stopping). Events
(:mod:`taskd.worker.events`) and metrics (:mod:`taskd.worker.metrics`) are two
observers; neither is asked anything back, and neither changes what happens to
a delivery.

:class:`Observer` is the base: every hook is a documented no-op, so an observer
overrides only what it needs. :func:`combine` gives the parts one object to call:
with no observer it is :data:`NOBODY` (a call costs one Python method call and
nothing else, measured in ``bench/``), with one it is that observer, with more a
:class:`Fanout`. Hooks run on the supervisor's loop, in the middle of the
delivery path: they must not block and must not raise. A hook that raises is
logged by :class:`Fanout` and never reaches the part that called it (where it
would count as an internal error and give the delivery back); a single observer
is wrapped in a :class:`Fanout` for that reason too.

``job`` is a :class:`~taskd.worker.jobs.Job` (``job.request`` is decoded for every
hook but ``dead_lettered``, which may concern a message that did not decode);
``outcome`` a :class:`~taskd.worker.framing.Outcome`.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

log = logging.getLogger("taskd.supervisor")


class Observer:
    """Hooks, each a no-op here. Task hooks first, in the order a task meets them."""

    def received(self, job: Any) -> None:
        """A delivery decoded and accepted (it runs now, or waits for its ETA)."""

    def started(self, job: Any, pid: int) -> None:
        """Child ``pid`` starts running ``job``."""

    def succeeded(self, job: Any, outcome: Any) -> None:
        """``job`` ran and returned; ``outcome.body`` is its encoded result."""

    def failed(self, job: Any, outcome: Any = None, exc: Optional[BaseException] = None) -> None:
        """``job`` failed: it raised (``outcome``), or the worker failed it (``exc``: a hard
        time limit, a result it could not encode)."""

    def retried(self, job: Any, outcome: Any) -> None:
        """``job`` asked for a retry; its retry message is being published."""

    def revoked(self, job: Any, reason: str, expired: bool = False,
                terminated: bool = False, signum: Optional[int] = None) -> None:
        """``job`` ends REVOKED: ``expired`` (its ``expires`` passed), or revoked."""

    def dead_lettered(self, job: Any, reason: str) -> None:
        """``job``'s message is moved to the dead-letter queue (Celery: task-rejected)."""

    def child_started(self, child: Any) -> None:
        """A child process was forked."""

    def child_exited(self, child: Any, cause: str) -> None:
        """A child was reaped. ``cause``: ``retired`` (asked to leave), ``start_failed``,
        ``time_limit``, ``broken_stream``, ``killed`` (by a signal) or ``exited``."""

    def child_recycled(self, child: Any, why: str) -> None:
        """A child is retired to be replaced: ``max_tasks`` or ``max_memory``."""

    def connected(self, publisher: Any) -> None:
        """The broker link is up (first time or again); ``publisher`` is the publishing
        :class:`~taskd.worker.amqp.AsyncChannel`."""

    def disconnected(self) -> None:
        """The broker link was lost; a reconnect follows."""

    def stopping(self) -> None:
        """The worker is shutting down; the link is still up (if it was)."""

    def close(self) -> None:
        """The supervisor's loop is ending: release what the observer holds."""


NOBODY = Observer()
"""The observer of a worker that nobody watches."""

_HOOKS = tuple(name for name, value in vars(Observer).items()
               if callable(value) and not name.startswith("_"))


class Fanout(Observer):
    """Several observers (or one), called in order; one that raises is logged and the
    others still run. The hooks are spelt out, not generated: a call through here costs
    a fraction of a microsecond (a generic ``*args`` wrapper cost several times more)."""

    def __init__(self, observers: Iterable[Observer]) -> None:
        self.observers = tuple(observers)

    def _failed(self, observer: Observer, hook: str) -> None:
        log.exception("internal error in the %s observer (%s): ignored",
                      type(observer).__name__, hook)

    def received(self, job: Any) -> None:
        for o in self.observers:
            try:
                o.received(job)
            except Exception:
                self._failed(o, "received")

    def started(self, job: Any, pid: int) -> None:
        for o in self.observers:
            try:
                o.started(job, pid)
            except Exception:
                self._failed(o, "started")

    def succeeded(self, job: Any, outcome: Any) -> None:
        for o in self.observers:
            try:
                o.succeeded(job, outcome)
            except Exception:
                self._failed(o, "succeeded")

    def failed(self, job: Any, outcome: Any = None, exc: Optional[BaseException] = None) -> None:
        for o in self.observers:
            try:
                o.failed(job, outcome, exc)
            except Exception:
                self._failed(o, "failed")

    def retried(self, job: Any, outcome: Any) -> None:
        for o in self.observers:
            try:
                o.retried(job, outcome)
            except Exception:
                self._failed(o, "retried")

    def revoked(self, job: Any, reason: str, expired: bool = False,
                terminated: bool = False, signum: Optional[int] = None) -> None:
        for o in self.observers:
            try:
                o.revoked(job, reason, expired, terminated, signum)
            except Exception:
                self._failed(o, "revoked")

    def dead_lettered(self, job: Any, reason: str) -> None:
        for o in self.observers:
            try:
                o.dead_lettered(job, reason)
            except Exception:
                self._failed(o, "dead_lettered")

    def _each(self, hook: str, *args: Any) -> None:
        """The rare hooks (children, the link, stopping): by name."""
        for o in self.observers:
            try:
                getattr(o, hook)(*args)
            except Exception:
                self._failed(o, hook)

    def child_started(self, child: Any) -> None:
        self._each("child_started", child)

    def child_exited(self, child: Any, cause: str) -> None:
        self._each("child_exited", child, cause)

    def child_recycled(self, child: Any, why: str) -> None:
        self._each("child_recycled", child, why)

    def connected(self, publisher: Any) -> None:
        self._each("connected", publisher)

    def disconnected(self) -> None:
        self._each("disconnected")

    def stopping(self) -> None:
        self._each("stopping")

    def close(self) -> None:
        self._each("close")


def combine(observers: Iterable[Optional[Observer]]) -> Observer:
    """The one object the parts call: :data:`NOBODY` when nothing listens, else a
    :class:`Fanout` (which keeps an observer's error away from the delivery path)."""
    present = [o for o in observers if o is not None]
    return Fanout(present) if present else NOBODY
