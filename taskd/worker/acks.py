"""Which deliveries to acknowledge, and how (pure).

Every delivery ends in exactly one ack, sent only once its task is done
(and its result or dead-letter copy confirmed), or stays unacked until the
channel closes and the broker redelivers it. Acks are batched: the longest
run of completed tags from the lowest outstanding one is acknowledged with
one ``basic.ack(multiple=True)``; completed tags stuck behind a task still
running (or an ETA still held) are acknowledged one by one, so they never
hold prefetch slots hostage.
"""
from __future__ import annotations


class AckTracker:
    __slots__ = ("_outstanding", "_completed")

    def __init__(self):
        self._outstanding = {}   # tag -> None, in delivery order (dicts keep order)
        self._completed = set()  # completed tags not yet acked

    def received(self, tag):
        self._outstanding[tag] = None

    def completed(self, tag):
        if tag in self._outstanding:
            self._completed.add(tag)

    def settled(self, tag):
        """True when ``tag`` is acked, about to be, or not held here at all."""
        return tag not in self._outstanding or tag in self._completed

    def forget(self, tag):
        """The delivery will never be acked here (its channel is gone)."""
        self._outstanding.pop(tag, None)
        self._completed.discard(tag)

    def flush(self):
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
    def pending(self):
        """Completed deliveries not yet acknowledged."""
        return len(self._completed)

    def __len__(self):
        return len(self._outstanding)

    def reset(self):
        self._outstanding.clear()
        self._completed.clear()
