"""What to declare on the broker (a pure plan) and a blocking executor for it.

Declarations match what a Celery client declares for the same names
(durable exchanges and queues, no queue arguments unless the configuration
asks for them, e.g. ``max_priority``): a Celery client that declares the
same queue with other arguments fails with PRECONDITION_FAILED, and so
would taskd.
"""
from __future__ import annotations

from dataclasses import dataclass

import pika.exceptions

from ..config import Config, QueueSpec, effective_queues
from ..exceptions import ConfigError


@dataclass(frozen=True, slots=True)
class DeclareExchange:
    name: str
    type: str = "direct"
    durable: bool = True


@dataclass(frozen=True, slots=True)
class DeclareQueue:
    name: str
    durable: bool = True
    arguments: tuple = ()   # sorted (key, value) pairs, so the op is hashable

    @property
    def argument_dict(self):
        return dict(self.arguments) or None


@dataclass(frozen=True, slots=True)
class Bind:
    queue: str
    exchange: str
    routing_key: str


def plan_queues(config: Config, queues) -> list:
    """Ops that declare ``queues`` (QueueSpecs), their exchanges and bindings."""
    ops = []
    for spec in queues:
        if spec.exchange and not spec.exchange.startswith("amq."):
            ex = config.exchange(spec.exchange)
            ops.append(DeclareExchange(spec.exchange, ex.type if ex else "direct",
                                       ex.durable if ex else True))
        args = tuple(sorted((spec.arguments_for(config["worker.dead_letter_queue"])
                             or {}).items()))
        ops.append(DeclareQueue(spec.name, spec.durable, args))
        if spec.exchange:
            ops.append(Bind(spec.name, spec.exchange, spec.binding_key))
    return _unique(ops)


def plan(config: Config, queue_names=None) -> list:
    """Every exchange of the config, and the named queues (default: all)."""
    ops = [DeclareExchange(e.name, e.type, e.durable) for e in config.exchanges]
    queues = effective_queues(config)
    if queue_names is not None:
        by_name = {q.name: q for q in queues}
        queues = [by_name.get(n) or QueueSpec(n, n, n) for n in queue_names]
    return _unique(ops + plan_queues(config, queues))


def system_queue_arguments(queue_type) -> dict:
    """Arguments of a queue taskd declares for itself (``worker.system_queue_type``,
    resolved): none for a classic queue; a quorum queue survives the loss of the node
    it was declared on, where a classic durable queue cannot even be declared again
    (404 "home node ... is down")."""
    return {"x-queue-type": "quorum"} if queue_type == "quorum" else {}


def dead_letter_plan(name, queue_type="classic") -> list:
    return [DeclareQueue(name, True, tuple(sorted(system_queue_arguments(queue_type).items())))]


def _unique(ops):
    seen, result = set(), []
    for op in ops:
        if op not in seen:
            seen.add(op)
            result.append(op)
    return result


def explain_channel_error(op, exc) -> str:
    """A one-line, actionable message for a failed declaration."""
    text = getattr(exc, "reply_text", None) or str(exc)
    if isinstance(op, DeclareQueue):
        return (f"queue {op.name!r} exists on the broker with other arguments than the "
                f"configuration gives (durable={op.durable}, arguments={op.argument_dict}): "
                f"{text}. Delete the queue or change the configuration to match it.")
    if isinstance(op, DeclareExchange):
        return (f"exchange {op.name!r} exists on the broker with another type or durability "
                f"than the configuration gives (type={op.type}, durable={op.durable}): {text}")
    return f"binding {op.queue!r} -> {op.exchange!r} ({op.routing_key!r}) failed: {text}"


def execute_blocking(channel, ops):
    """Run ``ops`` on a pika BlockingChannel; a conflict raises ConfigError."""
    for op in ops:
        try:
            if isinstance(op, DeclareExchange):
                channel.exchange_declare(op.name, exchange_type=op.type, durable=op.durable)
            elif isinstance(op, DeclareQueue):
                channel.queue_declare(op.name, durable=op.durable, arguments=op.argument_dict)
            else:
                channel.queue_bind(op.queue, op.exchange, routing_key=op.routing_key)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 406:   # PRECONDITION_FAILED
                raise ConfigError([explain_channel_error(op, exc)], "broker") from None
            raise
