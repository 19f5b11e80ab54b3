"""Results through the rpc pattern: one reply queue per client process.

Each client process declares a private, exclusive, auto-deleted queue
(``taskd.reply.<uuid>``) on its pooled connection and sends its name as the
``reply_to`` of every task that wants a result. Workers publish the result
there with ``correlation_id`` = task id. A result is delivered once: the
first ``AsyncResult`` of that id in this process keeps it.

The reply queue lives as long as the connection: results of tasks sent
before a reconnect are not delivered, and ``get()`` says so.
"""
from __future__ import annotations

import time
import uuid

from . import protocol, serialization
from .broker.connection import CONNECTION_ERRORS
from .exceptions import ConnectionError as TaskdConnectionError
from .exceptions import TimeoutError as TaskdTimeoutError


class ResultConsumer:
    """Receives result messages for one process on a blocking connection."""

    def __init__(self, publisher):
        self.publisher = publisher
        self.queue = f"taskd.reply.{uuid.uuid4()}"
        self.channel = None
        self.connection = None
        self.results = {}       # task id -> meta (latest state)
        config = publisher.app.config
        self.accept = serialization.accept_set(
            config["result_accept_content"] or config["accept_content"])
        self.wanted = False     # declare the reply queue on every (re)connection
        publisher.on_connect.append(self._on_connect)

    def _on_connect(self, connection):
        if self.wanted:
            self._consume(connection)

    def _consume(self, connection):
        self.connection = connection
        self.channel = connection.channel()
        self.channel.queue_declare(self.queue, exclusive=True, auto_delete=True)
        self.channel.basic_consume(self.queue, self._on_message, auto_ack=True)

    def reply_to(self):
        """Make sure the reply queue exists and is consumed; return its name."""
        self.wanted = True
        self.publisher._ensure_open()
        connection = self.publisher.connection
        if self.channel is None or not self.channel.is_open or self.connection is not connection:
            self._consume(connection)
        return self.queue

    def _on_message(self, channel, method, properties, body):
        try:
            meta = protocol.decode_result(body, properties.content_type,
                                          properties.content_encoding, accept=self.accept)
        except Exception as exc:  # a refused or broken result still answers the caller
            meta = {"status": protocol.FAILURE, "task_id": properties.correlation_id,
                    "result": protocol.exception_to_dict(exc), "traceback": None}
        task_id = properties.correlation_id or meta.get("task_id")
        if task_id:
            self.results[task_id] = meta

    def drain(self, time_limit=0):
        if self.connection is None or not self.connection.is_open:
            raise TaskdConnectionError(
                "the connection that would receive this result is closed; "
                "results of tasks sent before a reconnect are lost")
        self.connection.process_data_events(time_limit=time_limit)

    def wait(self, task_id, timeout=None, lock=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            meta = self.results.get(task_id)
            if meta is not None and meta.get("status") in protocol.READY_STATES:
                return meta
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TaskdTimeoutError(f"task {task_id}: no result within {timeout:g}s")
            try:
                self.drain(time_limit=min(remaining, 1.0) if remaining is not None else 1.0)
            except CONNECTION_ERRORS as exc:
                raise TaskdConnectionError(
                    f"task {task_id}: connection to the broker lost while waiting ({exc})") from None


class AsyncResult:
    """A handle on the outcome of one task: ``get()``, ``state``, ``ready()``, ..."""

    def __init__(self, id, app=None, task_name=None):
        from .app import current_app
        self.id = id
        self.task_id = id
        self.app = app or current_app()
        self.task_name = task_name
        self._meta = None

    def __repr__(self):
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other):
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def _refresh(self, timeout=0):
        if self._meta is not None and self._meta["status"] in protocol.READY_STATES:
            return self._meta
        session = self.app.session()
        with self.app.session_lock():
            if timeout == 0:
                try:
                    session.results.drain(0)
                except (TaskdConnectionError, *CONNECTION_ERRORS):
                    pass
                meta = session.results.results.get(self.id)
            else:
                meta = session.results.wait(self.id, timeout)
        if meta is not None:
            self._meta = meta
        return self._meta

    def get(self, timeout=None, propagate=True, interval=None, **_ignored):
        """Wait for the task to finish and return its value.

        Raises the task's exception when it failed and ``propagate`` is true
        (rebuilt from its type name; see ``taskd.protocol.dict_to_exception``),
        ``TaskRevokedError`` when it was not run, and
        ``taskd.exceptions.TimeoutError`` when ``timeout`` seconds pass first.
        """
        meta = self._refresh(timeout=timeout)
        status = meta["status"]
        if status == protocol.SUCCESS:
            return meta["result"]
        exc = self.result
        if propagate:
            raise exc
        return exc

    wait = get

    @property
    def state(self):
        meta = self._refresh()
        return meta["status"] if meta else protocol.PENDING

    status = state

    def ready(self):
        return self.state in protocol.READY_STATES

    def successful(self):
        return self.state == protocol.SUCCESS

    def failed(self):
        return self.state == protocol.FAILURE

    @property
    def result(self):
        meta = self._refresh()
        if meta is None:
            return None
        if meta["status"] in protocol.EXCEPTION_STATES:
            from .exceptions import TaskRevokedError
            value = meta.get("result")
            if meta["status"] == protocol.REVOKED and not isinstance(value, dict):
                return TaskRevokedError(str(value or "revoked"))
            return protocol.dict_to_exception(value)
        return meta.get("result")

    info = result

    @property
    def traceback(self):
        meta = self._refresh()
        return meta.get("traceback") if meta else None

    @property
    def date_done(self):
        meta = self._refresh()
        return meta.get("date_done") if meta else None

