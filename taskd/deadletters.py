"""Inspect and replay the dead-letter queue (``taskd dead-letters``).

The worker moves a message it cannot process to ``worker.dead_letter_queue``
(``taskd.dead``) with ``x-taskd-reason``, ``x-taskd-queue`` (where it came
from), ``x-taskd-exchange``, ``x-taskd-routing-key``, ``x-taskd-dead-at`` and
``x-taskd-delivery-count`` headers. Both stream, one message at a time, so the queue never has to fit in memory:

* listing takes each message without acknowledging it, yields its
  description (the body is dropped at once) and gives them all back when it
  closes its channel (order kept). It stops after ``LIST_LIMIT`` messages
  unless told otherwise, since the broker holds every listed message as
  unacknowledged until the end;
* replaying takes one message, publishes it to the queue it came from
  without the ``x-taskd-*`` headers (so its delivery count starts again),
  waits for the broker's confirm, then acknowledges the dead copy, before it
  takes the next. A message it skips (other task, no known queue, refused by
  the broker) stays unacknowledged until the end, so it is not taken twice,
  and goes back to the queue.
"""
from __future__ import annotations

import pika
import pika.exceptions

from .broker.connection import connect_blocking


#: Default bound of a listing (``--limit`` changes it).
LIST_LIMIT = 1000


def _stream(channel, queue, limit):
    """Yield ``(method, properties, body)`` for at most ``limit`` messages, one at a time."""
    taken = 0
    while limit is None or taken < limit:
        method, props, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return
        taken += 1
        yield method, props, body


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


def list_dead(config, queue=None, limit=LIST_LIMIT):
    """Yield a description of each dead letter, at most ``limit`` (None: all)."""
    queue = queue or config["worker.dead_letter_queue"]
    conn = connect_blocking(config.broker_urls, config["broker.connect_timeout"], 0, "taskd-admin",
                            config["broker.tls"])
    try:
        channel = conn.channel()
        for _method, props, body in _stream(channel, queue, limit):
            yield describe(props, body)
    finally:
        conn.close()            # unacked: the broker puts every message back


def replay(config, queue=None, limit=None, task=None, to=None, message_id=None):
    """Move dead letters back to their queues; returns (replayed, skipped) counts.

    ``task`` and ``message_id`` keep only the messages of that task name / task id.
    """
    queue = queue or config["worker.dead_letter_queue"]
    conn = connect_blocking(config.broker_urls, config["broker.connect_timeout"], 0, "taskd-admin",
                            config["broker.tls"])
    replayed = skipped = 0
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for method, props, body in _stream(channel, queue, limit):
            headers = props.headers or {}
            target = to or headers.get("x-taskd-queue")
            if ((task and headers.get("task") != task) or not target
                    or (message_id and (headers.get("id") or props.correlation_id) != message_id)):
                skipped += 1    # left unacked: given back when the connection closes
                continue
            clean = {k: v for k, v in headers.items()
                     if not k.startswith("x-taskd-") and not k.startswith("x-death")
                     and not k.startswith("x-first-death")}
            copy = pika.BasicProperties(
                content_type=props.content_type, content_encoding=props.content_encoding,
                correlation_id=props.correlation_id, reply_to=props.reply_to,
                priority=props.priority, delivery_mode=2, headers=clean)
            try:
                channel.basic_publish("", target, body, copy, mandatory=True)   # confirmed
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
                skipped += 1    # no such queue, or refused: the dead copy stays
                continue
            channel.basic_ack(method.delivery_tag)
            replayed += 1
    finally:
        conn.close()
    return replayed, skipped
