"""``app.control``: remote control of workers, and revokes (the client side).

Speaks Celery's mailbox protocol (kombu's ``pidbox``; the worker side is
:mod:`taskd.worker.mailbox`): a command is published to the fanout exchange
``<ns>.pidbox`` (``worker.control_exchange``, ``celery`` by default), where
every worker's control queue is bound, so it reaches taskd and Celery workers
alike; answers come back to a private reply queue bound to
``reply.<ns>.pidbox`` and are collected for ``timeout`` seconds (or until
each named destination has answered).

A revoke is also appended to the stream ``worker.revoke_stream`` (publisher
confirms) *before* it is broadcast, so a worker that is down or not started
yet honours it too when it starts, within ``worker.revoke_ttl`` seconds.

Each call opens its own short connection: control is rare, and this keeps it
off the pooled connection that sends tasks.

    >>> app.control.revoke(task_id)                       # never run it
    >>> app.control.revoke(task_id, terminate=True)       # and stop it if it runs
    >>> app.control.inspect(timeout=2).active()           # {node: [task, ...]}
    >>> app.control.ping(destination=["taskd@web1"])      # [{node: {"ok": "pong"}}]
"""
from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any, Optional

import pika
import pika.exceptions

from .broker.connection import connect_blocking
from .worker import revokes

if TYPE_CHECKING:
    from .app import App

JSON = "application/json"
REPLY_QUEUE_ARGUMENTS = {"x-expires": 10000, "x-message-ttl": 300000}   # as Celery's


class Control:
    """Remote control of the workers on the app's broker (``app.control``)."""

    def __init__(self, app: App) -> None:
        self.app = app

    def _connect(self) -> pika.BlockingConnection:
        cfg = self.app.config
        return connect_blocking(cfg.broker_url, cfg["broker.connect_timeout"],
                                cfg["broker.heartbeat"], name="taskd-control",
                                tls=cfg["broker.tls"])

    @property
    def namespace(self) -> str:
        return self.app.config["worker.control_exchange"]

    # -- commands -----------------------------------------------------------------------
    def broadcast(self, command: str, arguments: Optional[dict] = None,
                  destination: Optional[list] = None, reply: bool = False,
                  timeout: float = 1.0, limit: Optional[int] = None,
                  pattern: Optional[str] = None, matcher: Optional[str] = None,
                  connection: Any = None) -> Optional[list]:
        """Send ``command`` to every worker (or those in ``destination``, a list of node
        names, or matching ``pattern`` by ``matcher`` "glob" or "pcre"). With ``reply``,
        return the answers, ``[{node: answer}, ...]``, collected for ``timeout`` seconds
        or until ``limit`` (default: the number of destinations) came."""
        if destination is not None and not isinstance(destination, (list, tuple)):
            raise ValueError(f"destination must be a list of node names, not "
                             f"{type(destination).__name__}")
        conn = connection or self._connect()
        try:
            return _Broadcast(conn, self.namespace).send(
                command, arguments or {}, list(destination) if destination else None,
                reply, timeout, limit, pattern, matcher)
        finally:
            if connection is None:
                _close(conn)

    def inspect(self, destination: Optional[list] = None, timeout: float = 1.0,
                limit: Optional[int] = None, pattern: Optional[str] = None,
                matcher: Optional[str] = None) -> Inspect:
        return Inspect(self, destination, timeout, limit, pattern, matcher)

    def ping(self, destination: Optional[list] = None, timeout: float = 1.0,
             **kwargs: Any) -> list:
        return self.broadcast("ping", destination=destination, reply=True, timeout=timeout,
                              **kwargs) or []

    def revoke(self, task_id: Any, destination: Optional[list] = None,
               terminate: bool = False, signal: str = "SIGTERM", **kwargs: Any) -> Any:
        """Revoke a task id (or a list of them) on every worker, now and for
        ``worker.revoke_ttl`` seconds, also on workers started later. ``terminate``:
        also signal (``signal``, by name) the child running it, if one does."""
        ids = revokes.task_ids(task_id)
        revokes.signal_number(signal)           # a bad name fails here, not in the workers
        given = kwargs.pop("connection", None)
        conn = given or self._connect()
        try:
            self._persist(conn, revokes.record(ids, terminate, signal,
                                               list(destination) if destination else None))
            return self.broadcast("revoke", {"task_id": ids, "terminate": bool(terminate),
                                             "signal": signal, "persisted": True},
                                  destination=destination, connection=conn, **kwargs)
        finally:
            if given is None:
                _close(conn)

    def terminate(self, task_id: Any, destination: Optional[list] = None,
                  signal: str = "SIGTERM", **kwargs: Any) -> Any:
        return self.revoke(task_id, destination=destination, terminate=True, signal=signal,
                           **kwargs)

    def _persist(self, conn: pika.BlockingConnection, record: dict) -> None:
        """Append ``record`` to the revoke stream (declared if missing), confirmed."""
        cfg = self.app.config
        stream = cfg["worker.revoke_stream"]
        ch = conn.channel()
        try:
            ch.queue_declare(stream, durable=True,
                             arguments=revokes.stream_arguments(cfg["worker.revoke_ttl"]))
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:       # 406: it exists with another ttl: use it as is
                raise
            ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", stream, json.dumps(record).encode(),
                         pika.BasicProperties(content_type=JSON, delivery_mode=2),
                         mandatory=True)
        ch.close()

    def add_consumer(self, queue: str, exchange: Optional[str] = None,
                     exchange_type: str = "direct", routing_key: Optional[str] = None,
                     destination: Optional[list] = None, **kwargs: Any) -> Any:
        return self.broadcast("add_consumer", {"queue": queue, "exchange": exchange,
                                               "exchange_type": exchange_type,
                                               "routing_key": routing_key},
                              destination=destination, **kwargs)

    def cancel_consumer(self, queue: str, destination: Optional[list] = None,
                        **kwargs: Any) -> Any:
        return self.broadcast("cancel_consumer", {"queue": queue}, destination=destination,
                              **kwargs)

    def pool_grow(self, n: int = 1, destination: Optional[list] = None, **kwargs: Any) -> Any:
        return self.broadcast("pool_grow", {"n": n}, destination=destination, **kwargs)

    def pool_shrink(self, n: int = 1, destination: Optional[list] = None,
                    **kwargs: Any) -> Any:
        return self.broadcast("pool_shrink", {"n": n}, destination=destination, **kwargs)

    def shutdown(self, destination: Optional[list] = None, **kwargs: Any) -> Any:
        return self.broadcast("shutdown", destination=destination, **kwargs)


class Inspect:
    """Read-only questions to the workers; each returns ``{node: answer}`` (None when no
    worker answered), as Celery's ``app.control.inspect()``."""

    def __init__(self, control: Control, destination: Optional[list], timeout: float,
                 limit: Optional[int], pattern: Optional[str], matcher: Optional[str]) -> None:
        self.control, self.destination, self.timeout = control, destination, timeout
        self.limit, self.pattern, self.matcher = limit, pattern, matcher

    def _request(self, command: str, **arguments: Any) -> Optional[dict]:
        replies = self.control.broadcast(command, arguments, self.destination, reply=True,
                                         timeout=self.timeout, limit=self.limit,
                                         pattern=self.pattern, matcher=self.matcher)
        if not replies:
            return None
        nodes: dict = {}
        for reply in replies:
            nodes.update(reply)
        return nodes

    def ping(self) -> Optional[dict]:
        return self._request("ping")

    def stats(self) -> Optional[dict]:
        return self._request("stats")

    def active(self) -> Optional[dict]:
        return self._request("active")

    def scheduled(self) -> Optional[dict]:
        return self._request("scheduled")

    def reserved(self) -> Optional[dict]:
        return self._request("reserved")

    def revoked(self) -> Optional[dict]:
        return self._request("revoked")

    def registered(self) -> Optional[dict]:
        return self._request("registered")

    def conf(self, with_defaults: bool = False) -> Optional[dict]:
        return self._request("conf", with_defaults=with_defaults)

    def active_queues(self) -> Optional[dict]:
        return self._request("active_queues")

    def query_task(self, *ids: str) -> Optional[dict]:
        return self._request("query_task", ids=list(ids))


class _Broadcast:
    """One command on one connection, and the answers to it."""

    def __init__(self, conn: pika.BlockingConnection, namespace: str) -> None:
        self.conn, self.namespace = conn, namespace
        self.replies: list = []

    def send(self, command: str, arguments: dict, destination: Optional[list], reply: bool,
             timeout: float, limit: Optional[int], pattern: Optional[str],
             matcher: Optional[str]) -> Optional[list]:
        ch = self.conn.channel()
        exchange = f"{self.namespace}.pidbox"
        ch.exchange_declare(exchange, exchange_type="fanout", durable=False)
        message = {"method": command, "arguments": arguments, "destination": destination,
                   "pattern": pattern, "matcher": matcher}
        ticket = None
        if reply:
            ticket = str(uuid.uuid4())
            message.update(ticket=ticket, reply_to=self._reply_queue(ch, ticket))
        ch.basic_publish(exchange, "", json.dumps(message).encode(), pika.BasicProperties(
            content_type=JSON, content_encoding="utf-8", delivery_mode=1,
            headers={"clock": 0, "expires": time.time() + timeout if timeout else 0}))
        if not reply:
            ch.close()
            return None
        return self._collect(ticket, timeout, limit or (len(destination) if destination
                                                        else None))

    def _reply_queue(self, ch: Any, ticket: str) -> dict:
        exchange = f"reply.{self.namespace}.pidbox"
        oid = str(uuid.uuid4())
        queue = f"{oid}.{exchange}"
        ch.exchange_declare(exchange, exchange_type="direct", durable=False)
        ch.queue_declare(queue, exclusive=True, auto_delete=True,
                         arguments=REPLY_QUEUE_ARGUMENTS)
        ch.queue_bind(queue, exchange, routing_key=oid)

        def on_message(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            if (properties.headers or {}).get("ticket") != ticket \
                    or properties.content_type != JSON:
                return
            try:
                answer = json.loads(body)
            except ValueError:
                return
            if isinstance(answer, dict):
                self.replies.append(answer)
        ch.basic_consume(queue, on_message, auto_ack=True)
        return {"exchange": exchange, "routing_key": oid}

    def _collect(self, ticket: str, timeout: float, limit: Optional[int]) -> list:
        deadline = time.monotonic() + timeout
        while limit is None or len(self.replies) < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.conn.process_data_events(time_limit=min(remaining, 0.1))
        return self.replies


def _close(conn: pika.BlockingConnection) -> None:
    try:
        if conn.is_open:
            conn.close()
    except Exception:       # closing is best effort: the broker drops it anyway
        pass
