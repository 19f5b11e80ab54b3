"""Inspect and replay the dead-letter queue (``taskd dead-letters``).

The worker moves a message it cannot process to ``worker.dead_letter_queue``
(``taskd.dead``) with ``x-taskd-reason``, ``x-taskd-queue`` (where it came
from), ``x-taskd-exchange``, ``x-taskd-routing-key``, ``x-taskd-dead-at`` and
``x-taskd-delivery-count`` headers. Listing takes the messages without
acknowledging them and gives them back (order kept). Replaying publishes each
to the queue it came from without the ``x-taskd-*`` headers (so its delivery
count starts again), waits for the broker's confirm, then removes the dead copy.
"""
from __future__ import annotations

import pika

from .broker.connection import connect_blocking


def _take(channel, queue, limit):
    taken = []
    while limit is None or len(taken) < limit:
        method, props, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            break
        taken.append((method, props, body))
    return taken


def describe(props, body):
    h = props.headers or {}
    return {
        "id": h.get("id") or props.correlation_id,
        "task": h.get("task"),
        "queue": h.get("x-taskd-queue"),
        "reason": h.get("x-taskd-reason"),
        "dead_at": h.get("x-taskd-dead-at"),
        "deliveries": h.get("x-taskd-delivery-count"),
        "bytes": len(body),
    }


def list_dead(config, queue=None, limit=None):
    queue = queue or config["worker.dead_letter_queue"]
    conn = connect_blocking(config.broker_url, config["broker.connect_timeout"], 0, "taskd-admin",
                            config["broker.tls"])
    try:
        channel = conn.channel()
        return [describe(p, b) for _, p, b in _take(channel, queue, limit)]
    finally:
        conn.close()            # unacked: the broker puts every message back


def replay(config, queue=None, limit=None, task=None, to=None):
    """Move dead letters back to their queues; returns (replayed, skipped) counts."""
    queue = queue or config["worker.dead_letter_queue"]
    conn = connect_blocking(config.broker_url, config["broker.connect_timeout"], 0, "taskd-admin",
                            config["broker.tls"])
    replayed = skipped = 0
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for method, props, body in _take(channel, queue, limit):
            headers = props.headers or {}
            target = to or headers.get("x-taskd-queue")
            if (task and headers.get("task") != task) or not target:
                channel.basic_nack(method.delivery_tag, requeue=True)
                skipped += 1
                continue
            clean = {k: v for k, v in headers.items()
                     if not k.startswith("x-taskd-") and not k.startswith("x-death")
                     and not k.startswith("x-first-death")}
            copy = pika.BasicProperties(
                content_type=props.content_type, content_encoding=props.content_encoding,
                correlation_id=props.correlation_id, reply_to=props.reply_to,
                priority=props.priority, delivery_mode=2, headers=clean)
            channel.basic_publish("", target, body, copy, mandatory=True)   # confirmed
            channel.basic_ack(method.delivery_tag)
            replayed += 1
    finally:
        conn.close()
    return replayed, skipped
