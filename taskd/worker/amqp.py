"""pika on the supervisor's asyncio loop: one connection, one channel.

pika's asynchronous API takes callbacks; :meth:`AsyncChannel.call` turns a
method that takes ``callback=`` into an awaitable, and fails every pending
call when the channel or connection closes, so the supervisor's set-up code
reads top to bottom. Nothing here blocks the loop.

The supervisor uses two of these: one to consume (and ack) and one to
publish results and dead letters with confirms. RabbitMQ blocks a
publishing connection under a resource alarm; if the same connection also
consumed, acks would stall too.
"""
from __future__ import annotations

import asyncio
import logging

import pika
from pika.adapters.asyncio_connection import AsyncioConnection

from ..broker.connection import describe_failure, parameters
from ..exceptions import ConnectionError as TaskdConnectionError

log = logging.getLogger(__name__)


class ChannelLost(TaskdConnectionError):
    """The channel or connection closed while a call was pending.

    ``reason`` is pika's exception for the close (``ChannelClosedByBroker`` with
    a ``reply_code`` when the broker refused something).
    """

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason

    @property
    def refused(self):
        """True when the broker closed the channel over a precondition or access error."""
        return getattr(self.reason, "reply_code", None) in (403, 405, 406)


class AsyncChannel:
    def __init__(self, loop, url, *, connect_timeout, heartbeat, name, on_lost, tls=None):
        self.loop, self.url, self.tls = loop, url, tls
        self.connect_timeout, self.heartbeat, self.name = connect_timeout, heartbeat, name
        self.on_lost = on_lost          # called with (reason) on an unexpected close
        self.connection = None
        self.channel = None
        self.closing = False
        self.blocked = False
        self._pending = set()
        self._confirms = {}             # publish seq -> callback(ok)
        self._publish_seq = 0

    # -- opening ------------------------------------------------------------
    async def open(self):
        opened = self.loop.create_future()
        params = parameters(self.url, self.connect_timeout, self.heartbeat, self.name, self.tls)

        def on_open(connection):
            if not opened.done():
                opened.set_result(connection)

        def on_open_error(connection, exc):
            if not opened.done():
                opened.set_exception(TaskdConnectionError(
                    describe_failure(self.url, exc, self.connect_timeout, self.tls)))

        self.closing = False
        self.connection = AsyncioConnection(params, on_open, on_open_error, self._on_closed,
                                            custom_ioloop=self.loop)
        await opened
        self.connection.add_on_connection_blocked_callback(self._on_blocked)
        self.connection.add_on_connection_unblocked_callback(self._on_unblocked)
        channel_ready = self.loop.create_future()
        self.connection.channel(on_open_callback=channel_ready.set_result)
        self.channel = await channel_ready
        self.channel.add_on_close_callback(self._on_channel_closed)
        return self.channel

    async def enable_confirms(self):
        await self.call(self.channel.confirm_delivery, ack_nack_callback=self._on_confirm)
        self._publish_seq = 0
        self._confirms.clear()

    # -- calls ----------------------------------------------------------------
    def call(self, method, *args, **kwargs):
        """Call a pika method taking ``callback=``; returns an awaitable of its frame."""
        future = self.loop.create_future()
        self._pending.add(future)

        def done(frame=None):
            self._pending.discard(future)
            if not future.done():
                future.set_result(frame)

        method(*args, callback=done, **kwargs)
        return future

    def publish(self, exchange, routing_key, body, properties, on_confirm=None, mandatory=False):
        """Publish; ``on_confirm(ok)`` runs when the broker confirms (needs confirms on)."""
        self.channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
        self._publish_seq += 1
        if on_confirm is not None:
            self._confirms[self._publish_seq] = on_confirm

    def _on_confirm(self, frame):
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        tag = method.delivery_tag
        if method.multiple:
            done = [seq for seq in self._confirms if seq <= tag]
        else:
            done = [tag] if tag in self._confirms else []
        for seq in done:
            callback = self._confirms.pop(seq)
            callback(ok)

    @property
    def is_open(self):
        return self.channel is not None and self.channel.is_open

    # -- closing ----------------------------------------------------------------
    def _fail_pending(self, text, reason=None):
        for future in list(self._pending):
            if not future.done():
                future.set_exception(ChannelLost(text, reason))
        self._pending.clear()
        confirms, self._confirms = self._confirms, {}
        for callback in confirms.values():
            callback(None)   # None: unknown, the connection went away

    def _on_channel_closed(self, channel, reason):
        self._fail_pending(f"channel closed: {reason}", reason)
        if self.connection is not None and self.connection.is_open and not self.closing:
            # A channel error (e.g. PRECONDITION_FAILED) closes only the channel.
            self.connection.close()

    def _on_closed(self, connection, reason):
        self._fail_pending(f"connection closed: {reason}", reason)
        self.channel = None
        if not self.closing:
            self.on_lost(reason)

    def _on_blocked(self, connection, frame):
        self.blocked = True
        log.warning("%s: the broker blocked this connection (resource alarm)", self.name)

    def _on_unblocked(self, connection, frame):
        self.blocked = False
        log.info("%s: the broker unblocked this connection", self.name)

    async def close(self):
        self.closing = True
        if self.connection is None or self.connection.is_closed:
            return
        closed = self.loop.create_future()
        self.connection.add_on_close_callback(lambda *a: closed.done() or closed.set_result(None))
        if not self.connection.is_closing:
            self.connection.close()
        try:
            await asyncio.wait_for(closed, 5)
        except asyncio.TimeoutError:
            log.warning("%s: the broker did not confirm the close in 5s", self.name)
