"""The application: configuration, task registration, and sending.

``App("tasks", config="/etc/taskd.yaml")`` or ``App("tasks", broker="amqp://...")``.
Each process keeps one pooled broker connection per app (re-created after
``fork`` and after it dies); every publish on it is confirmed by the broker.
"""
from __future__ import annotations

import importlib
import math
import os
import uuid
from datetime import datetime, timedelta, timezone
from numbers import Real

from . import config as config_mod
from . import protocol, routing
from .broker.connection import ProcessLocal
from .broker.publisher import Publisher
from .exceptions import OptionError
from .result import AsyncResult, ResultConsumer
from .task import Task, registry

_current = None


def current_app():
    """The most recently created :class:`App`, or one built from the environment.

    The environment app reads ``$TASKD_CONFIG`` when set (else
    ``/etc/taskd.yaml`` if it exists, else the defaults), and honours
    ``$TASKD_BROKER_URL``.
    """
    if _current is None:
        path = os.environ.get("TASKD_CONFIG")
        if path is None and os.path.exists(config_mod.DEFAULT_PATH):
            path = config_mod.DEFAULT_PATH
        App(config=path)
    return _current


def _seconds_from(now, seconds, option):
    """``now`` plus ``seconds``, or an OptionError naming ``option``."""
    if not math.isfinite(seconds):
        raise OptionError(f"{option} must be a finite number of seconds, got {seconds!r}")
    try:
        return now + timedelta(seconds=seconds)
    except OverflowError:
        raise OptionError(f"{option}={seconds!r} seconds is out of range (a date must fall "
                          "between the years 1 and 9999)") from None


class Session:
    """The per-process pooled connection: a publisher and the result consumer."""

    def __init__(self, app):
        self.publisher = Publisher(app)
        self.results = ResultConsumer(self.publisher)

    def close(self):
        self.publisher.close()


class App:
    def __init__(self, main=None, *, config=None, broker=None, set_as_current=True):
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
        self.main = main
        for module in self.config["serializer_modules"]:
            importlib.import_module(module)
        self._session = ProcessLocal(lambda: Session(self))
        if set_as_current:
            global _current
            _current = self

    def __repr__(self):
        return f"<taskd.App {self.main or ''} {self.config.source}>"

    # -- tasks ------------------------------------------------------------------
    def task(self, fn=None, **options):
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

    @property
    def tasks(self):
        return registry

    # -- connections ------------------------------------------------------------
    def session(self) -> Session:
        return self._session.get()

    def session_lock(self):
        return self._session.lock

    def get_publisher(self, connect_timeout=None, connection=None, window=1000) -> Publisher:
        """A publisher with its own connection (or ``connection``), for many sends.

        Its sends are pipelined: up to ``window`` messages await their confirm
        at once; ``flush()``/``close()``/leaving ``with`` waits for them all
        and raises ``PublishError`` naming any task the broker did not take.
        ``window=0`` waits for each confirm, like the pooled connection.
        """
        return Publisher(self, connection=connection, connect_timeout=connect_timeout,
                         window=window)

    def close(self):
        """Close this process's pooled connection (it reopens on the next send)."""
        session = self._session.peek()
        if session is not None:
            session.close()
            self._session.reset()

    # -- sending ----------------------------------------------------------------
    def send_task(self, name, args=None, kwargs=None, *, task=None, countdown=None, eta=None,
                  expires=None, serializer=None, exchange=None, routing_key=None, queue=None,
                  priority=None, mandatory=None, immediate=None, connect_timeout=None,
                  publisher=None, connection=None, task_id=None, headers=None,
                  time_limit=None, soft_time_limit=None, ignore_result=None, retries=0,
                  retry=True, retry_policy=None):
        """Send a task by name; the task's code is not needed here."""
        attr = (lambda key, value: value if value is not None else getattr(task, key, None))
        serializer = attr("serializer", serializer) or self.config["default_serializer"]
        ignore_result = bool(attr("ignore_result", ignore_result))
        route = routing.resolve(
            self.config, name, queue=queue, exchange=exchange, routing_key=routing_key,
            task_queue=getattr(task, "queue", None), task_exchange=getattr(task, "exchange", None),
            task_routing_key=getattr(task, "routing_key", None))
        task_id = task_id or str(uuid.uuid4())
        now = datetime.now(timezone.utc)
        if countdown is not None:
            if not isinstance(countdown, Real) or isinstance(countdown, bool):
                raise TypeError(f"countdown must be a number of seconds, got {countdown!r}")
            eta = _seconds_from(now, countdown, "countdown")
        if eta is not None and not isinstance(eta, datetime):
            raise TypeError(f"eta must be a datetime, got {type(eta).__name__}")
        if isinstance(expires, Real) and not isinstance(expires, bool):
            expires = _seconds_from(now, expires, "expires")
        elif expires is not None and not isinstance(expires, datetime):
            raise TypeError(f"expires must be seconds or a datetime, got {type(expires).__name__}")

        session = self.session()
        with self.session_lock():
            if connect_timeout is not None:
                session.publisher.connect_timeout = connect_timeout
            pooled = publisher is None and connection is None
            message = protocol.encode_task(
                task_id, name, args or (), kwargs or {}, serializer=serializer, eta=eta,
                expires=expires, retries=retries,
                time_limit=attr("time_limit", time_limit),
                soft_time_limit=attr("soft_time_limit", soft_time_limit),
                reply_to=None if ignore_result or pooled else session.results.reply_to(),
                priority=routing.amqp_priority(attr("priority", priority)),
                ignore_result=ignore_result, extra_headers=headers)
            options = dict(mandatory=bool(attr("mandatory", mandatory)),
                           immediate=bool(attr("immediate", immediate)),
                           retry=retry, retry_policy=retry_policy)
            if pooled:
                # The reply queue belongs to the connection: resolved on each
                # attempt, so a send retried on a new connection names the new one.
                sent = session.publisher.publish(
                    message, route, reply=None if ignore_result else session.results.reply_to,
                    **options)
            elif publisher is not None:
                sent = publisher.publish(message, route, **options)
            else:
                # A publisher per call, closed after it (its channel with it).
                with Publisher(self, connection=connection) as borrowed:
                    sent = borrowed.publish(message, route, **options)
            result = AsyncResult(task_id, app=self, task_name=name, reply_to=sent.reply_to)
            result._claim(session.results)
        return result
    def AsyncResult(self, task_id):
        return AsyncResult(task_id, app=self)
