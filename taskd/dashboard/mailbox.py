"""Remote control over Celery's mailbox (``celery.pidbox``), as ``celery inspect`` speaks it.

A command is a JSON message on the ``celery.pidbox`` fanout exchange (``<ns>.pidbox``
with ``worker.control_exchange`` as ``<ns>``)::

    {"method": "pool_grow", "arguments": {"n": 1}, "destination": ["w1@host"],
     "pattern": null, "matcher": null, "ticket": "<uuid>",
     "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "<oid>"}}

Each worker named in ``destination`` (every worker when it is null) runs the
command and publishes ``{hostname: reply}`` to ``reply.celery.pidbox`` with
the routing key ``oid`` and a ``ticket`` header; replies to other tickets are
ignored. The reply queue is exclusive and expires (``x-expires``) like kombu's.
Field names follow ``kombu/pidbox.py`` and ``celery/app/control.py``; any
worker that answers Celery's mailbox (Celery's own, taskd's) is a peer.
"""
from __future__ import annotations

import json
import time
import uuid

import pika

from ..broker.connection import connect_blocking

NAMESPACE = "celery"            # worker.control_exchange, Celery's default
#: Commands the dashboard sends; anything else is refused before it reaches a worker.
ACTIONS = ("pool_grow", "pool_shrink", "add_consumer", "cancel_consumer", "revoke")
READS = ("ping", "stats", "active_queues", "active", "scheduled", "reserved", "revoked")


class Mailbox:
    """One connection for a few commands; use as a context manager."""

    def __init__(self, config, timeout: float = 2.0):
        self.config, self.timeout = config, timeout
        namespace = config.values.get("worker.control_exchange") or NAMESPACE
        self.exchange, self.reply_exchange = f"{namespace}.pidbox", f"reply.{namespace}.pidbox"
        self.oid = str(uuid.uuid4())
        self._conn = self._channel = None
        self._queue = None

    def __enter__(self):
        c = self.config
        self._conn = connect_blocking(c.broker_url, c["broker.connect_timeout"], 0,
                                      "taskd-dashboard-mailbox", c["broker.tls"])
        ch = self._channel = self._conn.channel()
        ch.exchange_declare(self.exchange, "fanout", durable=False)
        ch.exchange_declare(self.reply_exchange, "direct", durable=False)
        self._queue = f"{self.oid}.{self.reply_exchange}"
        ch.queue_declare(self._queue, exclusive=True,   # deleted with the connection
                         arguments={"x-expires": 10_000})
        ch.queue_bind(self._queue, self.reply_exchange, routing_key=self.oid)
        return self

    def __exit__(self, *exc):
        if self._conn is not None and self._conn.is_open:
            self._conn.close()

    def call(self, method: str, arguments=None, destination=None, limit=None) -> dict:
        """Send ``method`` and gather ``{hostname: reply}`` until ``limit`` replies or the timeout."""
        if method not in ACTIONS + READS:
            raise ValueError(f"unknown mailbox command {method!r} (known: "
                             + ", ".join(ACTIONS + READS) + ")")
        if destination is not None:
            destination = list(destination)
            limit = limit or len(destination)
        ticket = str(uuid.uuid4())
        body = {"method": method, "arguments": arguments or {}, "destination": destination,
                "pattern": None, "matcher": None, "ticket": ticket,
                "reply_to": {"exchange": self.reply_exchange, "routing_key": self.oid}}
        self._channel.basic_publish(self.exchange, "", json.dumps(body), pika.BasicProperties(
            content_type="application/json", content_encoding="utf-8", delivery_mode=1,
            headers={"clock": 1, "expires": time.time() + self.timeout}))
        return self._collect(ticket, limit)

    def _collect(self, ticket, limit):
        replies = {}
        deadline = time.monotonic() + self.timeout
        while limit is None or len(replies) < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for method, props, body in self._channel.consume(self._queue, inactivity_timeout=left):
                if method is None:
                    break
                self._channel.basic_ack(method.delivery_tag)
                if (props.headers or {}).get("ticket") != ticket:
                    continue
                try:
                    reply = json.loads(body)
                except ValueError:
                    continue
                if isinstance(reply, dict):
                    replies.update(reply)
                break
        self._channel.cancel()
        return replies
