"""Publishing task messages: publisher confirms, ``mandatory`` and ``immediate``.

Confirms are always on. Two ways to wait for them:

* the pooled publisher (plain ``apply_async``/``delay``) waits for each
  message's confirm: ``apply_async`` returns only once the broker has taken
  responsibility for the message, or raises;
* a publisher from ``task.get_publisher()`` pipelines: ``apply_async(...,
  publisher=p)`` returns once the message is written, with at most
  ``window`` (default 1,000) messages awaiting their confirm; ``p.flush()``,
  ``p.close()`` and leaving ``with p:`` wait for all of them and raise
  :class:`~taskd.exceptions.PublishError` naming every task the broker did not
  take. A send with ``mandatory`` or ``immediate`` always waits for its own
  confirm, so its error is raised by that ``apply_async``.

A confirm that does not come within ``CONFIRM_TIMEOUT`` (30 s; for example
while a resource alarm blocks the connection) raises
:class:`~taskd.exceptions.ConfirmTimeout`: the broker may or may not have the
message, so it is not sent again (that could run the task twice), and its
entries are forgotten, so a late confirm or return settles nothing.
Channel errors (``405 RESOURCE_LOCKED`` while the broker still holds the
reply queue of a half-open connection, for instance) are retried like
connection errors.

``immediate``: RabbitMQ >= 3.0 refuses the AMQP ``immediate`` flag (and pika
does not offer it). taskd keeps the seed's promise, "raise if the task cannot
be routed to a worker immediately", this way: before publishing, it asks the
broker (``queue.declare`` passive) how many consumers each queue the message
would land in has; if none of them has a consumer it raises
:class:`~taskd.exceptions.NotDeliveredError` and publishes nothing. It then
publishes with ``mandatory`` set, so a message that reaches no queue raises
:class:`~taskd.exceptions.UnroutableError`. A worker that goes away between
the check and the delivery leaves the message queued for the next one, as
with any task.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time

from typing import TYPE_CHECKING, Any, Callable

import pika
import pika.exceptions

from . import pikashim, topology
from .connection import CONNECTION_ERRORS, connect_blocking
from ..exceptions import ConnectionError as TaskdConnectionError
from ..exceptions import ConfirmTimeout, NotDeliveredError, PublishError, UnroutableError

if TYPE_CHECKING:
    from ..app import App
    from ..options import Route, SendOptions
    from ..protocol import OutgoingMessage

log = logging.getLogger(__name__)

NACKED = "the broker refused it (basic.nack)"


class Nacked(PublishError):
    """The broker refused the publish (basic.nack): it did not take the message, so it
    is sent again, on a new channel (see :meth:`Publisher.open_channel`)."""


class Confirms:
    """The ledger of one publisher's confirms: publishes awaiting theirs, and the tasks
    the broker did not take, not yet reported (pure: fed pika's frames, no I/O)."""

    def __init__(self):
        self.pending = collections.OrderedDict()   # publish seq -> task id
        self.failed = []                # (task id, reason) not taken by the broker
        self.returned = {}              # task id -> why, from its basic.return
        self.seq = 0                    # the channel's last publish sequence number
        self.nacked = False             # a nack came on this channel: publish on a new one

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, task_id: str) -> int:
        """Register a publish before it is written (pika may read its confirm meanwhile)."""
        self.seq += 1
        self.pending[self.seq] = task_id
        return self.seq

    def on_confirm(self, frame) -> None:
        """A basic.ack or basic.nack, for one publish or all up to its tag."""
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        if method.multiple:
            while self.pending and next(iter(self.pending)) <= method.delivery_tag:
                self._settle(self.pending.popitem(last=False)[1], ok)
        elif method.delivery_tag in self.pending:
            self._settle(self.pending.pop(method.delivery_tag), ok)

    def _settle(self, task_id, ok):
        if not ok:
            self.nacked = True
            self.failed.append((task_id, NACKED))
        elif task_id in self.returned:
            self.failed.append((task_id, self.returned.pop(task_id)))

    def on_return(self, _channel, method, properties, _body) -> None:
        """A basic.return: the publish reached no queue (its confirm follows)."""
        if properties.correlation_id not in self.pending.values():
            return      # given up on (see give_up): its outcome was reported unknown
        self.returned[properties.correlation_id] = (
            f"reached no queue: exchange {method.exchange or '(default)'!r} has no binding "
            f"for routing key {method.routing_key!r}")

    def lost(self, why: str, *, channel_closed: bool = False) -> None:
        """No confirm will come for what is pending: each fails with ``why``."""
        for task_id in self.pending.values():
            self.failed.append((task_id, f"no confirm: {why}"))
        self.pending.clear()
        self.returned.clear()       # returns whose confirm will never come
        if channel_closed:
            self.seq = 0            # a new channel numbers its publishes from 1
            self.nacked = False

    def give_up(self) -> list[str]:
        """Forget what is pending (a late confirm or return then settles nothing);
        returns its task ids, whose outcome is unknown."""
        unknown = list(self.pending.values())
        self.pending.clear()
        for task_id in unknown:
            self.returned.pop(task_id, None)
        return unknown

    def take_failures(self, task_id: str | None = None) -> list[tuple[str, str]]:
        """Remove and return the failures of ``task_id`` (None: all of them)."""
        taken = [(t, why) for t, why in self.failed if task_id is None or t == task_id]
        self.failed = [(t, why) for t, why in self.failed if task_id is not None and t != task_id]
        return taken


class Publisher:
    """A broker connection (or a borrowed one) with a confirming channel.

    Use one for many sends (``task.get_publisher()``), as a context manager
    or with ``close()``. Not thread-safe: one per thread.
    """

    CONFIRM_TIMEOUT = 30.0

    def __init__(self, app: App, connection: pika.BlockingConnection | None = None,
                 connect_timeout: float | None = None, window: int = 0):
        self.app = app
        self.connect_timeout = connect_timeout if connect_timeout is not None else \
            app.config["broker.connect_timeout"]
        self._owns_connection = connection is None
        self.nodes = app.config.nodes()    # failover order over broker.url's nodes
        self.connection = connection
        self.channel = None
        self.window = window            # 0: wait for each confirm
        self._declared = set()         # ops and routes declared on this channel
        self.confirms = Confirms()
        self._close_reason = None      # why the broker closed our channel, when it did
        self._blocked = None           # why the broker blocks our connection, while it does
        self._written = None           # task id of the last publish written to the socket

    # -- life cycle ---------------------------------------------------------
    def open_channel(self) -> pika.adapters.blocking_connection.BlockingChannel:
        """The confirming channel, after opening the connection (when owned) and the
        channel if they are closed. A borrowed connection that is closed raises."""
        if self.connection is None or not self.connection.is_open:
            if not self._owns_connection:
                raise TaskdConnectionError("the connection passed to taskd is closed")
            self.connection = connect_blocking(
                self.app.config.broker_urls, self.connect_timeout,
                self.app.config["broker.heartbeat"], name="taskd-client",
                tls=self.app.config["broker.tls"], nodes=self.nodes)
            self.channel, self._declared, self._blocked = None, set(), None
            self.connection.add_on_connection_blocked_callback(self._on_blocked)
            self.connection.add_on_connection_unblocked_callback(self._on_unblocked)
        if self.confirms.nacked and self.channel is not None:
            self._renew_channel()
        if self.channel is None or not self.channel.is_open:
            self.confirms.lost("its channel closed", channel_closed=True)
            self.channel = channel = self.connection.channel()
            self._close_reason = None
            selected = []

            def current(handler):
                # a channel given up (_drop_channel) settles and closes nothing any more
                return lambda *args: handler(*args) if self.channel is channel else None
            pikashim.watch_channel(channel, on_confirm=current(self.confirms.on_confirm),
                                   on_return=current(self.confirms.on_return),
                                   on_close=current(self._on_channel_closed),
                                   on_selected=selected.append)
            self._pump_until(lambda: selected, "confirm.select")
            self._declared = set()
        return self.channel

    def _renew_channel(self):
        """The broker nacked a publish on this channel: go on with a new one. Right after
        a cluster node's loss, a channel that published to a quorum queue before its new
        leader was elected can stay refused for 40 s and more while a new channel on the
        same connection is taken at once (docs/clusters.md). Publishes still awaiting
        their confirm on the old channel are awaited first."""
        if self.confirms and self.connection is not None and self.connection.is_open:
            self._pump_until(lambda: not self.confirms, "publishes before a new channel")
        log.warning("the broker refused a publish (basic.nack); publishing on a new channel")
        self._drop_channel()

    def _drop_channel(self):
        """Go on without the current channel: from now on its confirms, returns and close
        are ignored, and its close is sent without waiting for the broker's answer (a
        connection that stopped answering must not hang the caller)."""
        channel, self.channel = self.channel, None
        if channel is not None:
            pikashim.close_channel_nowait(channel)

    def _pump_until(self, predicate, what):
        """Run the connection's I/O until ``predicate()`` is true (bounded). If the
        broker closes the channel meanwhile, every unconfirmed publish fails with why."""
        if predicate():
            return
        pikashim.pump_until(self.connection, self.CONFIRM_TIMEOUT, predicate,
                            lambda: self._close_reason is not None)
        if self._close_reason is not None:
            self.confirms.lost(self._close_reason)
            self.channel = None
            if not predicate():
                raise PublishError(f"no answer from the broker to {what}: {self._close_reason}")
        if not predicate():
            # No confirm within CONFIRM_TIMEOUT: the broker may or may not have the
            # messages. Forget them, so nothing stale is left, and name every one.
            unknown = self.confirms.give_up()
            self._drop_channel()    # the next send starts on a new channel
            blocked = f" (the broker blocks this connection: {self._blocked})" if self._blocked else ""
            raise ConfirmTimeout(
                f"no answer from the broker to {what} within {self.CONFIRM_TIMEOUT:g}s"
                f"{blocked}: whether it took task(s) {', '.join(unknown[:10])} is unknown; "
                "sending again may run a task twice", unknown)

    def _on_blocked(self, _connection, frame):
        self._blocked = getattr(frame.method, "reason", None) or "a resource alarm"

    def _on_unblocked(self, _connection, _frame):
        self._blocked = None

    def _on_channel_closed(self, _channel, reason):
        code = getattr(reason, "reply_code", None)
        text = getattr(reason, "reply_text", str(reason))
        if code == 404 and "no exchange" in text:
            self._close_reason = (f"the broker closed the channel: {text} (declare the exchange "
                                  "under exchanges: in the configuration)")
        else:
            self._close_reason = f"the broker closed the channel: ({code}) {text}"

    def flush(self) -> None:
        """Wait for every outstanding confirm; raise PublishError for any not taken."""
        if self.confirms and self.connection is not None and self.connection.is_open:
            try:
                self._pump_until(lambda: not self.confirms, "published messages")
            except CONNECTION_ERRORS as exc:
                self.confirms.lost(f"the connection failed ({exc})")
        self.confirms.lost("the connection closed")
        failed = self.confirms.take_failures()
        if failed:
            detail = "; ".join(f"{tid}: {why}" for tid, why in failed[:10])
            more = f" (and {len(failed) - 10} more)" if len(failed) > 10 else ""
            raise PublishError(f"{len(failed)} task(s) were not taken by the broker: "
                               f"{detail}{more}", [tid for tid, _ in failed])

    def close(self) -> None:
        try:
            self.flush()
        finally:
            try:
                if self.channel is not None and self.channel.is_open:
                    self.channel.close()
                if self._owns_connection and self.connection is not None and \
                        self.connection.is_open:
                    self.connection.close()
            except CONNECTION_ERRORS:
                pass
            self.channel = None
            if self._owns_connection:
                self.connection = None

    def __enter__(self) -> Publisher:
        self.open_channel()
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:       # do not hide the caller's exception behind ours
            try:
                self.close()
            except PublishError:
                pass

    # -- declarations ---------------------------------------------------------
    def ensure(self, ops: list) -> None:
        """Declare what is not yet declared on this channel (idempotent)."""
        todo = [op for op in ops if op not in self._declared]
        if todo:
            topology.execute_blocking(self.open_channel(), todo)
            self._declared.update(todo)

    def consumer_count(self, queue: str) -> int:
        frame = self.open_channel().queue_declare(queue, passive=True)
        return frame.method.consumer_count

    # -- publishing -----------------------------------------------------------
    def publish(self, message: OutgoingMessage, route: Route, options: SendOptions, *,
                reply: Callable[[], str] | None = None) -> OutgoingMessage:
        """Publish an :class:`~taskd.protocol.OutgoingMessage` (see the module doc);
        returns the message as published. ``options`` (resolved) say how:
        ``mandatory``, ``immediate``, ``retry``, ``retry_policy``.

        ``reply``, when given, is called on each attempt, once connected, and
        returns the ``reply_to`` queue for it (a new connection has a new one).

        A publish that fails for a connection reason, or because the broker
        closed the channel, is tried again on a new connection, as
        ``retry_policy`` says (Celery's keys: ``max_retries``,
        ``interval_start``, ``interval_step``, ``interval_max``; default
        ``broker.publish_retries`` tries at 0, 0.2, 0.4 ... s); then it raises
        ``ConnectionError``. Without a window it never returns without the
        broker's confirm; past ``CONFIRM_TIMEOUT`` it raises ``ConfirmTimeout``
        (the outcome is unknown, and the send is not tried again).
        """
        policy = dict(max_retries=self.app.config["broker.publish_retries"], interval_start=0.0,
                      interval_step=0.2, interval_max=1.0)
        policy.update(options.retry_policy or {})
        attempts = 1 + (policy["max_retries"] if options.retry and self._owns_connection else 0)
        for attempt in range(attempts):
            try:
                return self._publish_once(message, route, bool(options.mandatory),
                                          bool(options.immediate), reply)
            except Nacked as exc:
                # not taken: sent again on a new channel (open_channel renews it)
                if attempt + 1 >= attempts:
                    raise
                pause = min(policy["interval_max"],
                            policy["interval_start"] + (attempt + 1) * policy["interval_step"])
                log.warning("%s; sending it again on a new channel in %.1fs", exc, pause)
                time.sleep(pause)
            except (*CONNECTION_ERRORS, pika.exceptions.AMQPChannelError,
                    TaskdConnectionError) as exc:
                self.confirms.lost(f"the connection failed ({exc})")
                # this message is sent again below: forget its failure, keep the others'
                self.confirms.take_failures(message.task_id)
                self.channel = None
                if self._owns_connection and self.connection is not None:
                    self.nodes.failed(getattr(self.connection, "taskd_url", None))
                    try:
                        self.connection.close()
                    except Exception:
                        pass
                    self.connection = None
                if attempt + 1 >= attempts:
                    raise TaskdConnectionError(
                        f"task {message.task_id} was not sent after {attempts} attempt(s): {exc}"
                    ) from None
                pause = min(policy["interval_max"],
                            policy["interval_start"] + attempt * policy["interval_step"])
                log.warning("publish of task %s failed (%s); trying again in %.1fs%s",
                            message.task_id, exc, pause,
                            " (it was written before the connection failed: if the broker "
                            "had taken it, the task runs twice; broker.publish_retries: 0 "
                            "raises instead)" if self._written == message.task_id else "")
                time.sleep(pause)

    def _publish_once(self, message, route, mandatory, immediate, reply):
        channel = self.open_channel()
        if reply is not None:
            message = dataclasses.replace(message, reply_to=reply())
        if immediate:
            # A queue with a consumer exists already: nothing to declare.
            self._check_consumers(message, route)
            channel = self.open_channel()
            mandatory = True
        elif route.declare and route.declare not in self._declared:
            self.ensure(topology.plan_queues(self.app.config, route.declare))
            self._declared.add(route.declare)
        properties = pika.BasicProperties(
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            priority=message.priority,
            delivery_mode=2,
            headers=message.headers,
            expiration=message.expiration,
        )
        # Register before publishing: pika may read the confirm while it writes.
        seq = self.confirms.add(message.task_id)
        self._written = None
        try:
            channel.basic_publish(route.exchange, route.routing_key, message.body,
                                  properties, mandatory=mandatory)
            self._written = message.task_id     # the broker may have it from now on
        except pika.exceptions.ChannelClosedByBroker as exc:
            self.confirms.pending.pop(seq, None)
            self.channel = None
            if exc.reply_code == 404:
                raise UnroutableError(
                    f"task {message.task_id} not sent: exchange {route.exchange!r} does not exist "
                    "(declare it under exchanges: in the configuration)") from None
            raise PublishError(f"task {message.task_id} not sent: {exc.reply_text}") from None
        if self.window and not mandatory and len(self.confirms) <= self.window:
            return message
        if mandatory or not self.window:
            self._pump_until(lambda: seq not in self.confirms.pending, "a publish")
        else:       # the window is full: let half of it drain
            self._pump_until(lambda: len(self.confirms) <= self.window // 2, "publishes")
        self._raise_for(message, route)
        return message

    def _raise_for(self, message, route):
        mine = self.confirms.take_failures(message.task_id)
        if not mine:
            return
        why = mine[0][1]
        if why.startswith("reached no queue"):
            raise UnroutableError(f"task {message.task_name}[{message.task_id}] {why}")
        if "NOT_FOUND - no exchange" in why:
            why = why.removeprefix("no confirm: the broker closed the channel: ")
            raise UnroutableError(f"task {message.task_name}[{message.task_id}] not sent: {why}")
        if why == NACKED:
            raise Nacked(f"task {message.task_id} was not sent: {why}", [message.task_id])
        raise PublishError(f"task {message.task_id} was not sent: {why}", [message.task_id])

    def _check_consumers(self, message, route):
        queues = [q.name for q in route.declare] or (
            [route.routing_key] if route.exchange == "" else [])
        if not queues:
            raise NotDeliveredError(
                f"immediate=True: cannot tell which queues exchange {route.exchange!r} routes "
                f"{route.routing_key!r} to (declare them under queues: in the configuration)")
        counts = {}
        for queue in queues:
            try:
                counts[queue] = self.consumer_count(queue)
            except pika.exceptions.ChannelClosedByBroker:   # no such queue
                self.channel = None
                counts[queue] = 0
        if not any(counts.values()):
            raise NotDeliveredError(
                f"immediate=True: no worker is consuming {', '.join(queues)}; "
                f"task {message.task_id} was not sent")
