"""The link to the broker: two connections, opened, lost, and opened again.

The worker publishes on one connection (with confirms) and consumes on
another, so that a flood of confirms never delays deliveries and a publish
the broker refuses never closes the consuming channel. :meth:`Link.connect`
opens both, declares the topology and starts consuming (through the
:class:`~taskd.worker.consumer.Consumer`), retrying with back-off for
``broker.retry_for`` (:func:`taskd.worker.recovery.connect_with_retry`).

When a connection drops the running tasks go on; the unstarted and held jobs
are dropped (the broker requeues them), the deliveries of the old channel can
no longer be acked, and the link reconnects, after a pause if the connection
died young (:class:`~taskd.worker.recovery.ReconnectPacer`). Results that
could not be published meanwhile are published once it is back.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Optional

from ..broker.connection import describe_node
from ..exceptions import ConfigError
from . import lifecycle, recovery
from .amqp import AsyncChannel, max_message_size
from .consumer import prefetch_base
from .stopping import EX_CONFIG, EX_UNAVAILABLE

log = logging.getLogger("taskd.supervisor")


class Link:
    """``host``: the supervisor, read for ``config``, ``queues`` and ``concurrency``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: Any, consumer: Any, acker: Any,
                 replies: Any, copies: Any, dispatcher: Any, intake: Any, pool: Any,
                 shutdown: Any, status: Any, counters: collections.Counter) -> None:
        self.loop, self.host, self.consumer, self.acker = loop, host, consumer, acker
        self.replies, self.copies, self.dispatcher, self.intake = replies, copies, dispatcher, intake
        self.pool, self.shutdown, self.status, self.counters = pool, shutdown, status, counters
        self.publisher: Optional[AsyncChannel] = None
        self.reconnecting = True            # until the first connection is up
        self.pacer = recovery.ReconnectPacer()
        self.mailbox: Any = None            # remote control, opened before the consumer
        self.lifecycle: lifecycle.Observer = lifecycle.NOBODY
        self.nodes = host.config.nodes()   # shared by both connections: they fail over together
        self.urls = host.config.broker_urls

    @property
    def connected(self) -> bool:
        return self.consumer.is_open and not self.reconnecting

    def channel(self, name: str) -> AsyncChannel:
        cfg = self.host.config
        if (cfg.broker_urls, cfg["broker.failover"]) != (self.urls, self.nodes.strategy):
            self.urls, self.nodes = cfg.broker_urls, cfg.nodes()    # a reload changed them
        return AsyncChannel(self.loop, cfg.broker_url, connect_timeout=cfg["broker.connect_timeout"],
                            heartbeat=cfg["broker.heartbeat"], name=name,
                            on_lost=self.on_lost, on_return=self.copies.on_return,
                            tls=cfg["broker.tls"], nodes=self.nodes)

    async def open(self) -> None:
        """Open both connections, declare the topology, set QoS and start consuming."""
        host = self.host
        self.publisher = self.replies.publisher = self.channel("taskd-worker-publish")
        await self.publisher.open()
        await self.publisher.enable_confirms()
        if self.mailbox is not None and not self.mailbox.replayed:
            await self.mailbox.open()       # revokes are known before any task arrives
        base = prefetch_base(host.concurrency, host.config)
        self.acker.attach(await self.consumer.open(host.queues, base))

    async def connect(self) -> bool:
        """Connect, retrying for ``broker.retry_for``; False if it gave up (the exit code
        says why) or the worker is stopping."""
        cfg = self.host.config
        try:
            ok = await recovery.connect_with_retry(
                self.open, self.close, self.shutdown, self.status.notifier,
                cfg["broker.retry_for"], cfg["broker.retry_max_interval"])
        except ConfigError as exc:
            for error in exc.errors:
                log.error("%s", error)
            self.shutdown.exit_code, ok = EX_CONFIG, False
        if ok:
            self.reconnecting = False
            self.pacer.connected()
            if self.mailbox is not None:
                self.mailbox.open_beside()  # after a reconnect (see Mailbox.open_beside)
            self.lifecycle.connected(self.publisher)
        return ok

    async def close(self) -> None:
        if self.mailbox is not None:
            await self.mailbox.close()
        await self.consumer.close()
        if self.publisher is not None:
            await self.publisher.close()

    def on_lost(self, reason: Any) -> None:
        """A connection dropped: keep the children running, reconnect, resume."""
        if self.shutdown.stopping or self.reconnecting:
            return
        self.reconnecting = True
        self.counters["connection_lost"] += 1
        self.lifecycle.disconnected()
        limit = max_message_size(reason)
        if limit:
            self.replies.broker_max_size = limit
        pause = self.pacer.lost()
        dropped = self.dispatcher.drop()
        log.error("lost the broker connection (%s); %d running task(s) go on, %d unstarted "
                  "go back to the broker; reconnecting%s", reason, len(self.pool.busy()),
                  dropped, f" in {pause:.1f}s (it died young)" if pause else "")
        self.acker.reset()
        self.intake.forsake_channel()
        self.loop.create_task(self._recover(pause))

    async def _recover(self, pause: float = 0.0) -> None:
        await self.close()
        if pause:       # a shutdown cuts the pause short
            try:
                await asyncio.wait_for(self.shutdown.requested.wait(), pause)
            except asyncio.TimeoutError:
                pass
        if not await self.connect():
            self.reconnecting = False
            if not self.shutdown.stopping:
                self.shutdown.fail(EX_UNAVAILABLE)
                await self.shutdown.run(cold=False)
            return
        log.info("reconnected to %s; consuming %s again", describe_node(self.consumer.conn.url),
                 ", ".join(self.host.queues))
        self.replies.resend()
        self.status.notifier.ready(self.status.line())
