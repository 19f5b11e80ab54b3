"""Where a task message goes (pure; no I/O).

Precedence, first match wins, for each of ``queue`` / ``exchange`` /
``routing_key``:

1. the options of the call (``apply_async(queue=..., exchange=..., routing_key=...)``);
2. the task's attributes (``Task.queue``, ``Task.exchange``, ``Task.routing_key``);
3. the first ``routes:`` entry of the configuration whose glob matches the task name;
4. ``default_queue`` (``celery`` unless configured).

A ``queue`` resolves to that queue's exchange and binding key. A queue the
configuration does not list is declared the way a Celery client declares it:
durable, bound to a direct exchange of the same name, and published to
through the default exchange (``''``) with the queue's name as routing key.
A ``routing_key`` without an ``exchange`` goes to ``default_exchange``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import Config, QueueSpec


@dataclass(frozen=True, slots=True)
class Route:
    exchange: str
    routing_key: str
    declare: tuple = ()   # QueueSpecs a publisher makes sure exist


def auto_queue(name) -> QueueSpec:
    """The queue a Celery client would create for an unknown queue name."""
    return QueueSpec(name=name, exchange=name, binding_key=name)


def queue_spec(config: Config, name) -> QueueSpec:
    return config.queue(name) or auto_queue(name)


def default_exchange(config: Config):
    configured = config["default_exchange"]
    if configured:
        return configured
    if len(config.exchanges) == 1:
        return config.exchanges[0].name
    return queue_spec(config, config["default_queue"]).exchange


def _via_queue(spec: QueueSpec, config: Config) -> Route:
    exchange = config.exchange(spec.exchange)
    if exchange is None or exchange.type == "direct":
        # Direct: publish through the default exchange, as Celery does.
        if exchange is None or spec.binding_key == spec.name:
            return Route("", spec.name, (spec,))
    return Route(spec.exchange, spec.binding_key, (spec,))


def resolve(config: Config, task_name, *, queue=None, exchange=None, routing_key=None,
            task_queue=None, task_exchange=None, task_routing_key=None) -> Route:
    """Decide exchange and routing key for one message."""
    # 1. call options
    if queue:
        return _via_queue(queue_spec(config, queue), config)
    if exchange is not None or routing_key is not None:
        return _explicit(config, exchange, routing_key, task_name)
    # 2. task attributes
    if task_queue:
        return _via_queue(queue_spec(config, task_queue), config)
    if task_exchange is not None or task_routing_key is not None:
        return _explicit(config, task_exchange, task_routing_key, task_name)
    # 3. routes
    route = config.route_for(task_name)
    if route is not None:
        if route.queue:
            return _via_queue(queue_spec(config, route.queue), config)
        return _explicit(config, route.exchange, route.routing_key, task_name)
    # 4. default queue
    return _via_queue(queue_spec(config, config["default_queue"]), config)


def _explicit(config, exchange, routing_key, task_name) -> Route:
    if exchange is None:
        exchange = default_exchange(config)
    if routing_key is None:
        routing_key = task_name
    declare = tuple(q for q in config.queues if q.exchange == exchange)
    if not declare and exchange == config["default_queue"]:
        declare = (queue_spec(config, exchange),)
    return Route(exchange, routing_key, declare)


def amqp_priority(priority):
    """taskd priority 0 (highest) .. 9 (lowest) -> AMQP priority 9 .. 0."""
    if priority is None:
        return None
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise ValueError(f"priority must be an integer from 0 (highest) to 9 (lowest), got {priority!r}")
    return 9 - priority
