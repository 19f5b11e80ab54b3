"""pika on the supervisor's asyncio loop: one connection, one channel.

pika's asynchronous API takes callbacks; :meth:`AsyncChannel.call` turns a
method that takes ``callback=`` into an awaitable, and fails every pending
call when the channel or connection closes, so the supervisor's set-up code
reads top to bottom. Nothing here blocks the loop, and no call waits for ever:
a broker that does not answer within ``CALL_TIMEOUT`` fails the call and
closes the connection, so that the worker reconnects as after any loss.

The supervisor uses two of these: one to consume (and ack) and one to
publish results and dead letters with confirms. RabbitMQ blocks a
publishing connection under a resource alarm; if the same connection also
consumed, acks would stall too.

A copy that replaces a delivery is published ``mandatory``: a message that
reaches no queue comes back as ``basic.return`` before the broker acks it, and
an ack alone would take a dropped copy for delivered. Returns are matched to
their publish by ``message_id`` (each copy has its own), and the confirm of a
returned message reports ``ok=False``; ``on_return`` hears of it.

When the broker closes the channel (a refused publish, an unknown delivery
tag), the connection is closed too, and ``on_lost`` receives the channel's
reason, not the "normal shutdown" of that close.
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Callable, Optional

import pika
from pika.adapters.asyncio_connection import AsyncioConnection

from ..broker.connection import all_failed, describe_failure, describe_node, parameters
from ..exceptions import ConnectionError as TaskdConnectionError

log = logging.getLogger(__name__)

CALL_TIMEOUT = 30.0     # seconds a broker call may take before the channel counts as lost


class ChannelLost(TaskdConnectionError):
    """The channel or connection closed while a call was pending.

    ``reason`` is pika's exception for the close (``ChannelClosedByBroker`` with
    a ``reply_code`` when the broker refused something).
    """

    def __init__(self, message: str, reason: Any = None) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def refused(self) -> bool:
        """True when the broker closed the channel over a precondition or access error."""
        return getattr(self.reason, "reply_code", None) in (403, 405, 406)


_MAX_SIZE = re.compile(r"larger than configured max size (\d+)")


def max_message_size(reason: Any) -> int:
    """The broker's ``max_message_size`` when ``reason`` is its refusal of a larger
    message (``406 PRECONDITION_FAILED - message size N is larger than configured
    max size M``); else None."""
    if getattr(reason, "reply_code", None) != 406:
        return None
    match = _MAX_SIZE.search(str(getattr(reason, "reply_text", "")))
    return int(match.group(1)) if match else None


class AsyncChannel:
    def __init__(self, loop: asyncio.AbstractEventLoop, url: str, *, connect_timeout: float,
                 heartbeat: Optional[int], name: str, on_lost: Callable[[Any], None],
                 on_return: Optional[Callable] = None, tls: Any = None,
                 nodes: Any = None) -> None:
        self.loop, self.url, self.tls = loop, url, tls
        self.nodes = nodes              # a broker.nodes.Nodes: the nodes to try, in order
        self.connect_timeout, self.heartbeat, self.name = connect_timeout, heartbeat, name
        self.on_lost = on_lost          # called with (reason) on an unexpected close
        self.on_return = on_return      # called with (method, properties) of a returned copy
        self.connection = None
        self.channel = None
        self.closing = False
        self.blocked = False
        self._pending = set()
        self._confirms = {}             # publish seq -> (callback(ok), message_id or None)
        self._returned = set()          # message_ids of mandatory publishes returned
        self._publish_seq = 0
        self._close_reason = None       # why the broker closed the channel, if it did
        self._drained = []              # futures resolved once no confirm is awaited
        self._retired = {}              # channel number -> (channel, its confirms): replaced
                                        # after a nack, closed once its confirms are in
        self._renewing = False

    # -- opening ------------------------------------------------------------
    async def open(self) -> Any:
        """Connect to the first node that answers (``nodes``' order) and open the channel."""
        urls = self.nodes.order() if self.nodes is not None else [self.url]
        failures = []
        for url in urls:
            try:
                await self._connect(url)
            except TaskdConnectionError as exc:
                failures.append((url, str(exc)))
                if self.nodes is not None:
                    self.nodes.failed(url)
                if len(urls) > 1:
                    log.warning("%s: %s; trying the next node", self.name, exc)
                continue
            self.url = url
            if self.nodes is not None:
                self.nodes.connected(url)
                where = self.nodes.position(url)
                if where:
                    log.info("%s: connected to %s (%s)", self.name, describe_node(url), where)
            break
        else:
            raise TaskdConnectionError(all_failed(failures))
        return await self._open_channel()

    async def _connect(self, url: str) -> None:
        opened = self.loop.create_future()
        params = parameters(url, self.connect_timeout, self.heartbeat, self.name, self.tls)

        def on_open(connection: Any) -> None:
            if not opened.done():
                opened.set_result(connection)

        def on_open_error(connection: Any, exc: BaseException) -> None:
            if not opened.done():
                opened.set_exception(TaskdConnectionError(
                    describe_failure(url, exc, self.connect_timeout, self.tls)))

        self.closing = False
        self._close_reason = None
        self.connection = AsyncioConnection(params, on_open, on_open_error, self._on_closed,
                                            custom_ioloop=self.loop)
        await opened

    async def _open_channel(self) -> Any:
        self.connection.add_on_connection_blocked_callback(self._on_blocked)
        self.connection.add_on_connection_unblocked_callback(self._on_unblocked)
        channel_ready = self.loop.create_future()
        self._pending.add(channel_ready)       # failed if the connection closes meanwhile
        self.connection.channel(
            on_open_callback=lambda ch: channel_ready.done() or channel_ready.set_result(ch))
        try:
            self.channel = await asyncio.wait_for(channel_ready, CALL_TIMEOUT)
        except asyncio.TimeoutError:
            raise ChannelLost(f"no answer from the broker to channel.open in "
                              f"{CALL_TIMEOUT:g}s") from None
        finally:
            self._pending.discard(channel_ready)
        self.channel.add_on_close_callback(self._on_channel_closed)
        self.channel.add_on_return_callback(self._on_return)
        return self.channel

    async def enable_confirms(self) -> None:
        await self.call(self.channel.confirm_delivery, ack_nack_callback=self._on_confirm)
        self._publish_seq = 0
        self._confirms.clear()
        self._returned.clear()
        self._retired.clear()

    async def _renew(self) -> None:
        """A publish was nacked: publish on a new channel of the same connection from now
        on. Right after a cluster node's loss, a channel that published to a quorum queue
        before its new leader was elected can stay refused for 40 s and more, while a new
        channel is taken at once (docs/clusters.md). The old channel stays open until the
        confirms it owes have come, then closes."""
        old = self.channel
        try:
            ready = self.loop.create_future()
            self._pending.add(ready)
            self.connection.channel(
                on_open_callback=lambda ch: ready.done() or ready.set_result(ch))
            try:
                channel = await asyncio.wait_for(ready, CALL_TIMEOUT)
            finally:
                self._pending.discard(ready)
            await self.call(channel.confirm_delivery, ack_nack_callback=self._on_confirm)
        except (ChannelLost, asyncio.TimeoutError, pika.exceptions.AMQPError):
            return          # the connection is going: a reconnect opens a new channel anyway
        finally:
            self._renewing = False
        if self.channel is not old or old is None:
            return          # the connection was replaced meanwhile
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        self._retired[old.channel_number] = (old, self._confirms)
        self.channel, self._confirms, self._publish_seq = channel, {}, 0
        log.warning("%s: the broker refused a publish (basic.nack); publishing on a new "
                    "channel (%d) from now on", self.name, channel.channel_number)
        self._close_retired()

    def _close_retired(self) -> None:
        for number, (channel, confirms) in list(self._retired.items()):
            if not confirms:
                del self._retired[number]
                if channel.is_open:
                    channel.close()

    # -- calls ----------------------------------------------------------------
    def call(self, method: Callable, *args: Any, timeout: float = CALL_TIMEOUT,
             **kwargs: Any) -> asyncio.Future:
        """Call a pika method taking ``callback=``; returns an awaitable of its frame.
        Without an answer in ``timeout`` seconds it fails (ChannelLost) and the
        connection is closed: a channel that does not answer is as good as lost."""
        future = self.loop.create_future()
        self._pending.add(future)

        def done(frame: Any = None) -> None:
            self._pending.discard(future)
            if not future.done():
                future.set_result(frame)

        def expired() -> None:
            if future.done():
                return
            text = f"no answer from the broker to {method.__name__} in {timeout:g}s"
            log.error("%s: %s; closing the connection", self.name, text)
            self._pending.discard(future)
            future.set_exception(ChannelLost(text))
            if self.connection is not None and self.connection.is_open:
                self.connection.close()

        timer = self.loop.call_later(timeout, expired)
        future.add_done_callback(lambda _: timer.cancel())
        method(*args, callback=done, **kwargs)
        return future

    @property
    def frame_max(self) -> int:
        """The frame size negotiated with the broker (0: no limit)."""
        return self.connection.params.frame_max if self.connection is not None else 0

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.BasicProperties,
                on_confirm: Optional[Callable[[Optional[bool]], None]] = None,
                mandatory: bool = False) -> None:
        """Publish; ``on_confirm(ok)`` runs when the broker confirms (needs confirms on):
        True, False (nacked, or ``mandatory`` and returned) or None (connection lost).
        A ``mandatory`` message needs ``on_confirm`` and a ``message_id`` of its own."""
        if mandatory and not (on_confirm and properties.message_id):
            raise ValueError("a mandatory publish needs on_confirm, and a message_id to "
                             "match its return")
        self.channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
        self._publish_seq += 1
        if on_confirm is not None:
            self._confirms[self._publish_seq] = (on_confirm,
                                                 properties.message_id if mandatory else None)

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._returned.add(properties.message_id)    # before its ack, on the same channel
        if self.on_return is not None:
            self.on_return(method, properties)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        tag = method.delivery_tag
        retired = self._retired.get(frame.channel_number)
        confirms = retired[1] if retired is not None else self._confirms
        if method.multiple:
            done = [seq for seq in confirms if seq <= tag]
        else:
            done = [tag] if tag in confirms else []
        for seq in done:
            callback, message_id = confirms.pop(seq)
            returned = message_id is not None and message_id in self._returned
            self._returned.discard(message_id)
            callback(ok and not returned)
        if retired is not None:
            self._close_retired()
        elif not ok and not self._renewing and self.channel is not None:
            self._renewing = True
            self.loop.create_task(self._renew())
        if self._drained and not self.unconfirmed:
            self._resolve_drained()

    @property
    def unconfirmed(self) -> int:
        """Publishes whose confirm has not come yet."""
        return len(self._confirms) + sum(len(c) for _ch, c in self._retired.values())

    def all_confirmed(self) -> asyncio.Future:
        """A future resolved once no confirm is awaited (at once if none is): each
        publish confirmed, refused, or failed with the connection."""
        future = self.loop.create_future()
        self._drained.append(future)
        if not self.unconfirmed:
            self._resolve_drained()
        return future

    def _resolve_drained(self) -> None:
        drained, self._drained = self._drained, []
        for future in drained:
            if not future.done():
                future.set_result(None)

    @property
    def is_open(self) -> bool:
        return self.channel is not None and self.channel.is_open

    # -- closing ----------------------------------------------------------------
    def _fail_pending(self, text: str, reason: Any = None) -> None:
        for future in list(self._pending):
            if not future.done():
                future.set_exception(ChannelLost(text, reason))
        self._pending.clear()
        ledgers = [self._confirms] + [c for _ch, c in self._retired.values()]
        self._confirms, self._retired = {}, {}
        self._returned.clear()
        for confirms in ledgers:
            for callback, _ in confirms.values():
                callback(None)   # None: unknown, the connection went away
        self._resolve_drained()

    def _on_channel_closed(self, channel: Any, reason: Any) -> None:
        if self.channel is not None and channel is not self.channel:
            # a channel replaced after a nack: closed by us once drained, or by the broker
            _old, confirms = self._retired.pop(channel.channel_number, (None, {}))
            for callback, _ in confirms.values():
                callback(None)
            if self._drained and not self.unconfirmed:
                self._resolve_drained()
            return
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self._close_reason = reason
        self._fail_pending(f"channel closed: {reason}", reason)
        if self.connection is not None and self.connection.is_open and not self.closing:
            # A channel error (e.g. PRECONDITION_FAILED) closes only the channel.
            self.connection.close()

    def _on_closed(self, connection: Any, reason: Any) -> None:
        self._fail_pending(f"connection closed: {reason}", reason)
        self.channel = None
        if not self.closing:
            if self.nodes is not None:
                self.nodes.failed(self.url)     # reconnect to the next node first
            self.on_lost(self._close_reason or reason)

    def _on_blocked(self, connection: Any, frame: Any) -> None:
        self.blocked = True
        log.warning("%s: the broker blocked this connection (resource alarm)", self.name)

    def _on_unblocked(self, connection: Any, frame: Any) -> None:
        self.blocked = False
        log.info("%s: the broker unblocked this connection", self.name)

    async def close(self) -> None:
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
