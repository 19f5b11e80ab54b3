"""Internal errors, counted per message, so that none is retried for ever (pure).

The intake dead-letters every input it can name a fault in. Anything else that
raises while a delivery is handled is a bug in taskd (or in pika, or in a custom
serializer) that the message happens to trigger: the delivery is given back to
the queue to be tried again, since the bug may not strike twice. When the same
message has struck ``limit`` times it is dead-lettered with the error's text, so
that a message that always triggers the bug cannot loop between the broker and
the worker.

A message is known by a digest of its body and correlation id: nothing that a
bug in header handling could trip over, and the same in each redelivered copy.
"""
from __future__ import annotations

import collections
import hashlib
from typing import Optional


def message_digest(correlation_id: Optional[str], body: bytes) -> bytes:
    digest = hashlib.blake2b(str(correlation_id).encode("utf-8", "backslashreplace"),
                             digest_size=16)
    digest.update(body)
    return digest.digest()


class Strikes:
    """How many internal errors each of the last ``size`` failing messages caused."""

    def __init__(self, limit: int = 3, size: int = 1000) -> None:
        self.limit, self.size = limit, size
        self._counts = collections.OrderedDict()

    def add(self, digest: bytes) -> bool:
        """Count one more internal error for ``digest``; True once it reached the limit
        (the count is then dropped: the message is dead-lettered)."""
        count = self._counts.pop(digest, 0) + 1
        if count >= self.limit:
            return True
        self._counts[digest] = count
        while len(self._counts) > self.size:
            self._counts.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._counts)
