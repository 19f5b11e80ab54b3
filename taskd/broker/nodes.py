"""The broker's nodes: ``broker.url`` as one URL or several, and the order to try them in.

``broker.url`` may name several nodes of one RabbitMQ cluster, as a YAML
list or as one string separated by ``;`` (Celery's form). A connection tries
the nodes in the order :meth:`Nodes.order` gives and keeps the first that
answers; when a connection to a node is lost or refused, that node goes to
the back of the order (:meth:`Nodes.failed`), so the next attempt starts with
the next node at once instead of waiting on the one that just failed.

``broker.failover``:

* ``round-robin`` (default): the listed order, starting after the node that
  failed last. Every client starts with the first node listed.
* ``shuffle``: the nodes in a random order, drawn once per :class:`Nodes`
  (one per connection owner: a worker, a client process), so that many
  clients spread over the cluster; a node that failed still goes to the back.

Pure: no I/O. One :class:`Nodes` is shared by the connections of one owner (a
worker's consuming and publishing connections), so that both move on together.
"""
from __future__ import annotations

import random
import re
from typing import Callable, Iterable, Sequence, Union

STRATEGIES = ("round-robin", "shuffle")


# A ";" separates two URLs only where the next URL begins ("amqp://", "amqps://"): an
# unencoded ";" inside a password does not split its URL (nor leak part of it when masked).
_SEPARATOR = re.compile(r";(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(value: Union[str, Sequence[str], None]) -> tuple:
    """The node URLs of a ``broker.url`` value: a string (``;``-separated) or a list."""
    if value is None:
        return ()
    items: Iterable[str] = _SEPARATOR.split(value) if isinstance(value, str) else value
    return tuple(u.strip(" ;") for u in items if isinstance(u, str) and u.strip(" ;"))


class Nodes:
    """The failover order over the URLs of ``broker.url``."""

    def __init__(self, urls: Union[str, Sequence[str]], strategy: str = "round-robin",
                 shuffle: Callable[[list], None] = random.shuffle) -> None:
        urls = list(split_urls(urls))
        if not urls:
            raise ValueError("broker.url names no broker node")
        if strategy not in STRATEGIES:
            raise ValueError(f"broker.failover: expected one of {', '.join(STRATEGIES)}")
        if strategy == "shuffle":
            shuffle(urls)
        self.urls = tuple(urls)
        self.strategy = strategy
        self.start = 0          # index of the node to try first
        self.current = None     # the URL last connected to

    def __len__(self) -> int:
        return len(self.urls)

    def order(self) -> list:
        """The URLs in the order to try them now."""
        return list(self.urls[self.start:] + self.urls[:self.start])

    def connected(self, url: str) -> None:
        """A connection to ``url`` opened: try it first next time too."""
        self.current = url
        if url in self.urls:
            self.start = self.urls.index(url)

    def failed(self, url: str) -> None:
        """A connection to ``url`` was refused or lost: start with the next node."""
        if url in self.urls and self.urls[self.start] == url:
            self.start = (self.urls.index(url) + 1) % len(self.urls)

    def position(self, url: str) -> str:
        """``url``'s place for a log line: "node 2 of 3" (empty for a single node)."""
        if len(self.urls) < 2 or url not in self.urls:
            return ""
        return f"node {self.urls.index(url) + 1} of {len(self.urls)}"
