"""Workflows: the steps that follow a task, published before the task is acked.

A task message may carry workflow steps in its body's embed (protocol v2):
``callbacks`` (``link``), ``errbacks`` (``link_error``), ``chain`` (the steps
after it, last first) and ``chord`` (the body of the chord it is a header part
of). :class:`Workflows` is the part that honours them, between the outcome of
the task and its settlement (:class:`~taskd.worker.outcomes.Outcomes` hands it
every finished job whose request has steps):

* **success**: each callback and the chain's next step is published with the
  result as first argument (unless the signature is immutable), the rest of
  the chain embedded in that next step; ``parent_id`` is this task, ``root_id``
  the workflow's first;
* **failure**: each error callback is published with the failed task's id as
  argument (Celery's convention); the chain stops here;
* **chord header part** (success or failure): its state is counted in the
  store (:mod:`taskd.stores.chords`, Redis or PostgreSQL: once per task id,
  however often it runs);
  the part that completes the chord publishes the body with the header's
  results in order, or, if a header task failed, stores the body as FAILURE
  with a ``ChordError`` and publishes the body's error callbacks, once.

Every message is published mandatory and confirmed (through
:class:`~taskd.worker.copies.Copies`) *before* ``proceed`` settles the task
(stores its result, acks its delivery). Anything that fails on the way hands
the job to ``fault``: redelivered (counted), so the workflow goes on from
this step, never skips it.

What the worker cannot honour is refused at intake by :meth:`Workflows.check`
(dead-lettered, FAILURE to the caller), before anything runs.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

import pika

from .. import protocol, serialization, stores
from ..exceptions import ChordError, InvalidTaskMessage
from ..options import amqp_priority, resolve_route
from .headers import sanitise

log = logging.getLogger("taskd.supervisor")


def as_list(value: Any) -> list:
    if not value:
        return []
    return [value] if isinstance(value, dict) else list(value)


def _taskd_priority(value: Any) -> bool:
    """A taskd priority (0 highest .. 9 lowest); anything else is not passed on."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9


class Workflows:
    """``publisher()``: the publishing channel; ``backend``: the async result store (None
    with rpc://); ``copies``: publishes mandatory, confirmed messages."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Any, copies: Any,
                 publisher: Callable[[], Any], backend: Any, counters: Any) -> None:
        self.loop, self.config, self.copies = loop, config, copies
        self.publisher, self.backend, self.counters = publisher, backend, counters
        self.join: Any = None       # the chord join in the result store
        which = stores.kind(backend.url) if backend is not None else "rpc"
        if which == "redis":
            from ..stores.chords import ChordJoin
            self.join = ChordJoin(backend.client, config["result_expires"])
        elif which == "postgres":
            from ..stores.chords import PostgresChordJoin
            self.join = PostgresChordJoin(backend.url, config["result_expires"])

    # == intake =============================================================================
    def check(self, request: protocol.Request) -> None:
        """Raise InvalidTaskMessage for steps this worker cannot run (a chord without a
        result store), so the message is refused before its task runs."""
        if request.embed and request.embed.get("chord") and self.join is None:
            raise InvalidTaskMessage(
                f"task {request.name} is part of a chord, which needs result_backend "
                f"redis:// or postgresql:// on the worker (this worker has "
                f"{stores.kind(self.config['result_backend'])}://); refused rather than "
                "run a header whose body could never be called")
        if request.embed and request.embed.get("chord") and not request.group:
            raise InvalidTaskMessage(f"task {request.name}: a chord part without a "
                                     "'group' header (the chord's id)")

    def refused(self, job: Any, reason: str) -> None:
        """``job`` is dead-lettered (``reason``) before it ran: besides its own FAILURE (which
        Outcomes sends), the handles its caller holds on the workflow's end - the last
        step of its chain, its chord's body - get a FAILURE too (stored; with rpc://, sent
        to the ``reply_to`` in their options), so that a ``get()`` on them does not wait
        for ever. Read leniently from the raw body: a refused message may be malformed
        anywhere, and is decoded only in a content type ``accept_content`` allows (never
        a pickle the worker refused)."""
        try:
            payload = serialization.loads(
                job.body, job.properties.content_type, job.properties.content_encoding,
                accept=serialization.accept_set(self.config["accept_content"]))
            embed = payload[2] if isinstance(payload, (list, tuple)) and len(payload) == 3 \
                else None
            ends = []
            if isinstance(embed, dict):
                chain = embed.get("chain")
                for sig in ([chain[0]] if isinstance(chain, list) and chain else []) + \
                        [embed.get("chord")]:
                    options = sig.get("options") if isinstance(sig, dict) else None
                    options = options if isinstance(options, dict) else {}
                    task_id, reply_to = options.get("task_id"), options.get("reply_to")
                    if isinstance(task_id, str) and task_id:
                        ends.append((task_id, reply_to if isinstance(reply_to, str) else None))
        except Exception:       # undecodable: its own FAILURE is all that can be told
            return
        exc = InvalidTaskMessage(f"the workflow of task {job.describe()} was refused: {reason}")
        metas = [(i, stores.encode(protocol.result_meta(
            i, protocol.FAILURE, protocol.exception_to_dict(exc), f"{exc}\n")), reply_to)
            for i, reply_to in ends]
        if self.backend is not None and metas:
            self.loop.create_task(self._store_failures([m[:2] for m in metas]))
        elif self.backend is None:
            channel = self.publisher()
            for task_id, body, reply_to in metas:
                if reply_to and channel is not None and channel.is_open:
                    channel.publish("", reply_to, body, pika.BasicProperties(
                        content_type=stores.JSON, content_encoding="utf-8",
                        correlation_id=task_id, delivery_mode=1), lambda ok: None)

    async def _store_failures(self, metas: list) -> None:
        try:
            await self.backend.write_many(metas)
        except Exception as exc:    # the dead letter keeps the message and its reason
            log.warning("could not store the refused workflow's FAILURE: %s", exc)

    # == after the task ========================================================================
    def follow(self, job: Any, status: str, body: bytes, content_type: str,
               content_encoding: str, proceed: Callable[[], None],
               fault: Callable[[Any], None], revoked: bool = False) -> bool:
        """Publish ``job``'s next steps, then ``proceed()``; False if it has none. A
        ``revoked`` task runs none of its callbacks or error callbacks (as in Celery); its
        chord still counts it, as a failure."""
        request = job.request
        if not request.embed or status not in (protocol.SUCCESS, protocol.FAILURE):
            return False
        self.loop.create_task(self._follow(job, status, body, content_type, content_encoding,
                                           proceed, fault, revoked))
        return True

    async def _follow(self, job: Any, status: str, body: bytes, content_type: str,
                      content_encoding: str, proceed: Callable[[], None],
                      fault: Callable[[Any], None], revoked: bool = False) -> None:
        request = job.request
        try:
            meta = serialization.loads(body, content_type, content_encoding)
            result = meta.get("result")
            embed = request.embed
            messages = []
            if status == protocol.SUCCESS:
                for sig in as_list(embed.get("callbacks")):
                    messages.append(self.message(sig, request, (result,)))
                chain = list(embed.get("chain") or [])
                if chain:
                    messages.append(self.message(chain.pop(), request, (result,), chain))
            elif not revoked:
                for sig in as_list(embed.get("errbacks")):
                    messages.append(self.message(sig, request, (request.id,)))
            await self.publish(messages)
            if embed.get("chord"):
                await self._chord_part(request, status, result)
        except Exception as exc:
            log.exception("task %s: its workflow's next steps could not be published (%s); "
                          "redelivering it", job.describe(), exc)
            self.counters["workflow_errors"] += 1
            fault(job)
            return
        self.counters["workflow_steps"] += len(messages)
        proceed()

    async def _chord_part(self, request: protocol.Request, status: str, result: Any) -> None:
        body = request.embed["chord"]
        size = body.get("chord_size")
        count, total, claimed = await self.join.count(
            request.group, request.id, request.group_index, status, result,
            size if isinstance(size, int) and not isinstance(size, bool) else None)
        if not claimed:
            return
        parts = await self.join.parts(request.group)
        failed = [p for p in parts if p[1] != protocol.SUCCESS]
        if not failed:
            log.info("chord %s complete (%d parts): publishing its body %s", request.group,
                     total, body["task"])
            await self.publish([self.message(body, request, ([p[2] for p in parts],),
                                             group_id=False)])
            await self.join.published(request.group)
            return
        await self._chord_failed(request, body, failed[0])

    async def _chord_failed(self, request: protocol.Request, body: dict, part: list) -> None:
        options = body.get("options") or {}
        body_id = options.get("task_id")
        error = part[2] if isinstance(part[2], dict) else {}
        exc = ChordError(f"Dependency {part[0]} raised {error.get('exc_type', 'an error')}"
                         f"({', '.join(map(repr, error.get('exc_message') or []))})")
        log.warning("chord %s: %s; its body %s fails", request.group, exc, body["task"])
        if body_id:
            meta = protocol.result_meta(body_id, protocol.FAILURE,
                                        protocol.exception_to_dict(exc), f"{exc}\n",
                                        parent_id=request.id)
            await self.backend.write_many([(body_id, stores.encode(meta))])
        await self.publish([self.message(sig, request, (body_id,))
                            for sig in as_list(options.get("link_error"))])
        await self.join.published(request.group)

    # == messages ==============================================================================
    def message(self, sig: dict, parent: protocol.Request, first: tuple,
                chain: Optional[list] = None, group_id: bool = True) -> tuple:
        """``(route, body, properties)`` of ``sig`` sent by ``parent``: ``first`` (the
        result, or a failed task's id for an error callback) goes before its partial
        arguments unless it is immutable."""
        options = sig.get("options") or {}
        args = list(sig.get("args") or ())
        if not sig.get("immutable"):
            args = list(first) + args
        task_id = options.get("task_id") or str(uuid.uuid4())
        embed = {"callbacks": as_list(options.get("link")) or None,
                 "errbacks": as_list(options.get("link_error")) or None,
                 "chain": chain or as_list(options.get("chain")) or None,
                 "chord": options.get("chord")}
        countdown = options.get("countdown")
        eta = (datetime.now(timezone.utc) + timedelta(seconds=float(countdown))
               if countdown else options.get("eta"))
        expires = options.get("expires")
        if isinstance(expires, (int, float)) and not isinstance(expires, bool):
            expires = datetime.now(timezone.utc) + timedelta(seconds=float(expires))
        timelimit = options.get("time_limit"), options.get("soft_time_limit")
        message = protocol.encode_task(
            task_id, sig["task"], args, sig.get("kwargs") or {},
            serializer=options.get("serializer") or parent.serializer, eta=eta,
            expires=expires if isinstance(expires, (str, datetime)) else None,
            root_id=parent.root_id or parent.id, parent_id=parent.id,
            group=options.get("group_id") if group_id else None,
            group_index=options.get("group_index") if group_id else None,
            time_limit=timelimit[0], soft_time_limit=timelimit[1],
            reply_to=options.get("reply_to"), embed=embed,
            ignore_result=bool(options.get("ignore_result")))
        route = resolve_route(self.config, sig["task"], queue=options.get("queue"),
                              exchange=options.get("exchange"),
                              routing_key=options.get("routing_key"))
        priority = options.get("priority")
        props = pika.BasicProperties(
            content_type=message.content_type, content_encoding=message.content_encoding,
            correlation_id=task_id, reply_to=message.reply_to, delivery_mode=2,
            priority=amqp_priority(priority) if _taskd_priority(priority) else None,
            message_id=uuid.uuid4().hex, headers=sanitise(message.headers))
        return route, message.body, props

    async def publish(self, messages: list) -> None:
        """Publish every message; returns once the broker confirmed all (a queue took
        each), raises otherwise."""
        if not messages:
            return
        futures = []
        for route, body, props in messages:
            future = self.loop.create_future()
            futures.append(future)

            def confirmed(ok: Optional[bool], future: asyncio.Future = future) -> None:
                if not future.done():
                    future.set_result(ok)
            self.copies.publish(self.publisher(), route.exchange, route.routing_key, body,
                                props, confirmed)
        results = await asyncio.gather(*futures)
        if not all(results):
            raise ConnectionError(f"{results.count(None) + results.count(False)} of "
                                  f"{len(results)} workflow message(s) not confirmed by a queue")
