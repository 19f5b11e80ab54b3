"""The beat's link to the broker: one connection, one transactional channel.

:class:`~taskd.worker.beat.Beat` consumes ``worker.beat_queue`` here and
publishes and acknowledges only through :meth:`BeatLink.commit`, one AMQP
transaction at a time, so that a task, its entry's next cursor and the old
cursor's acknowledgement take effect together or not at all
(``docs/periodic.md``). The channel is in transaction mode, so it cannot use
publisher confirms: ``tx.commit-ok`` is the broker's confirm.

The link reconnects with back-off after a loss (not at once after one that
lived a while), and ends its session when the worker stops or a reload changes
the queue or turns the beat off (:attr:`BeatLink.restart`).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

import pika

from ..broker import topology
from ..exceptions import TaskdError
from .amqp import AsyncChannel, ChannelLost
from .recovery import ReconnectPacer, backoff

log = logging.getLogger("taskd.beat")


class BeatLink:
    """``host`` (the Beat) is read for ``config``, ``queue`` and ``enabled``, and hears
    ``on_message`` (pika's), ``standing_by()`` (a coroutine run while consuming),
    ``lost(reason)``, ``forget()`` (the channel is gone) and ``on_return``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: Any, shutdown: Any) -> None:
        self.loop, self.host, self.shutdown = loop, host, shutdown
        self.conn: Optional[AsyncChannel] = None
        self.lock = asyncio.Lock()          # one transaction at a time on the channel
        self.declared: set = set()          # routes declared on this connection
        self.task: Optional[asyncio.Task] = None
        self.restart = asyncio.Event()      # a reload changed the queue or turned beat off
        self.pacer = ReconnectPacer()
        self._lost: Optional[asyncio.Future] = None
        self.nodes: Any = None              # the failover order over broker.url's nodes

    @property
    def channel(self) -> Any:
        return self.conn.channel if self.conn is not None else None

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        host, attempt = self.host, 0
        while host.enabled and not self.shutdown.stopping:
            self.restart.clear()
            try:
                await self._session()
                attempt = 0
            except (ChannelLost, TaskdError, OSError, pika.exceptions.AMQPError) as exc:
                log.warning("beat: %s; trying again", exc)
            finally:
                host.forget()
                self.declared.clear()
                if self.conn is not None:
                    await self.conn.close()
            if self.shutdown.stopping or not host.enabled:
                break
            try:        # a shutdown cuts the pause short
                await asyncio.wait_for(self.shutdown.requested.wait(),
                                       max(self.pacer.lost(), backoff(attempt)))
            except asyncio.TimeoutError:
                pass
            attempt += 1
        host.forget(off=True)

    async def _session(self) -> None:
        host, cfg = self.host, self.host.config
        self._lost = self.loop.create_future()
        if self.nodes is None or self.nodes.urls != cfg.broker_urls:
            self.nodes = cfg.nodes()    # kept across sessions: a dead node is tried last
        self.conn = conn = AsyncChannel(
            self.loop, cfg.broker_url, connect_timeout=cfg["broker.connect_timeout"],
            heartbeat=cfg["broker.heartbeat"], name="taskd-worker-beat",
            on_lost=self._on_lost, on_return=host.on_return, tls=cfg["broker.tls"],
            nodes=self.nodes)
        channel = await conn.open()
        await conn.call(channel.queue_declare, host.queue, durable=True,
                        arguments={"x-single-active-consumer": True})
        await conn.call(channel.tx_select)
        channel.basic_consume(host.queue, host.on_message)
        self.pacer.connected()
        standing = self.loop.create_task(host.standing_by())
        waits = [self._lost, self.loop.create_task(self.shutdown.requested.wait()),
                 self.loop.create_task(self.restart.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            standing.cancel()
            for w in waits[1:]:
                w.cancel()
        if self._lost.done():
            raise ChannelLost(f"lost the broker connection ({self._lost.result()})")

    def _on_lost(self, reason: Any) -> None:
        self.host.lost(reason)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason or "closed")

    async def commit(self, work: Callable[[Any], None], acks: list) -> None:
        """Run ``work(channel)`` (publishes and acks), ack ``acks`` (emptied), and commit
        it all as one transaction. Raises ChannelLost if the channel goes first."""
        async with self.lock:
            conn = self.conn
            if conn is None or not conn.is_open:
                raise ChannelLost("the beat channel is closed")
            channel = conn.channel
            work(channel)
            tags = list(acks)
            acks.clear()
            for tag in tags:
                channel.basic_ack(tag)
            await conn.call(channel.tx_commit)

    async def declare(self, route: Any, config: Any) -> None:
        """Declare where a task goes, once per connection (declarations are not part of
        any transaction)."""
        if not route.declare or route.declare in self.declared:
            return
        conn = self.conn
        for op in topology.plan_queues(config, route.declare):
            if isinstance(op, topology.DeclareExchange):
                await conn.call(conn.channel.exchange_declare, op.name, exchange_type=op.type,
                                durable=op.durable)
            elif isinstance(op, topology.DeclareQueue):
                await conn.call(conn.channel.queue_declare, op.name, durable=op.durable,
                                arguments=op.argument_dict)
            else:
                await conn.call(conn.channel.queue_bind, op.queue, op.exchange,
                                routing_key=op.routing_key)
        self.declared.add(route.declare)

    async def close(self) -> None:
        """The worker stops: wait (a few seconds at most) for the session to end."""
        self.restart.set()
        if self.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.task), 6)
            except (asyncio.TimeoutError, Exception):
                pass


def publish(channel: Any, queue: str, kind: str, body: bytes, persistent: bool = False,
            expiration: Optional[str] = None) -> None:
    """Publish one of the beat's own messages (``kind``: its AMQP ``type``) to ``queue``."""
    channel.basic_publish("", queue, body, pika.BasicProperties(
        type=kind, delivery_mode=2 if persistent else 1, expiration=expiration,
        content_type="application/json"))


def task_properties(message: Any) -> pika.BasicProperties:
    """The AMQP properties of a task message (as the client's publisher sets them)."""
    return pika.BasicProperties(
        content_type=message.content_type, content_encoding=message.content_encoding,
        correlation_id=message.correlation_id, priority=message.priority, delivery_mode=2,
        headers=message.headers, expiration=message.expiration)
