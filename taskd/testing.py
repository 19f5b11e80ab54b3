"""The test mode: run tasks in the calling process, through the real message path.

``with app.testing():`` (or ``task_always_eager: true`` in the configuration)
makes every ``delay``/``apply_async``/``send_task`` of that app run the task
here, at once, instead of publishing it. Unlike Celery's ``task_always_eager``
nothing is skipped that a worker would meet:

* the call's options are resolved and the message **encoded** with the real
  serializer (an argument the serializer cannot encode raises
  :class:`~taskd.exceptions.EncodeError` from the call, as it would when
  sending), and **routed** (the route is on the result: ``result.route``);
* ``before_task_publish`` and ``after_task_publish`` are sent, as if published
  to that route (a receiver's change to the headers reaches the task);
* the message is **decoded** as a worker decodes it (``accept_content`` is
  checked), run by the worker's own code (:func:`taskd.worker.child.run_job`,
  with the task signals), and its result encoded and decoded again: a return
  value the serializer cannot encode is a FAILURE, as from a worker;
* a retry (``self.retry``, ``autoretry_for``) runs the task again at once, with
  ``retries`` + 1 and the retry's arguments, until it succeeds, fails, or
  exceeds ``max_retries``; the countdown is not waited.

It returns an :class:`EagerResult`, which answers like an
:class:`~taskd.result.AsyncResult`: ``get()`` returns the value or raises the
task's exception (rebuilt from the encoded result, as a worker's would be),
``state``, ``ready()``, ``successful()``, ``failed()``, ``result``,
``traceback``. With ``task_eager_propagates`` (or ``app.testing(propagate=True)``)
a failure raises from the call itself.

Not enforced in the test mode: time limits, ``expires``, ``eta``/``countdown``
(the task runs at once), ``max_deliveries``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Optional

from . import protocol, serialization, signals
from .result import meta_value

MAX_EAGER_RETRIES = 1000    # a task with max_retries None that always retries stops here


class EagerResult:
    """The outcome of a task run in the test mode (see :class:`~taskd.result.AsyncResult`)."""

    def __init__(self, task_id: str, task_name: str, meta: dict, route: Any = None,
                 retries: int = 0) -> None:
        self.id = self.task_id = task_id
        self.task_name = task_name
        self._meta = meta
        self.route = route          # options.Route: where a worker would have received it
        self.retries = retries      # retries it took

    def __repr__(self) -> str:
        return f"<EagerResult: {self.id} {self.state}>"

    def get(self, timeout: Optional[float] = None, propagate: bool = True,
            **_ignored: Any) -> Any:
        """The value; the task's exception (raised) if it failed and ``propagate``."""
        if self._meta["status"] == protocol.SUCCESS:
            return self._meta["result"]
        exc = self.result
        if propagate:
            raise exc
        return exc

    wait = get

    @property
    def state(self) -> str:
        return self._meta["status"]

    status = state

    def ready(self) -> bool:
        return True

    def successful(self) -> bool:
        return self.state == protocol.SUCCESS

    def failed(self) -> bool:
        return self.state == protocol.FAILURE

    @property
    def result(self) -> Any:
        return meta_value(self._meta)

    info = result

    @property
    def traceback(self) -> Optional[str]:
        return self._meta.get("traceback")

    @property
    def date_done(self) -> Optional[str]:
        return self._meta.get("date_done")


def run(app: Any, name: str, args: Any, kwargs: Any, options: Any, route: Any,
        propagate: bool) -> EagerResult:
    """Run task ``name`` here as the test mode does (see the module's notes); ``options``
    resolved and ``route`` decided by :meth:`taskd.App.send`."""
    message = options.encode(name, args, kwargs)
    body = (tuple(args or ()), dict(kwargs or {}), None)
    signals.before_task_publish.send(
        sender=name, body=body, exchange=route.exchange, routing_key=route.routing_key,
        headers=message.headers, properties={"correlation_id": message.correlation_id,
                                             "reply_to": None, "priority": message.priority},
        declare=list(route.declare), retry_policy=options.retry_policy)
    signals.after_task_publish.send(sender=name, body=body, headers=message.headers,
                                    exchange=route.exchange, routing_key=route.routing_key)
    headers, payload = message.headers, message.body
    ctype, encoding = message.content_type, message.content_encoding
    accept = serialization.accept_set(app.config["accept_content"])
    for _ in range(MAX_EAGER_RETRIES):
        request = protocol.decode_task(headers, payload, ctype, encoding,
                                       correlation_id=message.correlation_id, accept=accept)
        status, result, rtype, renc, _, retry = _run_request(request)
        if retry is None:
            break
        headers, payload = retry.headers, retry.body
        ctype, encoding = retry.content_type, retry.content_encoding
    meta = protocol.decode_result(result, rtype, renc)
    eager = EagerResult(request.id, name, meta, route, request.retries)
    if propagate and status != protocol.SUCCESS:
        eager.get()
    return eager


def _run_request(request: Any) -> tuple:
    """The worker child's outcome tuple for ``request`` (no time limits)."""
    from .worker import aiochild, child
    meta = {
        "serializer": request.serializer,
        "parent_id": request.parent_id,
        "soft_time_limit": None,
        "request": {"retries": request.retries, "eta": request.eta,
                    "expires": request.expires, "reply_to": None, "delivery_count": 1,
                    "root_id": request.root_id, "parent_id": request.parent_id,
                    "time_limit": None, "soft_time_limit": None,
                    "headers": request.headers},
    }
    task = child.task_mod.registry.get(request.name)
    if task is None or not aiochild.is_async(task):
        return child.run_job(request.id, request.name, request.args, request.kwargs, meta)
    coro = aiochild.run_job(task, request.id, request.name, request.args, request.kwargs,
                            meta)
    try:
        asyncio.get_running_loop()
    except RuntimeError:                # no loop here: run it on a fresh one
        return asyncio.run(coro)
    # Called from a coroutine (an async test): its loop is busy, run on another thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
