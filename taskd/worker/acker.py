"""The acker: every acknowledgement the worker sends, on the consuming channel.

Owns the tag frontier (:class:`AckTracker`, its pure core, below),
the coalescing timer and the batch size. Under load acks are coalesced: sent
once ``batch`` deliveries have completed, else ``ACK_DELAY`` later; with
nothing else in hand, at once (a client waiting for its publisher confirm of a
persistent message waits for this ack). A delivery of a channel that is gone is
never acked: the broker has requeued it.

The pure core: Which deliveries to acknowledge, and how (pure).

Every delivery ends in exactly one ack, sent only once its task is done
(and its result or dead-letter copy confirmed), or stays unacked until the
channel closes and the broker redelivers it. Acks are batched: the longest
run of completed tags from the lowest outstanding one is acknowledged with
one ``basic.ack(multiple=True)``; completed tags stuck behind a task still
running (or an ETA still held) are acknowledged one by one, so they never
hold prefetch slots hostage.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional


# Longest time a completed delivery waits for its ack, so that the acks of tasks
# finishing close together go out as one ``basic.ack(multiple=True)``: each ack
# frame costs the supervisor and the broker about as much as a delivery.
ACK_DELAY = 0.001


class Acker:
    """``in_hand()``: whether other work is in hand (acks may wait for company);
    ``on_flushed()``: called after each flush (a warm shutdown waits for the last)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, in_hand: Callable[[], Any],
                 on_flushed: Callable[[], None] = lambda: None, batch: int = 1) -> None:
        self.loop = loop
        self.tracker = AckTracker()
        # A delivery received, or settled: asked of the tracker directly (one call less
        # per delivery on the hot path).
        self.received: Callable[[int], None] = self.tracker.received
        self.settled: Callable[[int], bool] = self.tracker.settled
        self.conn: Any = None           # the consuming AsyncChannel
        self.batch = batch
        self._in_hand, self.on_flushed = in_hand, on_flushed
        self._timer: Optional[asyncio.TimerHandle] = None

    def attach(self, conn: Any) -> None:
        """A new consuming channel: the tags of the old one are void."""
        self.conn = conn
        self.tracker.reset()

    def reset(self) -> None:
        self.tracker.reset()

    @property
    def waiting(self) -> bool:
        """Completed deliveries are waiting for the coalescing timer."""
        return self._timer is not None

    def current(self, channel: Any) -> bool:
        """``channel`` is the consuming channel, and open."""
        conn = self.conn
        return conn is not None and channel is conn.channel and conn.is_open

    def complete(self, job: Any) -> None:
        """``job`` is finished for good: ack its delivery (coalesced)."""
        conn = self.conn
        if conn is None or job.channel is not conn.channel:
            return      # from a channel that is gone: the broker has requeued it
        tracker = self.tracker
        tracker.completed(job.tag)
        if tracker.pending >= self.batch or not self._in_hand():
            self.flush()
        elif self._timer is None:
            self._timer = self.loop.call_later(ACK_DELAY, self.flush)

    def nack(self, job: Any) -> None:
        """Return ``job``'s delivery to its queue now (if its channel is still open)."""
        if self.current(job.channel):
            self.tracker.forget(job.tag)
            job.channel.basic_nack(job.tag, requeue=True)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self.conn
        if conn is None or not conn.is_open:
            return
        channel = conn.channel
        for tag, multiple in self.tracker.flush():
            channel.basic_ack(tag, multiple=multiple)
        self.on_flushed()


class AckTracker:
    __slots__ = ("_outstanding", "_completed")

    def __init__(self) -> None:
        self._outstanding = {}   # tag -> None, in delivery order (dicts keep order)
        self._completed = set()  # completed tags not yet acked

    def received(self, tag: int) -> None:
        self._outstanding[tag] = None

    def completed(self, tag: int) -> None:
        if tag in self._outstanding:
            self._completed.add(tag)

    def settled(self, tag: int) -> bool:
        """True when ``tag`` is acked, about to be, or not held here at all."""
        return tag not in self._outstanding or tag in self._completed

    def forget(self, tag: int) -> None:
        """The delivery will never be acked here (its channel is gone)."""
        self._outstanding.pop(tag, None)
        self._completed.discard(tag)

    def flush(self) -> list[tuple[int, bool]]:
        """Return the acks to send now: a list of ``(tag, multiple)``."""
        if not self._completed:
            return []
        acks = []
        frontier = None
        for tag in self._outstanding:
            if tag in self._completed:
                frontier = tag
            else:
                break
        if frontier is not None:
            acks.append((frontier, True))
            for tag in list(self._outstanding):
                del self._outstanding[tag]
                self._completed.discard(tag)
                if tag == frontier:
                    break
        for tag in sorted(self._completed):
            acks.append((tag, False))
            del self._outstanding[tag]
        self._completed.clear()
        return acks

    @property
    def pending(self) -> int:
        """Completed deliveries not yet acknowledged."""
        return len(self._completed)

    def __len__(self) -> int:
        return len(self._outstanding)

    def reset(self) -> None:
        self._outstanding.clear()
        self._completed.clear()
