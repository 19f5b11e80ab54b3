"""Tasks: class-based (subclass :class:`Task`, define ``run``) or ``@app.task``.

Both are callable like the function they wrap and have ``delay`` and
``apply_async``. On a class these work on the class itself, as in the seed
page (``CompressVideoTask.apply_async(args=[f], routing_key="video.compress")``).

Attributes a task may set (all optional), overridden by the options of a call:
``name``, ``serializer``, ``queue``, ``exchange``, ``routing_key``, ``priority``,
``ignore_result``, ``time_limit``, ``soft_time_limit``, ``mandatory``,
``immediate``.
"""
from __future__ import annotations

import random
from datetime import datetime
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import current
from .exceptions import MaxRetriesExceededError, Retry, TaskdError
from .options import SendOptions
from .result import AsyncResult

if TYPE_CHECKING:
    from .app import App
    from .broker.publisher import Publisher

# The process-wide state lives in taskd.current; these names stay for the worker's child.
registry = current.registry
_request = current.request


class Request:
    """What a running task knows about its own message (``self.request`` in bound tasks)."""

    def __init__(self, id=None, retries=0, eta=None, expires=None, reply_to=None,
                 args=(), kwargs=None, delivery_count=1, root_id=None, parent_id=None,
                 time_limit=None, soft_time_limit=None, headers=None):
        self.id = id
        self.retries = retries
        self.eta = eta
        self.expires = expires
        self.reply_to = reply_to
        self.args = args
        self.kwargs = kwargs or {}
        self.delivery_count = delivery_count
        self.root_id = root_id
        self.parent_id = parent_id
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        self.headers = headers or {}


class Task:
    """Base class of every task."""

    #: Full name, e.g. ``tasks.add``; default ``<module>.<class name>``.
    name = None
    #: The :class:`~taskd.App` the task sends with; default: the current app.
    app = None
    #: Set on a subclass meant only as a base for other tasks.
    abstract = True
    serializer = None
    queue = None
    exchange = None
    routing_key = None
    priority = None
    ignore_result = False
    time_limit = None
    soft_time_limit = None
    mandatory = False
    immediate = False
    #: Whether ``run`` receives the task instance as its first argument.
    bind = False
    #: Retries: at most this many (None: no limit); ``retry()`` without a
    #: countdown waits ``default_retry_delay`` seconds.
    max_retries = 3
    default_retry_delay = 180
    #: Exceptions that retry the task automatically (``autoretry_for=(IOError,)``).
    autoretry_for = ()
    #: Automatic retries wait 1, 2, 4 ... seconds (or this many times 2**n if a
    #: number), capped at ``retry_backoff_max``; ``retry_jitter`` picks a random
    #: delay between 0 and that.
    retry_backoff = False
    retry_backoff_max = 600
    retry_jitter = True
    #: Store STARTED when the task starts (None: the ``track_started`` setting).
    track_started = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "abstract" not in cls.__dict__:
            cls.abstract = False
        if cls.abstract:
            return
        if "name" not in cls.__dict__ or cls.name is None:
            module = cls.__module__
            if module == "__main__":
                app = cls.app or current.peek_app()
                if app is not None and app.main:
                    module = app.main
            cls.name = f"{module}.{cls.__name__}"
        registry[cls.name] = cls()

    # -- running ----------------------------------------------------------------
    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"task {self.name} defines no run()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(*args, **kwargs)

    @property
    def request(self) -> Request:
        """The current message's :class:`Request` while the task runs in a worker."""
        return (current.async_request.get() or getattr(_request, "value", None)
                or Request())

    def __repr__(self):
        return f"<@task: {self.name}>"

    def retry(self, exc: BaseException | None = None, countdown: float | None = None,
              eta: datetime | None = None, max_retries: int | None = None,
              args: Sequence | None = None, kwargs: Mapping | None = None) -> Retry:
        """Retry the running task (raises; ``raise self.retry(...)`` reads well too).

        The worker publishes a copy of the message with ``retries`` + 1 and an
        ETA ``countdown`` seconds away (default ``default_retry_delay``), has the
        broker confirm it, then acknowledges the original; the caller's
        ``get()`` follows the task to its final outcome. Past ``max_retries``
        the task fails with ``exc`` (or ``MaxRetriesExceededError``).
        """
        request = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"task {self.name}[{request.id}] retried {request.retries} times (max_retries)")
        if eta is None:
            countdown = self.default_retry_delay if countdown is None else countdown
        raise Retry(exc=exc, when=eta if eta is not None else countdown,
                    args=args, kwargs=kwargs)

    def update_state(self, task_id: str | None = None, state: str | None = None,
                     meta: Any = None) -> None:
        """Store a state for this task (or ``task_id``) in the result store: a custom
        one (``state="PROGRESS", meta={"done": 3}``) that ``AsyncResult.state`` and
        ``.info`` show until the task ends. Needs a result store (``result_backend``
        redis:// or postgresql://); with ``rpc://`` it raises ``TaskdError``."""
        from . import stores
        store = stores.worker_store()
        if store is None:
            store = self._app().store
        if store is None:
            raise TaskdError(f"task {self.name}: update_state needs a result store "
                             "(result_backend: redis://... or postgresql://...); rpc:// "
                             "keeps no state")
        task_id = task_id or self.request.id
        if not task_id:
            raise TaskdError(f"task {self.name}: update_state outside a running task needs "
                             "task_id=")
        store.store(task_id, {"status": state or "PENDING", "result": meta, "traceback": None,
                              "children": [], "date_done": None})

    def backoff_delay(self, retries: int) -> float:
        """Seconds before automatic retry number ``retries + 1``."""
        if not self.retry_backoff:
            delay = self.default_retry_delay
        else:
            base = 1 if self.retry_backoff is True else self.retry_backoff
            delay = min(self.retry_backoff_max, base * 2 ** retries)
        return random.uniform(0, delay) if self.retry_jitter else delay

    # -- sending ----------------------------------------------------------------
    @classmethod
    def _app(cls) -> App:
        return cls.app or current.get_app()

    @classmethod
    def delay(cls, *args: Any, **kwargs: Any) -> AsyncResult:
        """Shortcut for ``apply_async(args, kwargs)``."""
        return cls.apply_async(args, kwargs)

    @classmethod
    def apply_async(cls, args: Sequence | None = None, kwargs: Mapping | None = None, *,
                    countdown: float | None = None, eta: datetime | None = None,
                    expires: float | datetime | None = None, serializer: str | None = None,
                    exchange: str | None = None, routing_key: str | None = None,
                    queue: str | None = None, priority: int | None = None,
                    mandatory: bool | None = None, immediate: bool | None = None,
                    connect_timeout: float | None = None, publisher: Publisher | None = None,
                    connection: Any = None, task_id: str | None = None,
                    headers: Mapping | None = None, time_limit: float | None = None,
                    soft_time_limit: float | None = None, ignore_result: bool | None = None,
                    retries: int = 0, retry: bool = True,
                    retry_policy: Mapping | None = None, link: Any = None,
                    link_error: Any = None, chain: Any = None, chord: Any = None,
                    group_id: str | None = None, group_index: int | None = None,
                    root_id: str | None = None, parent_id: str | None = None) -> AsyncResult:
        """Send the task; returns an :class:`~taskd.result.AsyncResult`.

        Each option is a field of :class:`~taskd.options.SendOptions` (its
        meaning and check are declared there; ``docs/executing-tasks.md`` lists
        them). The keywords are spelled out here so that ``help()`` and editors
        show them, and an unknown one raises ``TypeError`` naming it.
        """
        options = SendOptions(
            countdown=countdown, eta=eta, expires=expires, serializer=serializer,
            exchange=exchange, routing_key=routing_key, queue=queue, priority=priority,
            mandatory=mandatory, immediate=immediate, connect_timeout=connect_timeout,
            publisher=publisher, connection=connection, task_id=task_id, headers=headers,
            time_limit=time_limit, soft_time_limit=soft_time_limit,
            ignore_result=ignore_result, retries=retries, retry=retry,
            retry_policy=retry_policy, link=link, link_error=link_error, chain=chain,
            chord=chord, group_id=group_id, group_index=group_index, root_id=root_id,
            parent_id=parent_id)
        return cls._app().send(cls.name, args, kwargs, options, task=cls)

    # -- workflows (taskd.canvas) ----------------------------------------------------
    @classmethod
    def s(cls, *args: Any, **kwargs: Any) -> Any:
        """A signature of this task with partial arguments: ``add.s(2) | mul.s(4)``."""
        from .canvas import Signature
        return Signature(cls.name, args, kwargs, app=cls.app)

    @classmethod
    def si(cls, *args: Any, **kwargs: Any) -> Any:
        """An immutable signature: a parent's result is not prepended to its arguments."""
        from .canvas import Signature
        return Signature(cls.name, args, kwargs, immutable=True, app=cls.app)

    @classmethod
    def signature(cls, args: Sequence | None = None, kwargs: Mapping | None = None,
                  **options: Any) -> Any:
        """A signature with options: ``add.signature((2, 2), countdown=10)``."""
        from .canvas import Signature
        immutable = options.pop("immutable", False)
        return Signature(cls.name, args, kwargs, options, immutable=immutable, app=cls.app)

    @classmethod
    def get_publisher(cls, connect_timeout: float | None = None, connection: Any = None,
                      window: int = 1000) -> Publisher:
        """A publisher holding its own broker connection, for many sends (pipelined)."""
        return cls._app().get_publisher(connect_timeout=connect_timeout, connection=connection,
                                        window=window)

    @classmethod
    def AsyncResult(cls, task_id: str) -> AsyncResult:
        return AsyncResult(task_id, app=cls._app(), task_name=cls.name)
