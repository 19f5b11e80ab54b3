"""Publishing task messages: publisher confirms, ``mandatory`` and ``immediate``.

Every publish waits for the broker's confirm, so ``apply_async`` returns only
once the broker has taken responsibility for the message (or raises).

``immediate``: RabbitMQ >= 3.0 refuses the AMQP ``immediate`` flag (and pika
does not offer it). taskd keeps the seed's promise, "raise if the task cannot
be routed to a worker immediately", this way: before publishing, it asks the
broker (``queue.declare`` passive) how many consumers each queue the message
would land in has; if none of them has a consumer it raises
:class:`~taskd.exceptions.NotDeliveredError` and publishes nothing. It then
publishes with ``mandatory`` set, so a message that reaches no queue raises
:class:`~taskd.exceptions.UnroutableError`. A worker that goes away between
the check and the delivery leaves the message queued for the next one, as
with any task.
"""
from __future__ import annotations

import logging

import pika
import pika.exceptions

from . import topology
from .connection import CONNECTION_ERRORS, connect_blocking
from ..exceptions import ConnectionError as TaskdConnectionError
from ..exceptions import NotDeliveredError, PublishError, UnroutableError

log = logging.getLogger(__name__)


class Publisher:
    """A broker connection (or a borrowed one) with a confirmed channel.

    Use one for many sends (``task.get_publisher()``), as a context manager
    or with ``close()``. Not thread-safe: one per thread.
    """

    def __init__(self, app, connection=None, connect_timeout=None):
        self.app = app
        self.connect_timeout = connect_timeout if connect_timeout is not None else \
            app.config["broker.connect_timeout"]
        self._owns_connection = connection is None
        self.connection = connection
        self.channel = None
        self._declared = set()
        #: Called with the new connection each time this publisher (re)connects.
        self.on_connect = []

    # -- life cycle ---------------------------------------------------------
    def _ensure_open(self):
        if self.connection is None or not self.connection.is_open:
            if not self._owns_connection:
                raise TaskdConnectionError("the connection passed to taskd is closed")
            self.connection = connect_blocking(
                self.app.config.broker_url, self.connect_timeout,
                self.app.config["broker.heartbeat"], name="taskd-client")
            self.channel, self._declared = None, set()
            for callback in self.on_connect:
                callback(self.connection)
        if self.channel is None or not self.channel.is_open:
            self.channel = self.connection.channel()
            self.channel.confirm_delivery()
            self._declared = set()
        return self.channel

    def close(self):
        try:
            if self.channel is not None and self.channel.is_open:
                self.channel.close()
            if self._owns_connection and self.connection is not None and self.connection.is_open:
                self.connection.close()
        except CONNECTION_ERRORS:
            pass
        finally:
            self.channel = None
            if self._owns_connection:
                self.connection = None

    def __enter__(self):
        self._ensure_open()
        return self

    def __exit__(self, *exc):
        self.close()

    # -- declarations ---------------------------------------------------------
    def ensure(self, ops):
        """Declare what is not yet declared on this channel (idempotent)."""
        todo = [op for op in ops if op not in self._declared]
        if todo:
            topology.execute_blocking(self._ensure_open(), todo)
            self._declared.update(todo)

    def consumer_count(self, queue):
        frame = self._ensure_open().queue_declare(queue, passive=True)
        return frame.method.consumer_count

    # -- publishing -----------------------------------------------------------
    def publish(self, message, route, *, mandatory=False, immediate=False, retry=True):
        """Publish an :class:`~taskd.protocol.OutgoingMessage` and wait for its confirm."""
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            try:
                return self._publish_once(message, route, mandatory, immediate)
            except CONNECTION_ERRORS as exc:
                log.warning("publish of task %s failed (%s); %s", message.task_id, exc,
                            "reconnecting" if attempt + 1 < attempts else "giving up")
                self.channel = None
                if self._owns_connection:
                    self.connection = None
                if attempt + 1 >= attempts:
                    raise TaskdConnectionError(
                        f"task {message.task_id} was not sent: the broker connection failed ({exc})"
                    ) from None

    def _publish_once(self, message, route, mandatory, immediate):
        channel = self._ensure_open()
        if immediate:
            # A queue with a consumer exists already: nothing to declare.
            self._check_consumers(message, route)
            channel = self._ensure_open()
            mandatory = True
        elif route.declare:
            self.ensure(topology.plan_queues(self.app.config, route.declare))
        properties = pika.BasicProperties(
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            priority=message.priority,
            delivery_mode=2,
            headers=message.headers,
            expiration=message.expiration,
        )
        try:
            channel.basic_publish(route.exchange, route.routing_key, message.body,
                                  properties, mandatory=mandatory)
        except pika.exceptions.UnroutableError:
            raise UnroutableError(
                f"task {message.task_name}[{message.task_id}] reached no queue: exchange "
                f"{route.exchange or '(default)'!r} has no binding for routing key "
                f"{route.routing_key!r}") from None
        except pika.exceptions.NackError:
            raise PublishError(
                f"the broker refused task {message.task_id} (basic.nack)") from None
        except pika.exceptions.ChannelClosedByBroker as exc:
            self.channel = None
            if exc.reply_code == 404:
                raise UnroutableError(
                    f"task {message.task_id} not sent: exchange {route.exchange!r} does not exist "
                    "(declare it under exchanges: in the configuration)") from None
            raise PublishError(f"task {message.task_id} not sent: {exc.reply_text}") from None

    def _check_consumers(self, message, route):
        queues = [q.name for q in route.declare] or (
            [route.routing_key] if route.exchange == "" else [])
        if not queues:
            raise NotDeliveredError(
                f"immediate=True: cannot tell which queues exchange {route.exchange!r} routes "
                f"{route.routing_key!r} to (declare them under queues: in the configuration)")
        try:
            counts = {q: self.consumer_count(q) for q in queues}
        except pika.exceptions.ChannelClosedByBroker:
            self.channel = None
            counts = {}
        if not any(counts.values()):
            raise NotDeliveredError(
                f"immediate=True: no worker is consuming {', '.join(queues)}; "
                f"task {message.task_id} was not sent")
