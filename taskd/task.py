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

import threading

# name -> Task instance, for every task defined in this process (all apps).
registry: dict = {}

_request = threading.local()


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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "abstract" not in cls.__dict__:
            cls.abstract = False
        if cls.abstract:
            return
        if "name" not in cls.__dict__ or cls.name is None:
            module = cls.__module__
            if module == "__main__":
                app = cls.app or _current_app_or_none()
                if app is not None and app.main:
                    module = app.main
            cls.name = f"{module}.{cls.__name__}"
        registry[cls.name] = cls()

    # -- running ----------------------------------------------------------------
    def run(self, *args, **kwargs):
        raise NotImplementedError(f"task {self.name} defines no run()")

    def __call__(self, *args, **kwargs):
        return self.run(*args, **kwargs)

    @property
    def request(self):
        """The current message's :class:`Request` while the task runs in a worker."""
        return getattr(_request, "value", None) or Request()

    def __repr__(self):
        return f"<@task: {self.name}>"

    def retry(self, exc=None, countdown=None, eta=None, max_retries=None, args=None,
              kwargs=None):
        """Retry the running task (raises; ``raise self.retry(...)`` reads well too).

        The worker publishes a copy of the message with ``retries`` + 1 and an
        ETA ``countdown`` seconds away (default ``default_retry_delay``), has the
        broker confirm it, then acknowledges the original; the caller's
        ``get()`` follows the task to its final outcome. Past ``max_retries``
        the task fails with ``exc`` (or ``MaxRetriesExceededError``).
        """
        from .exceptions import MaxRetriesExceededError, Retry
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

    def backoff_delay(self, retries):
        """Seconds before automatic retry number ``retries + 1``."""
        import random
        if not self.retry_backoff:
            delay = self.default_retry_delay
        else:
            base = 1 if self.retry_backoff is True else self.retry_backoff
            delay = min(self.retry_backoff_max, base * 2 ** retries)
        return random.uniform(0, delay) if self.retry_jitter else delay

    # -- sending ----------------------------------------------------------------
    @classmethod
    def _app(cls):
        return cls.app or _current_app()

    @classmethod
    def delay(cls, *args, **kwargs):
        """Shortcut for ``apply_async(args, kwargs)``."""
        return cls.apply_async(args, kwargs)

    @classmethod
    def apply_async(cls, args=None, kwargs=None, *, countdown=None, eta=None, expires=None,
                    serializer=None, exchange=None, routing_key=None, queue=None,
                    priority=None, mandatory=None, immediate=None, connect_timeout=None,
                    publisher=None, connection=None, task_id=None, headers=None,
                    time_limit=None, soft_time_limit=None, ignore_result=None, retries=0,
                    retry=True, retry_policy=None):
        """Send the task; returns an :class:`~taskd.result.AsyncResult`.

        See ``docs/executing-tasks.md`` for every option. Unknown options
        raise ``TypeError`` naming them.
        """
        return cls._app().send_task(
            cls.name, args, kwargs, task=cls, countdown=countdown, eta=eta, expires=expires,
            serializer=serializer, exchange=exchange, routing_key=routing_key, queue=queue,
            priority=priority, mandatory=mandatory, immediate=immediate,
            connect_timeout=connect_timeout, publisher=publisher, connection=connection,
            task_id=task_id, headers=headers, time_limit=time_limit,
            soft_time_limit=soft_time_limit, ignore_result=ignore_result, retries=retries,
            retry=retry, retry_policy=retry_policy)

    @classmethod
    def get_publisher(cls, connect_timeout=None, connection=None, window=1000):
        """A publisher holding its own broker connection, for many sends (pipelined)."""
        return cls._app().get_publisher(connect_timeout=connect_timeout, connection=connection,
                                        window=window)

    @classmethod
    def AsyncResult(cls, task_id):
        from .result import AsyncResult
        return AsyncResult(task_id, app=cls._app(), task_name=cls.name)


def _current_app():
    from .app import current_app
    return current_app()


def _current_app_or_none():
    from . import app
    return app._current
