"""The consumer: the consuming connection, its declarations, its QoS and its consumers.

One :class:`Consumer` lives as long as the supervisor; each (re)connection
opens a new consuming channel in :meth:`Consumer.open`, which declares the
worker's topology, sets the prefetch and consumes every queue
(:class:`~taskd.worker.consumers.Consumers` keeps the tags and answers broker
cancels). The prefetch is ``base`` (:func:`prefetch_base`)
plus room for the ETA jobs held in memory (:meth:`Consumer.hold`), so that held
jobs do not starve the rest, plus ``deep`` (:func:`prefetch_deep`) while the adaptive
window finds every recent task short (:meth:`Consumer.deepen`).
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterable, Optional

from ..broker import topology
from ..exceptions import ConfigError
from . import parking
from .amqp import AsyncChannel, ChannelLost
from .consumers import Consumers

MAX_PREFETCH = 65535


def prefetch_base(concurrency: int, config: Any) -> int:
    """The QoS before ETA jobs: every job the children may run at once (``concurrency`` x
    ``worker.async_concurrency``) x ``worker.prefetch_multiplier``."""
    return (concurrency * config["worker.async_concurrency"]
            * config["worker.prefetch_multiplier"])


def prefetch_deep(concurrency: int, config: Any) -> int:
    """The QoS added while every recent task was short: concurrency x
    (``worker.prefetch_multiplier_short`` - ``worker.prefetch_multiplier``); 0 with
    coroutine children (``worker.async_concurrency`` > 1) or the window off."""
    if config["worker.async_concurrency"] > 1 or not config["worker.child_prefetch_adaptive"]:
        return 0
    return concurrency * max(0, config["worker.prefetch_multiplier_short"]
                             - config["worker.prefetch_multiplier"])


class Consumer:
    """``connect(name)``: a new, unopened AsyncChannel; ``on_delivery``: pika's message
    callback; ``config``: the worker's (a reload replaces it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 connect: Optional[Callable[[str], AsyncChannel]],
                 on_delivery: Optional[Callable], config: Any) -> None:
        self.loop = loop
        self.connect, self.on_delivery, self.config = connect, on_delivery, config
        self.conn: Optional[AsyncChannel] = None
        self.consumers: Optional[Consumers] = None
        self.queues: tuple = ()     # the queues it consumes
        self.base = 1               # concurrency * prefetch multiplier
        self.extra = 0              # room for the ETA jobs held
        self.deep = 0               # added while every recent task was short

    @property
    def channel(self) -> Any:
        return self.conn.channel if self.conn is not None else None

    @property
    def is_open(self) -> bool:
        return self.conn is not None and self.conn.is_open

    @property
    def tags(self) -> dict:
        """Consumer tag -> queue, on the current consuming channel."""
        return self.consumers.tags if self.consumers is not None else {}

    async def open(self, queues: Iterable[str], base: int) -> AsyncChannel:
        """Open the consuming channel, declare the topology, set QoS, consume ``queues``."""
        self.queues = tuple(queues)
        self.conn = self.connect("taskd-worker-consume")
        channel = await self.conn.open()
        await self.declare(self.topology(queues))
        self.base, self.extra = base, 0
        await self.conn.call(channel.basic_qos, prefetch_count=self.prefetch)
        self.consumers = Consumers(self.loop, self.conn, self.on_delivery, self.declare_queue)
        for queue in queues:
            self.consumers.consume(queue)
        return self.conn

    def topology(self, queues: Iterable[str]) -> list:
        """The exchanges, queues and bindings this worker needs."""
        cfg = self.config
        return (topology.plan(cfg, tuple(queues))
                + topology.dead_letter_plan(cfg["worker.dead_letter_queue"],
                                            cfg.system_queue_type)
                + parking.plan(cfg["worker.delay_queue_prefix"], cfg.system_queue_type))

    async def declare_queue(self, queue: str) -> None:
        await self.declare(topology.plan(self.config, (queue,)))

    async def redeclare(self) -> None:
        """Declare the topology again (a copy found a queue missing)."""
        if self.is_open:
            await self.declare(self.topology(self.queues))

    async def declare(self, ops: Iterable) -> None:
        conn = self.conn
        channel = conn.channel
        for op in ops:
            try:
                if isinstance(op, topology.DeclareExchange):
                    await conn.call(channel.exchange_declare, op.name,
                                    exchange_type=op.type, durable=op.durable)
                elif isinstance(op, topology.DeclareQueue):
                    await conn.call(channel.queue_declare, op.name, durable=op.durable,
                                    arguments=op.argument_dict)
                else:
                    await conn.call(channel.queue_bind, op.queue, op.exchange,
                                    routing_key=op.routing_key)
            except ChannelLost as exc:
                if exc.refused:
                    raise ConfigError([topology.explain_channel_error(op, exc)], "broker") from None
                raise

    @property
    def prefetch(self) -> int:
        return min(self.base + self.deep + self.extra, MAX_PREFETCH)

    def deepen(self, deep: int) -> None:
        """Every recent task was short (``deep``: the slots to add), or one ran long (0)."""
        if deep != self.deep:
            self.deep = deep
            self._set_qos()

    def hold(self, held: int) -> None:
        """``held`` ETA jobs are in memory: raise the prefetch by as many, so that they do
        not starve the rest (lowered again, with some hysteresis, as they leave)."""
        base = self.base
        if held > self.extra or held + 2 * base < self.extra:
            self.extra = held + base if held else 0
            self._set_qos()

    def resize(self, base: int) -> None:
        """The pool's size changed (TTIN, TTOU, a reload)."""
        self.base = base
        self._set_qos()

    def _set_qos(self) -> None:
        if self.is_open:
            self.conn.channel.basic_qos(prefetch_count=self.prefetch)

    async def add_queue(self, queue: str, ops: Iterable = ()) -> bool:
        """Declare ``queue`` (``ops``, else as ``-Q`` would) and consume it (remote
        control's ``add_consumer``); False if it is consumed already."""
        if queue in self.queues:
            return False
        await self.declare(ops or topology.plan(self.config, (queue,)))
        self.queues += (queue,)
        if self.consumers is not None:
            self.consumers.consume(queue)
        return True

    async def cancel_queue(self, queue: str) -> bool:
        """Stop consuming ``queue`` (remote control's ``cancel_consumer``); False if it
        was not consumed."""
        if queue not in self.queues:
            return False
        self.queues = tuple(q for q in self.queues if q != queue)
        if self.consumers is not None and self.is_open:
            await self.consumers.cancel(queue)
        return True

    async def cancel_all(self) -> None:
        if self.consumers is not None and self.is_open:
            await self.consumers.cancel_all()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
