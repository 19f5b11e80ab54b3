"""ResultStore: finished tasks' results written to the result store, then acked.

Built by the supervisor when ``result_backend`` is ``redis://`` or
``postgresql://`` and given to :class:`~taskd.worker.outcomes.Outcomes` in
place of :class:`~taskd.worker.replies.Replies` for results (copies such as
retries and dead letters still go to the broker). It has Replies' three
result calls: :meth:`reply_to`, :meth:`publish_result` (a final state: the
delivery is acked once it is stored) and :meth:`note` (RETRY: stored, nothing
acked).

* **Batched.** Results that finish while a write is under way go in the
  next one (one Redis pipeline, one PostgreSQL transaction), so the store's
  round trip is paid once per batch, not per task.
* **Acked after the write.** ``complete(job)`` (the acker) is called only
  once the store answered the write that holds its result.
* **An outage loses nothing.** A write that fails keeps its results here, in
  order; they are written again with back-off (``BACKOFF``) until the store
  answers. While more than ``worker.result_buffer`` bytes wait, :meth:`accepting`
  is False and the dispatcher starts no new task (the tasks already running
  finish, so the bound can be passed by their results). The outage is logged
  when it starts and ends, and shown by ``taskd status``.
* **Expiry without a daemon.** With PostgreSQL the worker deletes expired rows
  every ``PRUNE_EVERY`` seconds (a bounded delete on an index); Redis expires
  keys itself.

STARTED and ``update_state`` are written by the child itself (see
``taskd/worker/child.py``), through its own connection.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Callable, NamedTuple, Optional

from .. import protocol, stores
from ..exceptions import EncodeError

log = logging.getLogger("taskd.supervisor")

#: Results written at most in one batch.
BATCH = 500
#: Back-off between writes while the store does not answer: first, longest (seconds).
BACKOFF = (0.2, 10.0)
#: Seconds between two deletes of expired PostgreSQL rows (the first comes sooner).
PRUNE_EVERY = 60.0


def build(loop: asyncio.AbstractEventLoop, config: Any, complete: Callable[[Any], None],
          counters: collections.Counter) -> Optional["ResultStore"]:
    """The part for ``result_backend`` (None with rpc://). The children forked later open
    their own connection to the same store (STARTED, update_state)."""
    stores.set_worker_store(config["result_backend"], config["result_expires"],
                            config["track_started"])
    backend = stores.open_async_store(config["result_backend"], config["result_expires"])
    if backend is None:
        return None
    log.info("results go to %s", stores.redact(config["result_backend"]))
    return ResultStore(loop, backend, complete, counters,
                       buffer_limit=config["worker.result_buffer"],
                       extended=config["result_extended"])


def reconfigure(part: Optional["ResultStore"], url: str, new: Any) -> None:
    """A reload: the store stays (a new ``result_backend`` takes a restart, logged); its
    buffer, extended fields, expiry and ``track_started`` follow ``new``."""
    if new["result_backend"] != url:
        log.warning("SIGHUP: result_backend changes only with a restart; results still go "
                    "to %s", stores.redact(url))
        return
    stores.set_worker_store(url, new["result_expires"], new["track_started"])
    if part is not None:
        part.buffer_limit = new["worker.result_buffer"]
        part.extended = new["result_extended"]
        part.backend.expires = new["result_expires"]


class Entry(NamedTuple):
    job: Any            # None: a state that acks nothing (RETRY)
    task_id: str
    body: bytes         # the JSON meta


class ResultStore:
    """``backend``: an async store (:mod:`taskd.stores`); ``complete(job)``: ack it;
    ``wake()``: room again for new tasks (the dispatcher's ``dispatch_soon``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, backend: Any,
                 complete: Callable[[Any], None], counters: collections.Counter, *,
                 buffer_limit: int, extended: bool = False,
                 wake: Callable[[], None] = lambda: None,
                 prune_every: float = PRUNE_EVERY) -> None:
        self.loop, self.backend, self.complete, self.counters = loop, backend, complete, counters
        self.buffer_limit, self.extended, self.wake = buffer_limit, extended, wake
        self.prune_every = prune_every
        self.waiting: list[Entry] = []      # in order; the head is being written
        self.bytes = 0                      # the bodies in `waiting`
        self.writing = False
        self.down_since: Optional[float] = None
        self.last_error: Optional[str] = None
        self.pause = BACKOFF[0]
        self.hostname = stores.node_name()
        self._retry: Optional[asyncio.TimerHandle] = None
        self._writer: Optional[asyncio.Task] = None
        self._pruner: Optional[asyncio.Task] = None
        self._full = False
        self._prune: Optional[asyncio.TimerHandle] = None

    # == what Outcomes calls (Replies' names) =============================================
    def reply_to(self, job: Any) -> Optional[str]:
        """Where ``job``'s result goes: the store, unless the task ignores its result."""
        request = job.request
        if request is None and job.task_id == "?":
            return None         # a message without a task id: no key to store under
        return None if request is not None and request.ignore_result else "store"

    def publish_result(self, job: Any, body: bytes, props: Any, attempt: int = 1) -> None:
        """A final state: store it, then ack ``job``."""
        self.save(job, job.task_id, body, props)

    def note(self, job: Any, body: bytes, props: Any) -> None:
        """A state that ends nothing (RETRY): stored, nothing acked."""
        self.save(None, job.task_id, body, props)

    # == writing ===========================================================================
    def save(self, job: Any, task_id: str, body: bytes, props: Any) -> None:
        body = self._as_json(job, task_id, body, props)
        self.waiting.append(Entry(job, task_id, body))
        self.bytes += len(body)
        if not self._full and not self.accepting():
            self._full = True
            log.warning("result store: %d results (%d bytes) wait to be stored, more than "
                        "worker.result_buffer: no new task starts until they are written",
                        len(self.waiting), self.bytes)
        self.kick()

    def _as_json(self, job: Any, task_id: str, body: bytes, props: Any) -> bytes:
        try:
            body = stores.as_json(body, props.content_type, props.content_encoding)
            if self.extended and job is not None and job.request is not None:
                body = stores.encode(dict(stores.decode(body), **self._extended(job)))
            return body
        except Exception as exc:    # a result the store cannot hold still ends as a FAILURE
            exc = EncodeError(f"result not storable: {exc}")
            log.error("task %s: %s; stored as a FAILURE", task_id, exc)
            return stores.encode(protocol.result_meta(
                task_id, protocol.FAILURE, protocol.exception_to_dict(exc), f"{exc}\n"))

    def _extended(self, job: Any) -> dict:
        r = job.request
        return {"name": r.name, "args": list(r.args), "kwargs": r.kwargs,
                "worker": self.hostname, "retries": r.retries, "queue": job.queue}

    def accepting(self) -> bool:
        """False while more than ``worker.result_buffer`` bytes wait to be stored."""
        return self.bytes <= self.buffer_limit

    def kick(self) -> None:
        """Start a write of what waits, unless one is under way or a back-off runs."""
        if self.waiting and not self.writing and self._retry is None:
            self.writing = True
            self._writer = self.loop.create_task(self._write())     # (kept: a task with no
                                                                     # reference may vanish)

    async def _write(self) -> None:
        try:
            while self.waiting and self._retry is None:
                batch = self.waiting[:BATCH]
                try:
                    await self.backend.write_many([(e.task_id, e.body) for e in batch])
                except Exception as exc:
                    self._failed(exc)
                    return
                del self.waiting[:len(batch)]
                self.bytes -= sum(len(e.body) for e in batch)
                self.counters["results_stored"] += len(batch)
                self._answered()
                for entry in batch:
                    if entry.job is not None:
                        self.complete(entry.job)
        finally:
            self.writing = False

    def _failed(self, exc: BaseException) -> None:
        self.counters["result_store_errors"] += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.down_since is None:
            self.down_since = time.time()
            log.error("result store %s failed: %s; %d result(s) wait in the worker (their "
                      "tasks unacknowledged) and are written when it answers",
                      stores.redact(self.backend.url), self.last_error, len(self.waiting))
        else:
            log.debug("result store still failing: %s", self.last_error)
        self._retry = self.loop.call_later(self.pause, self._again)
        self.pause = min(self.pause * 2, BACKOFF[1])

    def _again(self) -> None:
        self._retry = None
        self.kick()

    def _answered(self) -> None:
        if self.down_since is not None:
            log.warning("result store answers again after %.1fs; writing the %d result(s) "
                        "that waited", time.time() - self.down_since, len(self.waiting))
            self.down_since, self.last_error = None, None
        self.pause = BACKOFF[0]
        if self._full and self.accepting():
            self._full = False
            self.wake()

    # == expiry ============================================================================
    def start(self) -> None:
        """Begin deleting expired results (PostgreSQL; Redis expires its keys itself)."""
        if self._prune is None:
            self._prune = self.loop.call_later(min(5.0, self.prune_every), self._prune_now)

    def _prune_now(self) -> None:
        self._prune = self.loop.call_later(self.prune_every, self._prune_now)
        self._pruner = self.loop.create_task(self._pruned())

    async def _pruned(self) -> None:
        try:
            gone = await self.backend.prune()
        except Exception as exc:    # the next prune tries again; writes report outages
            log.debug("result store: deleting expired results failed: %s", exc)
            return
        if gone:
            self.counters["results_expired"] += gone
            log.debug("result store: %d expired result(s) deleted", gone)

    # == status and exit ===================================================================
    def status(self) -> dict:
        return {"url": stores.redact(self.backend.url), "ok": self.down_since is None,
                "down_since": self.down_since, "error": self.last_error,
                "waiting": len(self.waiting), "waiting_bytes": self.bytes,
                "accepting": self.accepting()}

    def stop(self) -> None:
        if self._prune is not None:
            self._prune.cancel()
            self._prune = None

    def report_unwritten(self) -> None:
        """At exit: name the tasks whose results never reached the store. Their deliveries
        were not acked: they go back to the queue and run again."""
        jobs = [e.job for e in self.waiting if e.job is not None]
        if jobs:
            log.warning("stopping while the result store is away: %d finished task(s) could "
                        "not store their result and will run again: %s", len(jobs),
                        ", ".join(job.describe() for job in jobs))
