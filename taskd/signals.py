"""Signals: hooks that run your code at fixed points of a task's life, Celery's names and API.

::

    from taskd.signals import worker_process_init, task_failure

    @worker_process_init.connect
    def open_db(**kwargs):
        db.connect()                # once in each child, after the task modules import

    @task_failure.connect(sender=tasks.charge)
    def page(sender, task_id, exception, **kwargs):
        ...

A receiver is called with keyword arguments only: ``signal``, ``sender`` and
the signal's own (listed with each signal below); accept ``**kwargs`` so that
an argument added later does not break it. ``sender=`` restricts a receiver to
one sender (a task object for the task signals, a task name for the publish
signals). Receivers are held through weak references unless ``weak=False``,
as in Celery: connect module-level functions, or keep a reference.

A receiver that raises is logged (logger ``taskd.signals``) with its
traceback, and the others still run: a signal never fails a task or a send.

Where each runs (see also ``docs/worker.md``):

========================== ========================================== =======================
signal                     when                                       process
========================== ========================================== =======================
worker_process_init        a child has imported ``imports:``          each worker child
worker_process_shutdown    a child is about to exit normally          each worker child
task_prerun                before a task runs                         the child (or the
                                                                      caller in test mode)
task_postrun               after it ran, whatever the outcome         the child
task_success               it returned                                the child
task_failure               it raised (not a retry)                    the child
task_retry                 it asked for a retry                       the child
before_task_publish        a task message is about to be published    the sending process
after_task_publish         the broker confirmed it                    the sending process
========================== ========================================== =======================
"""
from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Callable, Optional

log = logging.getLogger("taskd.signals")

__all__ = ["Signal", "worker_process_init", "worker_process_shutdown", "task_prerun",
           "task_postrun", "task_success", "task_failure", "task_retry",
           "before_task_publish", "after_task_publish"]


def _key(obj: Any) -> Any:
    """What identifies a sender or receiver: strings by value, anything else by identity
    (a bound method by its function and instance)."""
    if obj is None or isinstance(obj, (str, bytes)):
        return obj
    if hasattr(obj, "__func__") and hasattr(obj, "__self__"):
        return (id(obj.__self__), id(obj.__func__))
    return id(obj)


class Signal:
    """A named hook. ``connect`` a receiver; the worker or client ``send``\\ s it."""

    def __init__(self, name: str, providing_args: tuple = ()) -> None:
        self.name = name
        self.providing_args = frozenset(providing_args)
        self._receivers: list = []      # ((receiver key, sender key), ref or receiver, weak)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Signal: {self.name}>"

    def connect(self, receiver: Optional[Callable] = None, sender: Any = None,
                weak: bool = True, dispatch_uid: Any = None) -> Any:
        """Connect ``receiver``; usable as ``@sig.connect`` or ``@sig.connect(sender=x)``.
        A receiver already connected (same ``dispatch_uid``, or same function) for the
        same sender is not connected twice. Returns the receiver."""
        if receiver is None:
            return lambda fn: self.connect(fn, sender=sender, weak=weak,
                                           dispatch_uid=dispatch_uid)
        if not callable(receiver):
            raise TypeError(f"{self.name}.connect: the receiver must be callable, "
                            f"not {type(receiver).__name__}")
        key = (dispatch_uid if dispatch_uid is not None else _key(receiver), _key(sender))
        if weak:
            ref_type = weakref.WeakMethod if hasattr(receiver, "__self__") else weakref.ref
            try:
                held: Any = ref_type(receiver, self._forget)
            except TypeError:       # builtins and some callables: no weak reference
                held, weak = receiver, False
        else:
            held = receiver
        with self._lock:
            if not any(k == key for k, _, _ in self._receivers):
                self._receivers.append((key, held, weak))
        return receiver

    def disconnect(self, receiver: Optional[Callable] = None, sender: Any = None,
                   dispatch_uid: Any = None) -> bool:
        """Disconnect a receiver (by function or ``dispatch_uid``); True if it was."""
        key = (dispatch_uid if dispatch_uid is not None else _key(receiver), _key(sender))
        with self._lock:
            before = len(self._receivers)
            self._receivers = [r for r in self._receivers if r[0] != key]
            return len(self._receivers) != before

    def _forget(self, ref: Any) -> None:
        with self._lock:
            self._receivers = [r for r in self._receivers if r[1] is not ref]

    @property
    def receivers(self) -> list:
        """The live receivers (for tests and introspection)."""
        return [fn for fn, _ in self._live(None, everyone=True)]

    def _live(self, sender: Any, everyone: bool = False) -> list:
        wanted = _key(sender)
        live = []
        for (_, sender_key), held, weak in list(self._receivers):
            if not everyone and sender_key is not None and sender_key != wanted:
                continue
            fn = held() if weak else held
            if fn is not None:
                live.append((fn, sender_key))
        return live

    def send(self, sender: Any = None, **named: Any) -> list:
        """Call every receiver for ``sender``; returns ``[(receiver, response)]``. A
        receiver that raises is logged and its exception is its response."""
        if not self._receivers:
            return []
        responses = []
        for fn, _ in self._live(sender):
            try:
                response = fn(signal=self, sender=sender, **named)
            except Exception as exc:
                log.exception("signal %s: receiver %s raised %s (ignored)", self.name,
                              getattr(fn, "__qualname__", fn), type(exc).__name__)
                response = exc
            responses.append((fn, response))
        return responses

    send_robust = send


worker_process_init = Signal("worker_process_init")
worker_process_shutdown = Signal("worker_process_shutdown", ("pid", "exitcode"))
task_prerun = Signal("task_prerun", ("task_id", "task", "args", "kwargs"))
task_postrun = Signal("task_postrun",
                      ("task_id", "task", "args", "kwargs", "retval", "state"))
task_success = Signal("task_success", ("result",))
task_failure = Signal("task_failure", ("task_id", "exception", "args", "kwargs",
                                       "traceback", "einfo"))
task_retry = Signal("task_retry", ("request", "reason", "einfo"))
before_task_publish = Signal("before_task_publish",
                             ("body", "exchange", "routing_key", "headers", "properties",
                              "declare", "retry_policy"))
after_task_publish = Signal("after_task_publish",
                            ("body", "headers", "exchange", "routing_key"))
