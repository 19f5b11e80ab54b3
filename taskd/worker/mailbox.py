"""Remote control: Celery's mailbox ("pidbox") protocol, and revokes kept in a stream.

The worker opens one more connection, ``taskd-worker-control``, apart from
the task connections, so that a flood of commands or a refused reply never
delays a delivery or an ack. On it:

* **Commands.** Celery's remote-control protocol (kombu's ``pidbox``): a
  fanout exchange ``<ns>.pidbox`` (``worker.control_exchange``, ``celery`` by
  default; non-durable), and this node's queue ``<node name>.<ns>.pidbox``
  bound to it (exclusive, auto-deleted, ``x-expires`` 10 s and
  ``x-message-ttl`` 300 s, as Celery declares it). A command is a JSON
  object ``{method, arguments, destination, pattern, matcher, ticket,
  reply_to: {exchange, routing_key}}``; the answer ``{node name: reply}`` goes
  to ``reply_to`` (exchange ``reply.<ns>.pidbox``) with the ``ticket`` header.
  Commands are in :mod:`taskd.worker.panel`. Only JSON is read: pickle is
  refused (a pickle from the broker is code execution). A message that is not
  a command is logged in one line and dropped; an unknown command is answered
  ``{"error": ...}``.
* **Revokes.** A revoke is honoured for ``worker.revoke_ttl`` seconds, by
  workers running when it is sent (the ``revoke`` command) and by those
  started later: each revoke is also a record in the RabbitMQ stream
  ``worker.revoke_stream`` (``x-max-age`` = the ttl). At start the worker
  replays the stream from ``now - ttl`` until it reads back a marker it
  appended, before it consumes any task, and keeps reading it afterwards.
  A revoke a Celery client sent (``celery control revoke``) is appended to
  the stream by the workers that receive it. That side is
  :class:`~taskd.worker.revoking.Revokes`, opened here on this connection.

If the node name is in use by another worker (its queue is exclusive) the
worker logs it and runs without commands; revokes still reach it through the
stream. If this connection drops while the task connections stay up, it is
opened again after a pause.
"""
from __future__ import annotations

import asyncio
import collections
import fnmatch
import json
import logging
import re
from typing import Any, Callable, Optional

import pika

from . import panel
from .amqp import AsyncChannel, ChannelLost
from .revoking import Revokes

log = logging.getLogger("taskd.supervisor")

QUEUE_ARGUMENTS = {"x-message-ttl": 300000, "x-expires": 10000}   # Celery's defaults
STREAM_PREFETCH = 1000
REOPEN_DELAY = 2.0
PIDBOX_RETRY = 10.0     # seconds between attempts to take a node name in use
JSON = panel.JSON


class Mailbox:
    """``host``: the supervisor (``config``, ``concurrency``, ``queues``, ``started_at``,
    ``handle_ttin/ttou/term``); ``connected()``: the task connections are up."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: Any, pool: Any, dispatcher: Any,
                 consumer: Any, counters: collections.Counter, hostname: str,
                 connected: Callable[[], bool]) -> None:
        self.loop, self.host, self.pool, self.dispatcher = loop, host, pool, dispatcher
        self.consumer, self.counters, self.hostname = consumer, counters, hostname
        self.connected = connected
        cfg = host.config
        self.enabled = cfg["worker.remote_control"]
        self.namespace = cfg["worker.control_exchange"]
        self.revokes = Revokes(pool, cfg, hostname, lambda: self.conn)
        self.clock = 0                      # Lamport clock, as Celery keeps one
        self.conn: Optional[AsyncChannel] = None
        self.closing = False
        self._opening = False               # a loss meanwhile is the open's to report
        self.answering = False              # this node's control queue is consumed
        self._refused = False               # its declaration was refused (logged once)
        self.replayed = False               # the revokes were read once (the first open)

    @property
    def queue(self) -> str:
        return f"{self.hostname}.{self.namespace}.pidbox"

    # == the connection =======================================================================
    def _channel(self) -> AsyncChannel:
        cfg = self.host.config
        return AsyncChannel(self.loop, cfg.broker_url, connect_timeout=cfg["broker.connect_timeout"],
                            heartbeat=cfg["broker.heartbeat"], name="taskd-worker-control",
                            on_lost=self._on_lost, tls=cfg["broker.tls"],
                            nodes=self.host.link.nodes)     # fails over with the link

    async def _connect(self) -> AsyncChannel:
        await self.close()
        self.closing = False
        self.conn = conn = self._channel()
        await conn.open()
        await conn.enable_confirms()
        await conn.call(conn.channel.basic_qos, prefetch_count=STREAM_PREFETCH)
        return conn

    async def open(self) -> None:
        """Declare and consume the control queue, then replay the revokes (before the
        worker consumes any task). Raises ChannelLost/ConnectionError like any open."""
        if not self.enabled:
            return
        self._opening = True
        try:
            await self._open()
            self.replayed = True
        finally:
            self._opening = False

    def open_beside(self) -> None:
        """After a reconnect of the link: open again beside the task consumer, not before
        it. The revokes read so far stay known; a failover can hold the revoke stream's
        declaration or replay for many seconds (its leader was on the lost node), and
        the tasks need not wait for it. Retries on its own (``REOPEN_DELAY``)."""
        if self.enabled and self.conn is None:
            self.loop.create_task(self._reopen())

    async def _open(self) -> None:
        """A refused declaration closes the channel (and AsyncChannel its connection):
        each is followed by a new connection, without what was refused."""
        conn = await self._connect()
        self.answering = await self._declare_pidbox(conn)
        if self.answering:
            _check_open(conn)
            conn.channel.basic_consume(self.queue, self._on_command, auto_ack=True)
        else:
            conn = await self._connect()
        await self.revokes.open(conn, self._connect)

    async def _declare_pidbox(self, conn: AsyncChannel) -> bool:
        """Declare this node's control queue; False (logged) if it is taken or not allowed,
        and then tried again every PIDBOX_RETRY seconds."""
        ch = conn.channel
        try:
            await conn.call(ch.exchange_declare, f"{self.namespace}.pidbox",
                            exchange_type="fanout", durable=False)
            await conn.call(ch.exchange_declare, f"reply.{self.namespace}.pidbox",
                            exchange_type="direct", durable=False)
            await conn.call(ch.queue_declare, self.queue, durable=False, exclusive=True,
                            auto_delete=True, arguments=QUEUE_ARGUMENTS)
        except ChannelLost as exc:
            code = getattr(exc.reason, "reply_code", None)
            if code not in (403, 405):
                raise
            why = (f"another worker uses the node name {self.hostname!r} (its queue "
                   f"{self.queue} is taken; if that worker was killed, the broker frees it "
                   "after a heartbeat timeout). Give each worker its own name (-n, "
                   "worker.hostname)" if code == 405 else
                   f"the broker refused it ({getattr(exc.reason, 'reply_text', exc)})")
            log.log(logging.DEBUG if self._refused else logging.ERROR,
                    "remote control: this worker answers no commands for now: %s; trying "
                    "again every %gs", why, PIDBOX_RETRY)
            self._refused = True
            self.loop.call_later(PIDBOX_RETRY, self._retry_pidbox)
            return False
        await conn.call(ch.queue_bind, self.queue, f"{self.namespace}.pidbox", routing_key="")
        if self._refused:
            log.info("remote control: answering commands as %s", self.hostname)
        self._refused = False
        return True

    def _retry_pidbox(self) -> None:
        if not self.answering and self.conn is not None and not self.host.shutdown.stopping:
            self.loop.create_task(self._reopen(force=True))

    def _on_lost(self, reason: Any) -> None:
        if self.closing:
            return
        if self._opening:       # the open fails with it (a refusal is handled there)
            self.revokes.lost(reason)
            return
        self.conn = None
        if self.connected() and not self.host.shutdown.stopping:
            log.warning("remote control connection lost (%s); opening it again in %gs",
                        reason, REOPEN_DELAY)
            self.loop.call_later(REOPEN_DELAY, self._start_reopen)

    def _start_reopen(self) -> None:
        self.loop.create_task(self._reopen())

    async def _reopen(self, force: bool = False) -> None:
        if (self.conn is not None and not force) or self.host.shutdown.stopping \
                or not self.connected() or self._opening:
            return          # the link reconnects everything, or it is back already
        try:
            await self.open()
        except Exception as exc:
            log.warning("remote control: cannot reconnect (%s); again in %gs", exc,
                        REOPEN_DELAY)
            self.conn = None
            self.loop.call_later(REOPEN_DELAY, self._start_reopen)

    async def close(self) -> None:
        self.closing = True
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()

    # == commands =============================================================================
    def _on_command(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """pika calls this for each control message (auto-acked, as Celery consumes).
        Nothing raises into pika (it would drop the frames read after this one)."""
        try:
            self._command(properties, body)
        except Exception:
            log.exception("remote control: internal error handling a command; dropped")

    def _command(self, properties: Any, body: bytes) -> None:
        headers = properties.headers or {}
        clock = headers.get("clock")
        self.clock = max(self.clock, clock if isinstance(clock, int) else 0) + 1
        try:
            message = panel.decode_command(properties.content_type, body)
        except ValueError as exc:
            self.counters["control_refused"] += 1
            log.warning("remote control: message dropped: %s", exc)
            return
        if not self._for_me(message):
            return
        name = message["method"]
        entry = panel.COMMANDS.get(name)
        if entry is None:
            log.warning("remote control: unknown command %r", name)
            self._reply(message, panel.nok(f"No such command: {name!r} (taskd answers: "
                                           f"{', '.join(sorted(panel.COMMANDS))})"))
            return
        log.log(logging.INFO if entry[0] == "control" else logging.DEBUG,
                "remote control: %s %s", name, panel.brief(message["arguments"]))
        try:
            reply = entry[1](self, **message["arguments"])
        except Exception as exc:
            reply = self._failed(name, exc)
        if asyncio.iscoroutine(reply):
            self.loop.create_task(self._finish(name, message, reply))
        else:
            self._reply(message, reply)

    async def _finish(self, name: str, message: dict, pending: Any) -> None:
        try:
            reply = await pending
        except Exception as exc:
            reply = self._failed(name, exc)
        self._reply(message, reply)

    @staticmethod
    def _failed(name: str, exc: BaseException) -> dict:
        log.warning("remote control: command %s failed: %s: %s", name, type(exc).__name__, exc)
        return panel.nok(f"{type(exc).__name__}: {exc}")

    def _for_me(self, message: dict) -> bool:
        destination, pattern, matcher = (message["destination"], message["pattern"],
                                         message["matcher"])
        if destination:
            return self.hostname in destination
        if pattern and matcher:
            if matcher == "glob":
                return fnmatch.fnmatchcase(self.hostname, pattern)
            if matcher == "pcre":
                try:
                    return re.match(pattern, self.hostname) is not None
                except re.error:
                    return False
            log.warning("remote control: message dropped: unknown matcher %r", matcher)
            return False
        return True

    def _reply(self, message: dict, reply: Any) -> None:
        reply_to = message["reply_to"]
        if not reply_to or self.conn is None or not self.conn.is_open:
            return
        exchange = reply_to["exchange"]
        if exchange != f"reply.{self.namespace}.pidbox":
            log.warning("remote control: no reply sent to exchange %r (expected "
                        "reply.%s.pidbox)", exchange[:200], self.namespace)
            return
        self.clock += 1
        body = json.dumps({self.hostname: reply}, default=panel.jsonable).encode()
        props = pika.BasicProperties(content_type=JSON, content_encoding="utf-8",
                                     delivery_mode=1,
                                     headers={"ticket": message["ticket"], "clock": self.clock})
        self.conn.publish(exchange, reply_to["routing_key"], body, props)


def _check_open(conn: AsyncChannel) -> None:
    if not conn.is_open:
        raise ChannelLost("the remote-control connection closed while it was being opened")
