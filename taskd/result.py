"""Results through the rpc pattern: one reply queue per client connection.

The client declares a private, exclusive, auto-deleted queue
(``taskd.reply.<uuid>``) on its pooled connection and sends its name as the
``reply_to`` of every task that wants a result. Workers publish the result
there with ``correlation_id`` = task id.

Design notes:

* **A fresh name per connection.** After a half-open connection the broker
  keeps the old exclusive queue until its heartbeat timeout, and declaring
  that name again fails with ``405 RESOURCE_LOCKED``. The name is resolved
  on each publish attempt (the publisher calls :meth:`ResultConsumer.reply_to`
  after it connects), so a send retried on a new connection names the new
  queue.
* **A lost reply queue fails fast.** Each :class:`AsyncResult` knows the
  queue its task was sent with. When that queue is gone (its connection was
  lost, or the broker cancelled its consumer because the queue was deleted),
  ``get()`` raises ``ConnectionError`` at once: that result can no longer
  arrive. The next send declares a new queue.
* **Only accepted content is decoded.** A result whose content type is not in
  ``result_accept_content`` (default: ``accept_content``) becomes a FAILURE
  without its body being touched: anyone who can publish to ``amq.default``
  can reach the reply queue.
* **Bounded memory.** A result is kept in a slot shared by the live
  ``AsyncResult`` handles of its task id, and freed with them. A result that
  no handle waits for (a ``delay()`` whose result is never asked for) goes to
  a small LRU (:data:`UNCLAIMED_MAX`), where an ``AsyncResult`` made later
  from the id finds it.
* **get() does not hold the send lock.** pika is not thread-safe, so all I/O
  happens under the session lock (a fair :class:`~taskd.app.TurnLock`);
  ``get()`` reads the socket in slices of at most :data:`WAIT_SLICE` seconds
  and releases the lock between them, so another thread's send waits at most
  one slice.
"""
from __future__ import annotations

import collections
import time
import uuid
import weakref

import pika.exceptions

from typing import TYPE_CHECKING, Any

from . import current, protocol, serialization
from .broker.connection import CONNECTION_ERRORS
from .exceptions import ConnectionError as TaskdConnectionError
from .exceptions import TaskRevokedError, dict_to_exception
from .exceptions import TimeoutError as TaskdTimeoutError

if TYPE_CHECKING:
    from .app import App

#: Longest time ``get()`` holds the session lock while it reads the socket.
WAIT_SLICE = 0.1
#: Results that arrived for task ids no ``AsyncResult`` holds, kept (oldest dropped first).
UNCLAIMED_MAX = 1000
#: Reply queues remembered with the reason they went away.
LOST_MAX = 64


def meta_value(meta):
    """What a result's meta holds: the return value, or the exception a failure (or a
    revoke) stands for (rebuilt by the rules of :func:`dict_to_exception`)."""
    if meta["status"] in protocol.EXCEPTION_STATES:
        value = meta.get("result")
        if meta["status"] == protocol.REVOKED and not isinstance(value, dict):
            return TaskRevokedError(str(value or "revoked"))
        return dict_to_exception(value)
    return meta.get("result")


def _ready(meta):
    return meta is not None and meta.get("status") in protocol.READY_STATES


class _Slot:
    """The latest state of one task id, shared by its AsyncResult handles."""

    __slots__ = ("meta", "__weakref__")

    def __init__(self, meta=None):
        self.meta = meta


class ResultConsumer:
    """Receives result messages for one process on the pooled connection.

    Every method runs with the session lock held, except :meth:`wait`,
    which takes it slice by slice.
    """

    def __init__(self, publisher):
        self.publisher = publisher
        config = publisher.app.config
        self.accept = serialization.accept_set(
            config["result_accept_content"] or config["accept_content"])
        self.queue = None       # the live reply queue, None when there is none
        self.channel = None
        self.connection = None
        self._consumers = {}    # consumer tag -> reply queue, on self.channel
        self.lost = collections.OrderedDict()            # reply queue -> why it went away
        self._slots = weakref.WeakValueDictionary()       # task id -> _Slot
        self._unclaimed = collections.OrderedDict()      # task id -> meta

    # -- the reply queue --------------------------------------------------------
    def reply_to(self):
        """The live reply queue on the publisher's connection, declared if needed."""
        try:
            if self._live() is not None:
                self.connection.process_data_events(0)   # a cancel may be waiting
            if self._live() is None:
                self.publisher.open_channel()
                self._declare(self.publisher.connection)
        except (*CONNECTION_ERRORS, pika.exceptions.AMQPChannelError) as exc:
            self._lose(f"the connection failed ({exc})")
            raise TaskdConnectionError(f"cannot set up the reply queue: {exc}") from None
        return self.queue

    def _declare(self, connection):
        if self.connection is not connection or self.channel is None or not self.channel.is_open:
            self.channel = connection.channel()
            self.channel.add_on_cancel_callback(self._on_cancel)
            self.connection, self._consumers = connection, {}
        name = f"taskd.reply.{uuid.uuid4()}"
        self.channel.queue_declare(name, exclusive=True, auto_delete=True)
        self._consumers[self.channel.basic_consume(name, self._on_message, auto_ack=True)] = name
        self.queue = name

    def _on_cancel(self, frame):
        queue = self._consumers.pop(frame.method.consumer_tag, None)
        if queue is not None:
            self._lose("the broker cancelled its consumer (was the queue deleted?)", queue)

    def _live(self):
        """The reply queue if it can still receive results, else None."""
        if self.queue is None:
            return None
        if self.connection is not self.publisher.connection or not self.connection.is_open:
            self._lose("the connection it was declared on was lost")
        elif not self.channel.is_open:
            self._lose("its channel was closed")
        return self.queue

    def _lose(self, why, queue=None):
        queue = queue or self.queue
        if queue is not None and queue not in self.lost:
            self.lost[queue] = why
            while len(self.lost) > LOST_MAX:
                self.lost.popitem(last=False)
        if queue == self.queue:
            self.queue = None

    # -- receiving ----------------------------------------------------------------
    def _on_message(self, channel, method, properties, body):
        try:
            meta = protocol.decode_result(body, properties.content_type,
                                          properties.content_encoding, accept=self.accept)
        except Exception as exc:  # a refused or broken result still answers the caller
            meta = {"status": protocol.FAILURE, "task_id": properties.correlation_id,
                    "result": protocol.exception_to_dict(exc), "traceback": None}
        task_id = properties.correlation_id or meta.get("task_id")
        if task_id:
            self._record(str(task_id), meta)

    def _record(self, task_id, meta):
        slot = self._slots.get(task_id)
        if slot is not None:
            if not _ready(slot.meta):       # a final state is never replaced
                slot.meta = meta
            return
        if not _ready(self._unclaimed.get(task_id)):
            self._unclaimed[task_id] = meta
        self._unclaimed.move_to_end(task_id)
        while len(self._unclaimed) > UNCLAIMED_MAX:
            self._unclaimed.popitem(last=False)

    def slot(self, task_id):
        """The slot of ``task_id``, shared by its handles (claims an unclaimed result)."""
        slot = self._slots.get(task_id)
        if slot is None:
            slot = _Slot(self._unclaimed.pop(task_id, None))
            self._slots[task_id] = slot
        return slot

    def poll(self):
        """Take the results that have arrived, without waiting (errors are left for get())."""
        if self._live() is not None:
            try:
                self.connection.process_data_events(0)
            except CONNECTION_ERRORS as exc:
                self._lose(f"the connection failed ({exc})")

    def _drain(self, task_id, sent_with, time_limit):
        live = self._live()
        if sent_with is not None and sent_with != live:
            why = self.lost.get(sent_with, "it was lost")
            raise TaskdConnectionError(
                f"task {task_id}: its result cannot arrive: the reply queue it was sent with "
                f"({sent_with}) is gone: {why}. The task may still run; its result is lost")
        if live is None:
            raise TaskdConnectionError(
                f"task {task_id}: this process has no reply queue to receive its result "
                "(results of tasks sent before a reconnect are lost)")
        try:
            self.connection.process_data_events(time_limit=time_limit)
        except CONNECTION_ERRORS as exc:
            self._lose(f"the connection failed while waiting ({exc})")

    def wait(self, task_id, slot, sent_with, timeout, lock):
        """Wait until ``slot`` holds a ready result; ``timeout`` None waits for ever,
        0 only takes what has arrived. ``sent_with``: the reply queue of the send."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            with lock:
                if not _ready(slot.meta):
                    self._drain(task_id, sent_with,
                                WAIT_SLICE if remaining is None else min(WAIT_SLICE, remaining))
            if _ready(slot.meta):
                return slot.meta
            if deadline is not None and time.monotonic() >= deadline:
                state = (slot.meta or {}).get("status", protocol.PENDING)
                raise TaskdTimeoutError(
                    f"task {task_id}: no result within {timeout:g}s (state: {state})")


class AsyncResult:
    """A handle on the outcome of one task: ``get()``, ``state``, ``ready()``, ..."""

    def __init__(self, id: str, app: App | None = None, task_name: str | None = None, *,
                 reply_to: str | None = None):
        self.id = id
        self.task_id = id
        self.app = app or current.get_app()
        self.task_name = task_name
        self._meta = None
        self._reply_to = reply_to       # the reply queue it was sent with, if sent here
        self._slot = None
        self._results = None            # the ResultConsumer that self._slot belongs to

    def __repr__(self):
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other):
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def _claim(self, results):
        """This handle's slot in ``results`` (call with the session lock held)."""
        if self._slot is None or self._results is not results:
            self._slot, self._results = results.slot(self.id), results
        return self._slot

    def _accept(self):
        config = self.app.config
        return serialization.accept_set(config["result_accept_content"]
                                        or config["accept_content"])

    def _refresh(self):
        """The latest state known, after taking what has arrived (never waits)."""
        store = self.app.store
        if store is not None:
            if not _ready(self._meta):
                self._meta = store.get_meta(self.id, self._accept())
            return self._meta
        if not _ready(self._meta):
            results = self.app.session().results
            with self.app.session_lock():
                slot = self._claim(results)
                results.poll()
            self._meta = slot.meta
        return self._meta

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float | None = None, **_ignored: Any) -> Any:
        """Wait for the task to finish and return its value.

        Raises the task's exception when it failed and ``propagate`` is true
        (rebuilt from its type name; see ``taskd.exceptions.dict_to_exception``),
        ``TaskRevokedError`` when it was not run,
        ``taskd.exceptions.TimeoutError`` when ``timeout`` seconds pass first
        (``timeout=0``: at once unless the result is there), and
        ``taskd.exceptions.ConnectionError`` when its result can no longer
        arrive (the reply queue it was sent with is gone; never with a result
        store: ``get()`` then waits through a store restart).
        """
        store = self.app.store
        if store is not None and not _ready(self._meta):
            self._meta = store.wait(self.id, timeout, self._accept())
        elif not _ready(self._meta):
            results = self.app.session().results
            lock = self.app.session_lock()
            with lock:
                slot = self._claim(results)
            self._meta = results.wait(self.id, slot, self._reply_to, timeout, lock)
        if self._meta["status"] == protocol.SUCCESS:
            return self._meta["result"]
        exc = self.result
        if propagate:
            raise exc
        return exc

    wait = get

    def revoke(self, connection: Any = None, terminate: bool = False,
               signal: str = "SIGTERM", wait: bool = False,
               timeout: float | None = None) -> Any:
        """Revoke the task: no worker runs it from now on (for ``worker.revoke_ttl``
        seconds, also workers started later); with ``terminate``, the child running
        it gets ``signal``. Its result becomes REVOKED. ``wait``: return the workers'
        answers, collected for ``timeout`` seconds (default 1). See
        ``app.control.revoke``."""
        return self.app.control.revoke(self.id, connection=connection, terminate=terminate,
                                       signal=signal or "SIGTERM", reply=wait,
                                       timeout=timeout or 1.0)

    @property
    def state(self) -> str:
        meta = self._refresh()
        return meta["status"] if meta else protocol.PENDING

    status = state

    def ready(self) -> bool:
        return self.state in protocol.READY_STATES

    def successful(self) -> bool:
        return self.state == protocol.SUCCESS

    def failed(self) -> bool:
        return self.state == protocol.FAILURE

    @property
    def result(self) -> Any:
        meta = self._refresh()
        return None if meta is None else meta_value(meta)

    info = result

    @property
    def traceback(self) -> str | None:
        meta = self._refresh()
        return meta.get("traceback") if meta else None

    def forget(self) -> None:
        """Remove the task's result from the result store (with ``rpc://``, only this
        handle's copy)."""
        store = self.app.store
        if store is not None:
            store.forget(self.id)
        self._meta = None
        if self._slot is not None:
            self._slot.meta = None

    @property
    def date_done(self) -> str | None:
        meta = self._refresh()
        return meta.get("date_done") if meta else None
