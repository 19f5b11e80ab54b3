"""SIGHUP: re-read the configuration and apply it without losing a task.

The new configuration is checked whole before anything changes: the file
(every error with its line), its serializers, its exchanges and queues
against the broker, declared on a connection of their own so that a
conflicting declaration (PRECONDITION_FAILED) cannot close the channel the
worker consumes on, and its task modules: the first child of the new
generation is forked and must report that it imported them (within
``IMPORT_TIMEOUT``) while the old children keep serving. If any check fails
the error is logged and reported (``taskd status``) and the worker keeps
running exactly as before. A valid one is applied: queues added to the
worker are consumed, removed ones are cancelled (their unstarted deliveries
go back to the broker), limits and the pool size take effect, the checked
child starts serving and the rest of the new generation is forked, and the
old children leave: idle ones at once, busy ones after their current task.
The supervisor's PID does not change. Reloads run one at a time: a SIGHUP
during a reload runs another once it is done. systemd hears RELOADING=1 at
the start and READY=1 at the end, whatever the outcome.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

import pika

from .. import config as config_mod, serialization
from ..broker import topology
from ..broker.connection import connect_blocking
from ..exceptions import ConfigError, ConnectionError as TaskdConnectionError
from . import parking
from .amqp import ChannelLost

log = logging.getLogger("taskd.supervisor")

IMPORT_TIMEOUT = 300.0      # seconds the new generation's first child may take to import


class Reloader:
    """Runs reloads one at a time. ``host`` is the supervisor, used through its public
    face only: ``config``, ``config_path``, ``queues``, ``concurrency``,
    ``queues_for(config)``, ``configure(config)``,
    ``on_child_ready(child, limits)`` and ``resize()``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: Any, pool: Any, consumer: Any,
                 shutdown: Any, status: Any, spawner: Any) -> None:
        self.loop, self.host, self.pool, self.consumer = loop, host, pool, consumer
        self.shutdown, self.status, self.spawner = shutdown, status, spawner
        self.task: Optional[asyncio.Task] = None     # the reload under way
        self.again = False                           # a SIGHUP came during it
        self.last: Optional[dict] = None             # {"at", "ok", "errors"} of the last one

    def request(self) -> None:
        """Start a reload, or queue one after the reload under way."""
        if self.task is not None and not self.task.done():
            self.again = True
            log.info("SIGHUP: a reload is under way; another will follow it")
            return
        self.again = False
        self.task = self.loop.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            self.status.notifier.reloading()
            try:
                await _reload(self)
            except Exception:       # a bug: say so, keep the worker as it was
                log.exception("SIGHUP: internal error during the reload")
            finally:
                self.status.notifier.ready(self.status.line())
            if not self.again or self.shutdown.stopping:
                return
            self.again = False


async def _reload(reloader: Reloader) -> None:
    sup, pool, shutdown = reloader.host, reloader.pool, reloader.shutdown
    try:
        new = config_mod.load(sup.config_path)
        errors = serialization.check_config(new)
        if errors:
            raise ConfigError(errors, new.source)
        queues = sup.queues_for(new)
        ops = (topology.plan(new, queues)
               + topology.dead_letter_plan(new["worker.dead_letter_queue"],
                                           new.system_queue_type)
               + parking.plan_if_new(new["worker.delay_queue_prefix"],
                                     sup.config["worker.delay_queue_prefix"],
                                     new.system_queue_type))
        await reloader.loop.run_in_executor(None, _declare_aside, new, ops)
        if shutdown.stopping:
            return
        first, limits = await _import_check(pool, new)
    except (ConfigError, TaskdConnectionError) as exc:
        errors = getattr(exc, "errors", None) or [str(exc)]
        for error in errors:
            log.error("SIGHUP: %s", error)
        log.error("SIGHUP: configuration not reloaded; still running with the one loaded "
                  "before")
        reloader.last = {"at": time.time(), "ok": False, "errors": list(errors)}
        return
    if shutdown.stopping:
        return
    reloader.last = {"at": time.time(), "ok": True, "errors": []}
    old_queues = sup.queues
    sup.configure(new)
    _next_generation(sup, reloader.spawner, pool, new)
    sup.on_child_ready(first, limits)
    await _rebind(sup, reloader.consumer, ops, old_queues)


def _next_generation(sup: Any, spawner: Any, pool: Any, new: Any) -> None:
    """The checked child's generation becomes the current one; the old one leaves."""
    pool.imports = tuple(new["imports"])
    pool.memory_limit = new["worker.max_memory_per_child"]
    pool.generation += 1
    spawner.manage()               # the new generation first ...
    for child in list(pool.children.values()):
        if child.generation < pool.generation:
            pool.retire(child)     # ... then the old one leaves as it goes idle
    log.info("SIGHUP: configuration reloaded from %s; generation %d, queues %s, %d children",
             new.source, pool.generation, ", ".join(sup.queues), sup.concurrency)


async def _rebind(sup: Any, consumer: Any, ops: list, old_queues: tuple) -> None:
    """Consume the queues of the new configuration (``ops`` declares them)."""
    if not consumer.is_open:
        return          # reconnecting: the new connection declares and consumes the new set
    try:
        await consumer.declare(ops)
        consumers = consumer.consumers
        for queue in sorted(set(consumers.tags.values())):
            if queue not in sup.queues:
                await consumers.cancel(queue)
                log.info("SIGHUP: stopped consuming %s", queue)
        for queue in sup.queues:
            if queue not in old_queues:
                consumers.consume(queue)
                log.info("SIGHUP: now consuming %s", queue)
        consumer.queues = tuple(sup.queues)
        sup.resize()
    except (ConfigError, ChannelLost) as exc:
        log.error("SIGHUP: could not apply the queues of the new configuration: %s", exc)


async def _import_check(pool: Any, new: Any) -> tuple:
    """Fork the new generation's first child; returns it and its task limits once it has
    imported the task modules. Raises ConfigError (and ends the child) if it cannot."""
    child, started = pool.trial(new["imports"], new["worker.max_memory_per_child"])
    try:
        limits, error = await asyncio.wait_for(asyncio.shield(started), IMPORT_TIMEOUT)
    except asyncio.TimeoutError:
        limits, error = None, f"no child imported them within {IMPORT_TIMEOUT:g}s"
    if error is not None:
        pool.kill(child)
        raise ConfigError([f"imports: {error}"], new.source)
    return child, limits


def _declare_aside(config: Any, ops: list) -> None:
    """Declare ``ops`` on a connection of their own (runs in a thread)."""
    conn = connect_blocking(config.broker_urls, config["broker.connect_timeout"], 0,
                            name="taskd-reload-check", tls=config["broker.tls"])
    try:
        topology.execute_blocking(conn.channel(), ops)
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise ConfigError([f"the broker refused a declaration of the new configuration: "
                           f"({exc.reply_code}) {exc.reply_text}"], "broker") from None
    except pika.exceptions.AMQPError as exc:
        raise TaskdConnectionError(f"lost the broker while checking the new configuration: "
                                   f"{type(exc).__name__}: {exc}") from None
    finally:
        if conn.is_open:
            conn.close()
