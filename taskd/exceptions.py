"""Every error taskd raises on purpose, in one hierarchy.

Messages name the cause and, where there is one, the fix.

An exception raised by a task in a worker reaches the caller as a dict (see
:func:`taskd.protocol.exception_to_dict`); :func:`dict_to_exception` picks the
class that stands in for it here, never importing or calling anything else.
"""
from __future__ import annotations

import collections
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any


class TaskdError(Exception):
    """Base class of every error taskd raises on purpose."""


# --- configuration ---------------------------------------------------------

class ConfigError(TaskdError):
    """The configuration file (or an option overriding it) is invalid.

    ``errors`` holds every problem found, each a one-line string naming the
    key, the line and what was expected.
    """

    def __init__(self, errors: str | Iterable[str], source: str = "configuration"):
        if isinstance(errors, str):
            errors = [errors]
        self.errors = list(errors)
        self.source = source
        super().__init__(f"{source}: " + "; ".join(self.errors))


# --- broker ------------------------------------------------------------------

class ConnectionError(TaskdError):  # noqa: A001 - the seed's name, scoped here
    """The broker could not be reached or the connection was lost."""


class PublishError(TaskdError):
    """The broker did not take a published message (nacked, returned, or no confirm).

    ``task_ids`` lists the tasks concerned.
    """

    def __init__(self, message: str, task_ids: Iterable[str] = ()):
        super().__init__(message)
        self.task_ids = list(task_ids)


class ConfirmTimeout(PublishError):
    """The broker did not confirm a publish in time (for example while a resource
    alarm blocks the connection): the message may or may not be queued, so
    sending it again may run the task twice. ``task_ids`` lists them."""


class UnroutableError(PublishError):
    """``mandatory=True`` and the message reached no queue."""


class NotDeliveredError(PublishError):
    """``immediate=True`` and no consumer could take the message at once."""


class OptionError(TaskdError, ValueError):
    """An option of ``apply_async``/``send_task`` has a value that cannot be used."""


# --- serialization -------------------------------------------------------------

class SerializationError(TaskdError):
    """Base for encoding and decoding problems."""


class EncodeError(SerializationError):
    """A value could not be encoded with the chosen serializer."""


class DecodeError(SerializationError):
    """A body could not be decoded with its content type."""


class ContentDisallowed(SerializationError):
    """The content type is known but not in ``accept_content``."""


class UnknownSerializer(SerializationError):
    """No serializer is registered under that name or content type."""


# --- tasks and results -------------------------------------------------------

class TaskError(TaskdError):
    """Base for errors about a task's execution, as seen by the caller."""


class NotRegistered(TaskError, KeyError):
    """The worker does not know a task of that name."""

    def __str__(self):
        return Exception.__str__(self)


class InvalidTaskMessage(TaskError):
    """A message that is not a valid task message (bad headers or body)."""


class WorkerLostError(TaskError):
    """The child running the task died before reporting an outcome."""


class TimeLimitExceeded(TaskError):
    """The task ran past its hard time limit and its child was killed."""


class SoftTimeLimitExceeded(TaskError):
    """Raised inside a task when its soft time limit is reached."""


class TaskRevokedError(TaskError):
    """The task was not run (expired, or revoked)."""


class ChordError(TaskError):
    """A chord's header task failed: the chord body does not run; it fails with this and
    its error callbacks are called once."""


class TimeoutError(TaskError):  # noqa: A001 - the name callers expect
    """``AsyncResult.get(timeout=...)`` gave up before the result arrived."""


class RemoteError(TaskError):
    """Stands in for a task's exception whose class the caller cannot rebuild
    (not imported here, or not an ``Exception`` subclass, such as ``SystemExit``).

    ``remote_type`` is the remote class's ``module.name`` (None when unknown).
    """

    remote_type = None


class Retry(TaskError):
    """Raised (from ``Task.retry``) to tell the worker the task is being retried.

    ``when`` is a countdown in seconds or an ETA datetime.
    """

    def __init__(self, message: str | None = None, exc: BaseException | None = None,
                 when: float | datetime | None = None, args: Sequence | None = None,
                 kwargs: dict | None = None):
        self.exc = exc
        self.when = when
        self.new_args, self.new_kwargs = args, kwargs
        super().__init__(message or f"Retry in {when}: {exc!r}")


class MaxRetriesExceededError(TaskError):
    """The task asked for a retry past its ``max_retries``."""


# --- exceptions of other processes ------------------------------------------------

#: Synthetic RemoteError subclasses by (module, name), most recently used last;
#: bounded, so a stream of unique remote type names cannot grow it for ever.
_synthetic = collections.OrderedDict()
SYNTHETIC_CLASSES_MAX = 256


def _synthetic_class(name, module):
    key = (module, name)
    cls = _synthetic.get(key)
    if cls is None:
        cls = type(name.rsplit(".", 1)[-1], (RemoteError,), {
            "__module__": module or "taskd.remote",
            "remote_type": f"{module}.{name}" if module else name})
        _synthetic[key] = cls
        while len(_synthetic) > SYNTHETIC_CLASSES_MAX:
            _synthetic.popitem(last=False)
    else:
        _synthetic.move_to_end(key)
    return cls


def dict_to_exception(data: Any) -> Exception:
    """Rebuild an exception from ``{"exc_type", "exc_message", "exc_module"}``.

    Only classes already imported in this process and deriving from
    ``Exception`` are used (never an import, never another callable: see
    CVE-2021-23727). Anything else, including ``SystemExit``,
    ``KeyboardInterrupt``, ``GeneratorExit`` and ``CancelledError`` (which
    ``except Exception`` would not catch), becomes a ``RemoteError`` subclass
    of the same name whose ``remote_type`` names the remote class.
    """
    if isinstance(data, Exception):
        return data
    if isinstance(data, BaseException):
        cls = type(data)
        return _synthetic_class(cls.__qualname__, cls.__module__)(*data.args)
    if not isinstance(data, dict) or "exc_type" not in data:
        return RemoteError(repr(data))
    exc_type, module = str(data["exc_type"]), data.get("exc_module")
    module = None if module is None else str(module)
    cls = None
    if module in sys.modules:
        obj = sys.modules[module]
        for part in exc_type.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, type) and issubclass(obj, Exception):
            cls = obj
    if cls is None:
        cls = _synthetic_class(exc_type, module)
    message = data.get("exc_message", ())
    args = tuple(message) if isinstance(message, (list, tuple)) else (message,)
    try:
        return cls(*args)
    except Exception:
        return _synthetic_class(exc_type, module)(*args)
