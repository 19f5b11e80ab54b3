"""The process-wide state of the client, in one place (a leaf: imports nothing from taskd).

taskd keeps exactly three things per process, and only here:

* **the current app**: the most recently created :class:`~taskd.App` (unless made
  with ``set_as_current=False``); a task without an ``app`` and an
  ``AsyncResult`` built without one use it. When there is none yet,
  :func:`get_app` builds one from the environment through the factory that
  :mod:`taskd.app` registers at import (:func:`set_default_factory`), so this
  module never imports the app;
* **the task registry**: task name -> task instance, for every task defined in
  this process (the worker's children look tasks up here);
* **the running task's request**: per thread (and per asyncio task, for
  ``async def`` tasks), what ``self.request`` returns while a task runs in a
  worker's child.

``taskd.app``, ``taskd.task`` and ``taskd.result`` all import this module and
none of them imports another for this state, so they form no import cycle.

Other module-level values of the client are registries filled at import time
or bounded caches, each kept beside the only code that reads it: the
serializers (:func:`taskd.serialization.register`), the float-field fix's
"installed" flag (:mod:`taskd.broker.pikashim`), and the stand-in classes for
remote exceptions (:func:`taskd.exceptions.dict_to_exception`, at most 256).
"""
from __future__ import annotations

import contextvars
import threading
from typing import Any, Callable

_app: Any = None
_default_factory: Callable[[], Any] | None = None

#: Task name -> task instance, for every task defined in this process (all apps).
registry: dict[str, Any] = {}

#: ``request.value``: the Request of the task running in this thread, or None.
request = threading.local()

#: The Request of the ``async def`` task running in this asyncio task (each coroutine a
#: child runs has its own); read before ``request``.
async_request: contextvars.ContextVar[Any] = contextvars.ContextVar("taskd_request",
                                                                    default=None)


def set_app(app: Any) -> None:
    """Make ``app`` the current app."""
    global _app
    _app = app


def peek_app() -> Any:
    """The current app, or None when no app was made yet (never builds one)."""
    return _app


def set_default_factory(factory: Callable[[], Any]) -> None:
    """Register how to build an app from the environment when none exists yet."""
    global _default_factory
    _default_factory = factory


def get_app() -> Any:
    """The current app; built by the default factory when there is none yet."""
    if _app is None:
        if _default_factory is None:
            raise RuntimeError("no taskd app: import taskd (or create an App) first")
        set_app(_default_factory())
    return _app
