"""Parking ETA tasks in the broker instead of in the worker's memory (pure policy).

A task due within ``worker.eta_horizon`` seconds is *held*: kept unacked in
the supervisor's schedule and run when due. A task due later (or arriving
while ``worker.max_held`` tasks are held) is *parked*: republished, confirmed,
to a delay queue whose per-queue TTL dead-letters it back to the queue it came
from, and the original is acked. So scheduled tasks cost the worker no
memory, survive restarts, and no delivery stays unacked anywhere near
RabbitMQ's ``consumer_timeout`` (30 min by default).

Topology, declared at start: for each bucket ``T`` of 1, 2, 4 ... 2**22 s
(48 days), a fanout exchange ``<prefix>.<T>s`` bound to a durable queue of
the same name with ``x-message-ttl = T s`` and ``x-dead-letter-exchange = ""``.
A parked copy is published to the largest bucket not longer than the time
left, with the source queue's name as routing key; when it expires, the
broker dead-letters it through the default exchange with that routing key,
back into the source queue. There the worker looks again: hold it, or park
it in a smaller bucket. A task a day ahead takes four hops (65536 s, 16384 s,
4096 s, 256 s) and is then held for its last minutes. Per-queue TTLs expire
in order, so each bucket is a FIFO of equal delays.

Copies drop the broker's ``x-death`` history: RabbitMQ silently drops a message
dead-lettered into a queue that its ``x-death`` already names (a cycle).
"""
from __future__ import annotations

from typing import Optional

from ..broker import topology

BUCKETS = tuple(2 ** k for k in range(0, 23))     # seconds: 1 s .. ~48.5 days


def bucket_for(delay: float) -> Optional[int]:
    """The largest bucket not longer than ``delay`` seconds, or None below 1 s."""
    if delay < BUCKETS[0]:
        return None
    best = BUCKETS[0]
    for bucket in BUCKETS:
        if bucket > delay:
            break
        best = bucket
    return best


def exchange_name(prefix: str, bucket: int) -> str:
    return f"{prefix}.{bucket}s"


def plan(prefix: str, queue_type: str = "classic") -> list:
    """Declarations for every bucket (exchange, queue with TTL + dead-letter, binding).

    ``queue_type`` (``worker.system_queue_type``, resolved) ``quorum`` makes each delay
    queue a quorum queue that dead-letters *at least once* (RabbitMQ >= 3.10): an expired
    copy leaves the delay queue only once its source queue has confirmed it, so a node
    lost meanwhile loses no parked task (``x-overflow: reject-publish`` is what that
    strategy requires)."""
    extra = topology.system_queue_arguments(queue_type)
    if extra:
        extra.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    ops = []
    for bucket in BUCKETS:
        name = exchange_name(prefix, bucket)
        ops.append(topology.DeclareExchange(name, "fanout", True))
        ops.append(topology.DeclareQueue(name, True, tuple(sorted({
            "x-message-ttl": bucket * 1000,
            "x-dead-letter-exchange": "",
            **extra,
        }.items()))))
        ops.append(topology.Bind(name, name, ""))
    return ops


def plan_if_new(prefix: str, old_prefix: str, queue_type: str = "classic") -> list:
    """The delay topology for ``prefix`` when a reload changes it from ``old_prefix``
    (parks go to the new exchanges at once); nothing when it stays."""
    return plan(prefix, queue_type) if prefix != old_prefix else []


def should_park(delay: float, held: int, horizon: float, max_held: int) -> bool:
    """Park (rather than hold) a task due in ``delay`` seconds?"""
    if delay < BUCKETS[0]:
        return False
    return delay > horizon or held >= max_held
