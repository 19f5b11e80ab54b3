"""The queues the supervisor consumes, on one consuming channel.

Holds the consumer tags of that channel (tag -> queue). A consumer ends in
one of three ways:

* taskd cancels it (a SIGHUP that drops its queue, a shutdown): pika answers
  ``basic.cancel`` only for a tag it still knows, so a tag the broker has
  already cancelled is only forgotten; waiting for its answer would wait for
  ever;
* the channel closes: the supervisor reconnects and starts a new set;
* the broker cancels it: its queue was deleted (and perhaps declared again by
  someone else), or a task overran ``consumer_timeout`` on RabbitMQ 4. The
  worker would stay connected and ready while consuming nothing, so the cancel
  is logged and the queue is declared again and consumed again at once. A
  declaration the broker refuses (the queue came back with other arguments)
  closes the channel like any refused declaration, and the reconnect reports it.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from .amqp import ChannelLost
from ..exceptions import ConfigError

log = logging.getLogger("taskd.supervisor")


class Consumers:
    """``conn``: the consuming :class:`~taskd.worker.amqp.AsyncChannel`, open;
    ``on_delivery``: pika's message callback; ``declare(queue)``: a coroutine
    that declares the queue's topology on ``conn``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: Any, on_delivery: Callable,
                 declare: Callable[[str], Awaitable[None]]) -> None:
        self.loop, self.conn = loop, conn
        self.on_delivery, self.declare = on_delivery, declare
        self.tags = {}              # consumer tag -> queue
        self.closing = False        # stopping: a broker cancel is not answered any more
        conn.channel.add_on_cancel_callback(self._on_cancelled)

    def consume(self, queue: str) -> str:
        tag = self.conn.channel.basic_consume(queue, self.on_delivery)
        self.tags[tag] = queue
        return tag

    async def cancel(self, queue: str) -> None:
        """Stop consuming ``queue``; returns once the broker has confirmed it."""
        channel = self.conn.channel
        for tag, name in list(self.tags.items()):
            if name != queue:
                continue
            del self.tags[tag]
            if channel is not None and tag in channel.consumer_tags:
                await self.conn.call(channel.basic_cancel, tag)

    async def cancel_all(self) -> None:
        """Stop consuming everything (a shutdown); raises ChannelLost if the channel goes."""
        self.closing = True
        for queue in sorted(set(self.tags.values())):
            await self.cancel(queue)

    def _on_cancelled(self, frame: Any) -> None:
        queue = self.tags.pop(frame.method.consumer_tag, None)
        if queue is None or self.closing:
            return
        log.warning("the broker cancelled the consumer of queue %s (the queue was deleted, or "
                    "a task overran the broker's consumer_timeout); declaring it and consuming "
                    "it again", queue)
        self.loop.create_task(self._resume(queue))

    async def _resume(self, queue: str) -> None:
        try:
            await self.declare(queue)
        except ConfigError as exc:
            for error in exc.errors:
                log.error("cannot consume queue %s again: %s", queue, error)
            return
        except ChannelLost:
            return              # the reconnect declares and consumes every queue
        if self.closing or not self.conn.is_open or queue in self.tags.values():
            return
        self.consume(queue)
        log.info("consuming queue %s again", queue)
