"""The ledger of a client publisher's confirms (pure: fed pika's frames, no I/O).

:class:`~taskd.broker.publisher.Publisher` registers each publish here before it
writes it, and hands over every ``basic.ack``/``basic.nack`` and ``basic.return``
pika reads. What the broker did not take is kept as ``(task id, reason)`` until the
publisher reports it: at once for a send that waits for its confirm, at ``flush``
for a pipelined one. A nack also marks the channel: the publisher goes on with a new
one (a channel nacked by a quorum queue during a leader election can stay nacked).
"""
from __future__ import annotations

import collections

import pika.spec

NACKED = "the broker refused it (basic.nack)"


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
