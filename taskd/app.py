"""The application: configuration, task registration, and sending.

``App("tasks", config="/etc/taskd.yaml")`` or ``App("tasks", broker="amqp://...")``.
Each process keeps one pooled broker connection per app, its :class:`Session`
(a publisher and the result consumer), held in a :class:`ProcessLocal`: made
on first use, re-created after ``fork`` (a child never speaks on its parent's
socket) and after it dies. Threads take turns on it through a fair
:class:`TurnLock` (pika is not thread-safe). Every publish on it is confirmed
by the broker.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from . import config as config_mod
from . import current, signals, stores
from .broker.publisher import Publisher
from .control import Control
from .exceptions import ConfigError
from .options import SendOptions
from .result import AsyncResult, ResultConsumer
from .task import Task, registry


def current_app() -> App:
    """The most recently created :class:`App`, or one built from the environment.

    The environment app reads ``$TASKD_CONFIG`` when set (else
    ``/etc/taskd.yaml`` if it exists, else the defaults), and honours
    ``$TASKD_BROKER_URL``.
    """
    return current.get_app()


class TurnLock:
    """A reentrant lock handed over in arrival order.

    ``threading.RLock`` is not fair: a thread that waits for results in short
    slices, releasing the lock between them, takes it straight back while a
    sending thread is still waking up, so the sender can wait for the whole
    ``get()``. Here each acquirer takes a ticket and the lock goes to the
    oldest ticket, so a sender waits at most for the slice under way.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner = None
        self._depth = 0
        self._next = 0          # next ticket to hand out
        self._serving = 0       # ticket whose turn it is

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            ticket, self._next = self._next, self._next + 1
            while self._serving != ticket:
                self._cond.wait()
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a TurnLock held by another thread")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._serving += 1
                self._cond.notify_all()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


class ProcessLocal:
    """One object per process, re-created after ``fork`` (never shared with a parent).

    Holds a lock so that threads of one process take turns: pika is not
    thread-safe. The object is created under that lock, so threads that
    first touch it at the same moment share one.
    """

    def __init__(self, factory: Callable[[], Any]):
        self._factory = factory
        self._pid = None
        self._value = None
        self.lock = TurnLock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self):
        # The inherited object's socket belongs to the parent's connection:
        # never speak on it, just drop it.
        self._value, self._pid = None, None
        self.lock = TurnLock()

    def get(self) -> Any:
        value = self._value
        if value is not None and self._pid == os.getpid():
            return value
        with self.lock:
            if self._pid != os.getpid() or self._value is None:
                self._value = self._factory()
                self._pid = os.getpid()
            return self._value

    def peek(self) -> Any:
        return self._value if self._pid == os.getpid() else None

    def reset(self) -> Any:
        value, self._value = self._value, None
        return value


class Session:
    """The per-process pooled connection: a publisher and the result consumer."""

    def __init__(self, app: App):
        self.publisher = Publisher(app)
        self.results = ResultConsumer(self.publisher)

    def close(self) -> None:
        self.publisher.close()


class App:
    """A taskd application: its configuration, its tasks, its per-process session."""

    def __init__(self, main: str | None = None, *,
                 config: str | os.PathLike | Mapping | config_mod.Config | None = None,
                 broker: str | None = None, backend: str | None = None,
                 set_as_current: bool = True):
        if isinstance(config, config_mod.Config):
            self.config = config
        elif isinstance(config, dict):
            self.config = config_mod.validate(config, source="<dict>")
        elif config is not None:
            self.config = config_mod.load(config)
        else:
            self.config = config_mod.from_defaults(broker)
        if broker is not None and config is not None:
            values = dict(self.config.values, **{"broker.url": broker})
            self.config = config_mod.Config(values, self.config.exchanges, self.config.queues,
                                            self.config.routes, self.config.source)
        if backend is not None:
            url, expected = stores.check_url(backend)
            if expected:
                raise ConfigError([f"backend: expected {expected}, got "
                                   f"{stores.redact(backend)!r}"], "App()")
            values = dict(self.config.values, result_backend=url)
            self.config = config_mod.Config(values, self.config.exchanges, self.config.queues,
                                            self.config.routes, self.config.source)
        self.main = main
        self._store = ProcessLocal(self._open_store)
        self._has_store = stores.kind(self.config["result_backend"]) != "rpc"
        if self._has_store:
            stores.require(self.config["result_backend"])     # a missing extra fails here
        for module in self.config["serializer_modules"]:
            importlib.import_module(module)
        self._session = ProcessLocal(lambda: Session(self))
        self._control = None
        self._testing: bool | None = None      # in app.testing(): whether failures raise
        if set_as_current:
            current.set_app(self)

    @classmethod
    def from_environment(cls) -> App:
        """An app from ``$TASKD_CONFIG``, else ``/etc/taskd.yaml`` if it exists, else
        the defaults (``$TASKD_BROKER_URL`` applies to all three)."""
        path = os.environ.get("TASKD_CONFIG") or None
        if path is None and os.path.exists(config_mod.DEFAULT_PATH):
            path = config_mod.DEFAULT_PATH
        return cls(config=path)

    def __repr__(self):
        return f"<taskd.App {self.main or ''} {self.config.source}>"

    # -- tasks ------------------------------------------------------------------
    def task(self, fn: Callable | None = None, **options: Any) -> Any:
        """Decorator turning a function into a task: ``@app.task`` or ``@app.task(name=...)``."""
        def make(fn):
            module = fn.__module__
            if module == "__main__" and self.main:
                module = self.main
            attrs = {
                "name": options.pop("name", None) or f"{module}.{fn.__name__}",
                "app": self,
                "__module__": fn.__module__,
                "__doc__": fn.__doc__,
                "__qualname__": fn.__qualname__,
            }
            bind = options.get("bind", False)
            attrs["run"] = fn if bind else staticmethod(fn)
            for key, value in options.items():
                if not hasattr(Task, key):
                    raise TypeError(f"@app.task got an unknown option {key!r}")
                attrs[key] = value
            cls = type(fn.__name__, (Task,), attrs)
            return registry[cls.name]
        if fn is not None and callable(fn) and not options:
            return make(fn)
        return make

    @contextlib.contextmanager
    def testing(self, propagate: bool = False) -> Iterator[App]:
        """Within the block, this app's tasks run in the calling process through the real
        encode, routing and decode, and return an :class:`~taskd.testing.EagerResult`
        (``docs/testing.md``). ``propagate``: a failing task raises from the call."""
        previous, self._testing = self._testing, bool(propagate)
        try:
            yield self
        finally:
            self._testing = previous

    @property
    def tasks(self) -> dict[str, Task]:
        """Every task defined in this process, by name (:data:`taskd.current.registry`)."""
        return registry

    # -- the result store -------------------------------------------------------
    @property
    def backend_url(self) -> str:
        return self.config["result_backend"]

    def _open_store(self) -> Any:
        return stores.open_store(self.backend_url, self.config["result_expires"])

    @property
    def store(self) -> Any:
        """This process's result store client (see :mod:`taskd.stores`), or None with
        ``rpc://``. Opened on first use, and again after ``fork``."""
        return self._store.get() if self._has_store else None

    # -- connections ------------------------------------------------------------
    def session(self) -> Session:
        return self._session.get()

    def session_lock(self) -> TurnLock:
        return self._session.lock

    def get_publisher(self, connect_timeout: float | None = None, connection: Any = None,
                      window: int = 1000) -> Publisher:
        """A publisher with its own connection (or ``connection``), for many sends.

        Its sends are pipelined: up to ``window`` messages await their confirm
        at once; ``flush()``/``close()``/leaving ``with`` waits for them all
        and raises ``PublishError`` naming any task the broker did not take.
        ``window=0`` waits for each confirm, like the pooled connection.
        """
        return Publisher(self, connection=connection, connect_timeout=connect_timeout,
                         window=window)

    def close(self) -> None:
        """Close this process's pooled connection (it reopens on the next send)."""
        session = self._session.peek()
        if session is not None:
            session.close()
            self._session.reset()

    # -- sending ----------------------------------------------------------------
    def send_task(self, name: str, args: Sequence | None = None,
                  kwargs: Mapping | None = None, *, task: type[Task] | None = None,
                  **options: Any) -> AsyncResult:
        """Send a task by name; the task's code is not needed here.

        ``options`` are those of :meth:`Task.apply_async` (the fields of
        :class:`~taskd.options.SendOptions`); an unknown one raises TypeError.
        ``task``, when given, fills in what the options leave out.
        """
        return self.send(name, args, kwargs, SendOptions.of(options), task=task)

    def send(self, name: str, args: Sequence | None, kwargs: Mapping | None,
             options: SendOptions, task: type[Task] | None = None) -> AsyncResult:
        """Send one task with its options (what ``apply_async`` and ``send_task`` do)."""
        options = options.resolved(self.config, task)
        route = options.route(self.config, name)
        if self._testing is not None or self.config["task_always_eager"]:
            from . import testing
            propagate = self._testing if self._testing is not None \
                else self.config["task_eager_propagates"]
            return testing.run(self, name, args, kwargs, options, route, propagate)
        session = self.session()
        with self.session_lock():
            if options.connect_timeout is not None:
                session.publisher.connect_timeout = options.connect_timeout
            pooled = options.publisher is None and options.connection is None
            # With a result store the worker writes results there: no reply queue.
            no_reply = options.ignore_result or self.store is not None
            message = options.encode(
                name, args, kwargs, reply_to=None if no_reply or pooled
                else session.results.reply_to())
            body = (tuple(args or ()), dict(kwargs or {}), None)
            signals.before_task_publish.send(
                sender=name, body=body, exchange=route.exchange, routing_key=route.routing_key,
                headers=message.headers, properties={"correlation_id": message.correlation_id,
                                                     "reply_to": message.reply_to,
                                                     "priority": message.priority},
                declare=list(route.declare), retry_policy=options.retry_policy)
            if pooled:
                # The reply queue belongs to the connection: resolved on each
                # attempt, so a send retried on a new connection names the new one.
                sent = session.publisher.publish(
                    message, route, options,
                    reply=None if no_reply else session.results.reply_to)
            elif options.publisher is not None:
                sent = options.publisher.publish(message, route, options)
            else:
                # A publisher per call, closed after it (its channel with it).
                with Publisher(self, connection=options.connection) as borrowed:
                    sent = borrowed.publish(message, route, options)
            signals.after_task_publish.send(sender=name, body=body, headers=message.headers,
                                            exchange=route.exchange,
                                            routing_key=route.routing_key)
            result = AsyncResult(options.task_id, app=self, task_name=name,
                                 reply_to=sent.reply_to)
            result._claim(session.results)
        return result

    @property
    def control(self) -> Control:
        """Remote control of the workers, and revokes (:class:`taskd.control.Control`)."""
        if self._control is None:
            self._control = Control(self)
        return self._control

    def AsyncResult(self, task_id: str) -> AsyncResult:
        return AsyncResult(task_id, app=self)


current.set_default_factory(App.from_environment)
