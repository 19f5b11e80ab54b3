"""The one path for copies that replace a delivery: park, retry, redeliver, dead letter.

A copy is published and, once the broker confirms it, the original is acked.
Three things can make that confirm a lie or never come:

* **No queue took it.** The broker acks a message it could not route (a
  deleted delay queue, dead-letter queue or task queue) exactly as one it
  stored. So copies are published ``mandatory``: an unroutable copy comes back
  as ``basic.return`` before its ack, and :class:`~taskd.worker.amqp.AsyncChannel`
  reports that confirm as a failure. The caller then gives the original back
  (or holds it), and the worker declares its topology again so that the next
  attempt finds the queue.
* **Headers pika cannot encode** (a float, a double from a py-amqp client):
  the copy's properties are made encodable when they are built
  (:func:`taskd.worker.headers.sanitise`, in :mod:`taskd.worker.jobs`).
* **A content header larger than frame_max**: the broker would close the
  connection; :func:`taskd.worker.headers.fit` cuts the largest values first.

What remains (a window no publisher closes): a copy whose confirm is lost with
the connection may or may not be queued. The original is then redelivered and
handled again, so both may run.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Optional

from ..exceptions import ConfigError
from . import headers
from .amqp import ChannelLost
from .recovery import COPY_HEADER

log = logging.getLogger("taskd.supervisor")


class Copies:
    """Publishes copies (mandatory, made to fit) and answers their returns by declaring
    the topology again, one declaration round at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 declare: Callable[[], Awaitable[None]]) -> None:
        self.loop = loop
        self._declare = declare     # coroutine function: declare the worker's topology
        self._redeclaring = None    # the task declaring it, while it runs

    def publish(self, channel: Any, exchange: str, routing_key: str, body: bytes,
                properties: Any, on_confirm: Callable[[Optional[bool]], None]) -> None:
        """Publish a copy on ``channel`` (an AsyncChannel); ``on_confirm(ok)``: True
        only when a queue took it."""
        if channel is None or not channel.is_open:
            on_confirm(None)
            return
        cut = headers.fit(properties, channel.frame_max)
        if cut:
            log.warning("copy %s: headers too large for one frame (frame_max %d); cut: %s",
                        properties.message_id, channel.frame_max, ", ".join(cut))
        channel.publish(exchange, routing_key, body, properties, on_confirm, mandatory=True)

    def on_return(self, method: Any, properties: Any) -> None:
        """The broker returned a copy: no queue took it. Its confirm reports the failure;
        here the topology is declared again."""
        log.error("copy %s to exchange %r, routing key %r reached no queue (%s %s): the "
                  "original is kept; declaring the worker's exchanges and queues again",
                  (properties.headers or {}).get(COPY_HEADER), method.exchange,
                  method.routing_key, method.reply_code, method.reply_text)
        if self._redeclaring is None or self._redeclaring.done():
            self._redeclaring = self.loop.create_task(self._redeclare())

    async def _redeclare(self) -> None:
        try:
            await self._declare()
        except ConfigError as exc:
            log.error("could not declare the topology again: %s", "; ".join(exc.errors))
        except ChannelLost as exc:
            log.error("could not declare the topology again: %s", exc)
