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

import pika

from .. import config as config_mod, serialization
from ..broker import topology
from ..broker.connection import connect_blocking
from ..exceptions import ConfigError, ConnectionError as TaskdConnectionError
from . import parking

log = logging.getLogger("taskd.supervisor")

IMPORT_TIMEOUT = 300.0      # seconds the new generation's first child may take to import


def reload(sup):
    """Start a reload, or queue one after the reload under way."""
    task = getattr(sup, "_reload_task", None)
    if task is not None and not task.done():
        sup._reload_again = True
        log.info("SIGHUP: a reload is under way; another will follow it")
        return
    sup._reload_again = False
    sup._reload_task = sup.loop.create_task(_reload_loop(sup))


async def _reload_loop(sup):
    while True:
        sup.notifier.reloading()
        try:
            await _reload(sup)
        except Exception:       # a bug: say so, keep the worker as it was
            log.exception("SIGHUP: internal error during the reload")
        finally:
            sup.notifier.ready(sup.status_line())
        if not sup._reload_again or sup.stopping:
            return
        sup._reload_again = False


async def _reload(sup):
    try:
        new = config_mod.load(sup.config_path)
        errors = serialization.check_config(new)
        if errors:
            raise ConfigError(errors, new.source)
        queues = sup.queues_for(new)
        ops = (topology.plan(new, queues)
               + topology.dead_letter_plan(new["worker.dead_letter_queue"])
               + parking.plan_if_new(new["worker.delay_queue_prefix"],
                                     sup.config["worker.delay_queue_prefix"]))
        await sup.loop.run_in_executor(None, _declare_aside, new, ops)
        if sup.stopping:
            return
        first, limits = await _import_check(sup, new)
    except (ConfigError, TaskdConnectionError) as exc:
        errors = getattr(exc, "errors", None) or [str(exc)]
        for error in errors:
            log.error("SIGHUP: %s", error)
        log.error("SIGHUP: configuration not reloaded; still running with the one loaded "
                  "before")
        sup.last_reload = {"at": time.time(), "ok": False, "errors": list(errors)}
        return
    if sup.stopping:
        return
    _apply(sup, new)
    sup.on_child_ready(first, limits)
    await _rebind(sup, ops)


async def _import_check(sup, new):
    """Fork the new generation's first child; returns it and its task limits once it has
    imported the task modules. Raises ConfigError (and ends the child) if it cannot."""
    child, started = sup.pool.trial(new["imports"], new["worker.max_memory_per_child"])
    try:
        limits, error = await asyncio.wait_for(asyncio.shield(started), IMPORT_TIMEOUT)
    except asyncio.TimeoutError:
        limits, error = None, f"no child imported them within {IMPORT_TIMEOUT:g}s"
    if error is not None:
        sup.pool.kill(child)
        raise ConfigError([f"imports: {error}"], new.source)
    return child, limits


def _declare_aside(config, ops):
    """Declare ``ops`` on a connection of their own (runs in a thread)."""
    conn = connect_blocking(config.broker_url, config["broker.connect_timeout"], 0,
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


def _apply(sup, new):
    sup._old_queues = sup.queues
    sup.config = new
    sup._apply_settings(new)
    sup.last_reload = {"at": time.time(), "ok": True, "errors": []}
    sup.config_loaded_at = time.time()
    pool = sup.pool
    pool.imports = tuple(new["imports"])
    pool.memory_limit = new["worker.max_memory_per_child"]
    pool.generation += 1
    sup.task_names = None
    sup.manage_children()          # the new generation first ...
    for child in list(pool.children.values()):
        if child.generation < pool.generation:
            pool.retire(child)     # ... then the old one leaves as it goes idle
    log.info("SIGHUP: configuration reloaded from %s; generation %d, queues %s, %d children",
             new.source, pool.generation, ", ".join(sup.queues), sup.concurrency)


async def _rebind(sup, ops):
    from .amqp import ChannelLost
    if sup.consumer is None or not sup.consumer.is_open:
        return          # reconnecting: the new connection declares and consumes the new set
    old_queues = sup._old_queues
    try:
        await sup._declare(ops)
        consumers = sup.consumers
        for queue in sorted(set(consumers.tags.values())):
            if queue not in sup.queues:
                await consumers.cancel(queue)
                log.info("SIGHUP: stopped consuming %s", queue)
        for queue in sup.queues:
            if queue not in old_queues:
                consumers.consume(queue)
                log.info("SIGHUP: now consuming %s", queue)
        sup._update_qos_base()
    except (ConfigError, ChannelLost) as exc:
        log.error("SIGHUP: could not apply the queues of the new configuration: %s", exc)
