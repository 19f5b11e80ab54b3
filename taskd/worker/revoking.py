"""Revokes on a worker: the ids revoked, the stream that keeps them, and terminating.

:class:`Revokes` owns the worker's :class:`~taskd.worker.revokes.RevokedSet`
(which :meth:`Outcomes.revoke <taskd.worker.outcomes.Outcomes.revoke>` reads
before a task runs) and the RabbitMQ stream ``worker.revoke_stream``, on the
remote-control connection the :class:`~taskd.worker.mailbox.Mailbox` opens:

* at every (re)connection it declares the stream (``x-max-age`` = the ttl),
  appends a marker and replays the stream from ``now - ttl`` until the marker
  comes back, before the worker consumes any task; then it keeps reading;
* a revoke a Celery client sent (the ``revoke`` command, without taskd's
  ``persisted`` flag) is appended, so that workers started later honour it;
* ``terminate`` signals the child running the task and marks the job, so that
  its death ends the task REVOKED instead of redelivering it.

The record format is in :mod:`taskd.worker.revokes`.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import signal as signal_mod
import uuid
from typing import Any, Awaitable, Callable, Optional

import pika

from . import panel, revokes
from .amqp import AsyncChannel, ChannelLost

log = logging.getLogger("taskd.supervisor")

SYNC_TIMEOUT = 10.0     # seconds to replay the revokes at start before going on without


class Revokes:
    """``pool``: children to signal; ``conn()``: the open remote-control connection, or
    None; ``hostname``: records for other nodes are skipped."""

    def __init__(self, pool: Any, config: Any, hostname: str,
                 conn: Callable[[], Optional[AsyncChannel]]) -> None:
        self.pool, self.hostname, self.conn = pool, hostname, conn
        self.stream = config["worker.revoke_stream"]
        self.revoked = revokes.RevokedSet(config["worker.revoke_ttl"],
                                          config["worker.revokes_max"])
        self._synced: Optional[asyncio.Future] = None
        self._marker: Optional[str] = None

    async def open(self, conn: AsyncChannel,
                   reconnect: Callable[[], Awaitable[AsyncChannel]]) -> None:
        """Declare the stream and replay it. A refused declaration closes the connection:
        ``reconnect()`` opens the next one."""
        stream = await self._declare_stream(conn)
        if stream is None:
            await reconnect()
            return                                  # no permission: no revoke stream
        if not stream:
            conn = await reconnect()
            await conn.call(conn.channel.queue_declare, self.stream, passive=True)
        await self._replay(conn)

    def lost(self, reason: Any) -> None:
        """The connection went while opening: the replay fails with it."""
        if self._synced is not None and not self._synced.done():
            self._synced.set_exception(ChannelLost(f"connection lost: {reason}", reason))

    async def _declare_stream(self, conn: AsyncChannel) -> Optional[bool]:
        """True: declared; False: it exists with other arguments (used as it is); None:
        not allowed (logged: revokes are then not kept nor replayed)."""
        try:
            await conn.call(conn.channel.queue_declare, self.stream, durable=True,
                            arguments=revokes.stream_arguments(self.revoked.ttl))
        except ChannelLost as exc:
            code, text = (getattr(exc.reason, "reply_code", None),
                          getattr(exc.reason, "reply_text", exc))
            if code == 406:
                log.warning("the revoke stream %s exists with other arguments (another "
                            "worker.revoke_ttl?): using it as it is; revokes older than "
                            "worker.revoke_ttl are ignored all the same (%s)", self.stream,
                            text)
                return False
            if code == 403:
                log.error("revoke stream %s: the broker refused it (%s): revokes sent "
                          "before this worker started are not honoured, and those it "
                          "receives are not kept", self.stream, text)
                return None
            raise
        return True

    async def _replay(self, conn: AsyncChannel) -> None:
        """Read the stream from ``now - ttl`` until a marker appended now comes back."""
        if not conn.is_open:
            raise ChannelLost("the remote-control connection closed while it was being opened")
        self._marker = uuid.uuid4().hex
        self._synced = synced = asyncio.get_running_loop().create_future()
        self._append({"sync": self._marker})
        start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=self.revoked.ttl)
        conn.channel.basic_consume(self.stream, self.on_record,
                                   arguments={"x-stream-offset": start})
        try:
            await asyncio.wait_for(asyncio.shield(synced), SYNC_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("revoke stream %s: not replayed to its end in %gs; going on with "
                        "the %d revoke(s) read so far", self.stream, SYNC_TIMEOUT,
                        len(self.revoked))

    def revoke(self, ids: list, terminate: bool = False, signum: Optional[int] = None,
               persisted: bool = False, at: Optional[float] = None,
               destination: Optional[list] = None) -> list:
        """Revoke ``ids`` (revoked ``at``, default now); ``terminate``: signal the children
        running them. Unless ``persisted`` (it came from the stream, or from a taskd client,
        which appended it), it is appended to the stream. Returns the ids terminated."""
        news = [task_id for task_id in ids if self.revoked.add(task_id, at)]
        signame = signal_mod.Signals(signum or signal_mod.SIGTERM).name
        if not persisted:
            self._append(revokes.record(ids, terminate, signame, destination, at))
        if news:
            log.info("revoked: %s%s", ", ".join(news),
                     f" (terminate: {signame})" if terminate else "")
        terminated = []
        if terminate:
            wanted = set(ids)
            for child in self.pool.busy():
                job = child.job
                if job.task_id in wanted and job.terminated is None:
                    job.terminated = signame
                    log.warning("task %s revoked: sending %s to child %d (pid %d)",
                                job.describe(), signame, child.index, child.pid)
                    self.pool.kill(child, signum or signal_mod.SIGTERM)
                    terminated.append(job.task_id)
        return terminated

    def _append(self, record: dict) -> None:
        conn = self.conn()
        if conn is None or not conn.is_open:
            log.warning("revoke stream %s: not connected; this revoke is not kept for workers "
                        "started later", self.stream)
            return

        def confirmed(ok: Optional[bool]) -> None:
            if not ok:
                log.warning("revoke stream %s: the broker did not take a record (%s)",
                            self.stream, "refused" if ok is False else "connection lost")
        conn.publish("", self.stream, json.dumps(record).encode(),
                     pika.BasicProperties(content_type=panel.JSON, delivery_mode=2), confirmed)

    def on_record(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """A record of the revoke stream (replayed at start, then as they come)."""
        channel.basic_ack(method.delivery_tag)
        try:
            self._record(properties, body)
        except Exception:
            log.exception("revoke stream %s: internal error handling a record; dropped",
                          self.stream)

    def _record(self, properties: Any, body: bytes) -> None:
        try:
            record = revokes.parse_record(panel.decode_json(properties.content_type, body))
        except ValueError as exc:
            log.warning("revoke stream %s: record dropped: %s", self.stream, exc)
            return
        if "sync" in record:
            if record["sync"] == self._marker and self._synced and not self._synced.done():
                log.info("revoke stream %s replayed: %d task id(s) revoked", self.stream,
                         len(self.revoked))
                self._synced.set_result(None)
            return
        destination = record["destination"]
        if destination and self.hostname not in destination:
            return
        signum = None
        if record["terminate"]:
            try:
                signum = revokes.signal_number(record["signal"])
            except ValueError as exc:
                log.warning("revoke stream %s: %s; terminating with SIGTERM", self.stream, exc)
        self.revoke(record["task_id"], terminate=record["terminate"], signum=signum,
                    persisted=True, at=record["revoked_at"])

