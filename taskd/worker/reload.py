"""SIGHUP: re-read the configuration and apply it without losing a task.

An invalid file is logged (every error) and reported; the worker keeps
running exactly as before. A valid one is applied: queues added to the
worker are declared and consumed, removed ones are cancelled (their
unstarted deliveries go back to the broker when the consumer is cancelled),
limits and the pool size take effect, and every child is replaced by a new
generation that imports the task modules afresh: idle children leave at
once, busy ones after their current task. The supervisor's PID does not
change.
"""
from __future__ import annotations

import logging
import time

from .. import config as config_mod
from ..exceptions import ConfigError

log = logging.getLogger("taskd.supervisor")


def reload(sup):
    sup.notifier.reloading()
    try:
        new = config_mod.load(sup.config_path)
    except ConfigError as exc:
        for error in exc.errors:
            log.error("SIGHUP: %s", error)
        log.error("SIGHUP: configuration not reloaded; still running with the one loaded "
                  "before")
        sup.last_reload = {"at": time.time(), "ok": False, "errors": exc.errors}
        sup.notifier.ready(f"reload failed: {exc.errors[0]}")
        return
    old_queues = sup.queues
    sup.config = new
    sup._apply_settings(new)
    sup.last_reload = {"at": time.time(), "ok": True, "errors": []}
    sup.config_loaded_at = time.time()
    pool = sup.pool
    pool.imports = tuple(new["imports"])
    pool.track_rss = bool(new["worker.max_memory_per_child"])
    pool.generation += 1
    sup.task_names = None
    sup.manage_children()          # the new generation first ...
    for child in list(pool.children.values()):
        if child.generation < pool.generation:
            pool.retire(child)     # ... then the old one leaves as it goes idle
    sup.loop.create_task(_rebind(sup, old_queues))
    log.info("SIGHUP: configuration reloaded from %s; generation %d, queues %s, %d children",
             new.source, pool.generation, ", ".join(sup.queues), sup.concurrency)


async def _rebind(sup, old_queues):
    from ..broker import topology
    from .amqp import ChannelLost
    try:
        await sup._declare(topology.plan(sup.config, sup.queues)
                           + topology.dead_letter_plan(sup.dead_letter_queue))
        channel = sup.consumer.channel
        for tag, queue in list(sup.consumer_tags.items()):
            if queue not in sup.queues:
                await sup.consumer.call(channel.basic_cancel, tag)
                del sup.consumer_tags[tag]
                log.info("SIGHUP: stopped consuming %s", queue)
        for queue in sup.queues:
            if queue not in old_queues:
                tag = channel.basic_consume(queue, sup.on_delivery)
                sup.consumer_tags[tag] = queue
                log.info("SIGHUP: now consuming %s", queue)
        sup._update_qos_base()
        sup.notifier.ready(sup.status_line())
    except (ConfigError, ChannelLost) as exc:
        log.error("SIGHUP: could not apply the queues of the new configuration: %s", exc)
