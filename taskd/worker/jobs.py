"""A delivery on its way through the supervisor, and the messages made from it.

Pure helpers: what a redelivered copy, a dead letter and a failure reply
look like. Copies drop the broker's ``x-death`` history: RabbitMQ silently
drops a message dead-lettered into a queue already in that history. Every
copy gets a ``message_id`` of its own (its copy id, which also matches a
``basic.return`` to its publish) and headers pika can encode again
(:func:`taskd.worker.headers.sanitise`).
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Optional

import pika

from .. import protocol
from ..exceptions import InvalidTaskMessage
from . import framing
from .headers import sanitise
from .recovery import COPY_HEADER

DELIVERY_COUNT = "x-taskd-delivery-count"
MAX_COUNT = 1 << 31
BROKER_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue",
                  "x-first-death-reason", "x-delivery-count")


class Job:
    """One delivery: its AMQP coordinates, the decoded request, and its fate."""

    __slots__ = ("seq", "tag", "channel", "queue", "exchange", "routing_key", "properties",
                 "body", "request", "timer", "timed_out", "redelivered", "hard_limit", "key",
                 "epoch", "terminated", "received_at")

    def __init__(self, seq: int, tag: int, channel: Any, queue: str, exchange: str,
                 routing_key: str, properties: pika.BasicProperties, body: bytes,
                 redelivered: bool = False) -> None:
        self.seq, self.tag, self.channel, self.queue = seq, tag, channel, queue
        self.exchange, self.routing_key = exchange, routing_key
        self.properties, self.body = properties, body
        self.request = None
        self.timer = None
        self.timed_out = False
        self.redelivered = redelivered
        self.hard_limit = None
        self.key = None             # recovery.delivery_key, once decoded
        self.epoch = 0              # which consuming channel it came on (RecentlyDone.epoch)
        self.terminated = None      # the signal's name, once a revoke signalled its child

    @property
    def headers(self) -> dict:
        return self.properties.headers or {}

    @property
    def task_id(self) -> str:
        if self.request is not None:
            return self.request.id
        return protocol.peek_task_id(self.headers, self.properties.correlation_id) or "?"

    @property
    def task_name(self) -> str:
        if self.request is not None:
            return self.request.name
        name = self.headers.get("task")
        return name if isinstance(name, str) else "?"

    @property
    def delivery_count(self) -> int:
        """This delivery's number, from 1. The sender controls the header: a value that
        is not a count (:func:`check_headers` refuses it) counts as 0, and so does a
        negative one, which would otherwise buy a crashing task extra runs."""
        count = self.headers.get(DELIVERY_COUNT) or self.headers.get("x-delivery-count") or 0
        if isinstance(count, bool) or not isinstance(count, int) or count > MAX_COUNT:
            count = 0
        return max(0, count) + 1

    def describe(self) -> str:
        return f"{self.task_name}[{self.task_id}]"

    def job_frame(self, soft_time_limit: float | None = None) -> framing.Job:
        r = self.request
        meta = {
            "serializer": r.serializer,
            "parent_id": r.parent_id,
            "soft_time_limit": soft_time_limit,
            "embed": r.embed,       # a retry's copy keeps the workflow steps that follow
            "group": (r.group, r.group_index),
            "request": {"retries": r.retries, "eta": r.eta, "expires": r.expires,
                        "reply_to": r.reply_to, "delivery_count": self.delivery_count,
                        "root_id": r.root_id, "parent_id": r.parent_id,
                        "time_limit": r.time_limit, "soft_time_limit": r.soft_time_limit,
                        "headers": r.headers},
        }
        return framing.Job(self.seq, r.id, r.name, r.args, r.kwargs, meta)


def check_headers(headers: dict) -> None:
    """Refuse taskd's own headers when their values are not what taskd writes there
    (a copy id string; a delivery count); raises :class:`InvalidTaskMessage`."""
    copy = headers.get(COPY_HEADER)
    if copy is not None and not isinstance(copy, str):
        raise InvalidTaskMessage(f"header {COPY_HEADER!r} must be a string, "
                                 f"not {type(copy).__name__}")
    count = headers.get(DELIVERY_COUNT)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                              or count > MAX_COUNT):
        raise InvalidTaskMessage(f"header {DELIVERY_COUNT!r} must be a delivery count (an "
                                 f"integer up to {MAX_COUNT}), got {protocol.short_repr(count)}")


def _copy_properties(properties: pika.BasicProperties, headers: dict) -> pika.BasicProperties:
    copy_id = uuid.uuid4().hex
    headers = sanitise(headers)
    headers[COPY_HEADER] = copy_id      # tells this copy from its original
    return pika.BasicProperties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        priority=properties.priority,
        delivery_mode=2,
        message_id=copy_id,
        headers=headers,
    )


def clean_headers(headers: Optional[dict]) -> dict:
    return {k: v for k, v in (headers or {}).items() if k not in BROKER_HEADERS}


def redelivery(job: Job, keep_count: bool = False) -> pika.BasicProperties:
    """Properties for a copy of ``job``: its delivery count raised by one (or kept,
    for a parked copy), the broker's ``x-death`` history dropped."""
    headers = clean_headers(job.headers)
    headers[DELIVERY_COUNT] = job.delivery_count - (1 if keep_count else 0)
    return _copy_properties(job.properties, headers)


def retry_properties(job: Job, message: framing.RetryMessage) -> pika.BasicProperties:
    """Properties of the message that retries ``job`` (made by the child)."""
    props = _copy_properties(job.properties, message.headers)
    props.content_type = message.content_type
    props.content_encoding = message.content_encoding
    return props


def dead_letter(job: Job, reason: str) -> pika.BasicProperties:
    """Properties for the dead-letter copy of ``job``, saying why and where from."""
    headers = clean_headers(job.headers)
    headers.update({
        "x-taskd-reason": reason,
        "x-taskd-queue": job.queue,
        "x-taskd-exchange": job.exchange,
        "x-taskd-routing-key": job.routing_key,
        "x-taskd-dead-at": datetime.now(timezone.utc).isoformat(),
        DELIVERY_COUNT: job.delivery_count,
    })
    return _copy_properties(job.properties, headers)


def result_properties(correlation_id: Optional[str], content_type: str,
                      content_encoding: str) -> pika.BasicProperties:
    return pika.BasicProperties(content_type=content_type, content_encoding=content_encoding,
                                correlation_id=correlation_id, delivery_mode=1)


def failure_reply(job: Job, exc: BaseException,
                  status: str = protocol.FAILURE) -> tuple[bytes, pika.BasicProperties]:
    """``(body, properties)`` of a result telling the caller its task failed with ``exc``."""
    _, body, ctype, enc = protocol.encode_result(job.task_id, status, exc, f"{exc}\n")
    return body, result_properties(job.properties.correlation_id or job.task_id, ctype, enc)
