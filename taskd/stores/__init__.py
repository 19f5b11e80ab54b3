"""Result stores: where task state lives when ``result_backend`` is not ``rpc://``.

``rpc://`` (the default) sends each result to the caller's reply queue: only
that process can read it, once. A *store* keeps each task's state under its
id, so any process can read it, any number of times, until it expires:

* ``redis://HOST:PORT/DB`` (extra ``redis``): Celery's layout. Key
  ``celery-task-meta-<id>``, value the JSON meta ``{"task_id", "status",
  "result", "traceback", "children", "date_done"}``, written with ``SETEX
  result_expires`` and published on a channel of the key's name, so a stock
  Celery 5 client with the same backend URL reads taskd results and the other
  way round.
* ``postgresql://USER:PASS@HOST/DB?table=NAME`` (extra ``postgres``): one
  ``jsonb`` row per task in ``NAME`` (default ``taskd_results``, created if
  missing), ``NOTIFY`` on write; expired rows are deleted by the workers.

The interface every store has (small on purpose: workflows build chord
counters on :meth:`incr`, revoke writes REVOKED through :meth:`store`):

=============================  ===================================================
sync (clients, children)       ``get_meta(id)``, ``wait(id, timeout)``,
                               ``store(id, meta)``, ``forget(id)``,
                               ``incr(name, by, expires)``, ``close()``
async (the worker supervisor)  ``await write_many([(id, body), ...])``,
                               ``await prune()``, ``await close()``
=============================  ===================================================

A *meta* is the decoded JSON mapping above; a *body* is its JSON bytes. JSON
only: nothing here ever unpickles.
"""
from __future__ import annotations

import importlib
import os
import socket
import urllib.parse
from typing import Any

from .. import protocol, serialization
from ..exceptions import ConfigError, ContentDisallowed
from ..masking import mask_url

#: Celery's key prefix (``KeyValueStoreBackend.task_keyprefix``).
KEY_PREFIX = "celery-task-meta-"
#: Extras to install for each store, by URL scheme.
EXTRAS = {"redis": ("redis", "redis"), "rediss": ("redis", "redis"),
          "postgresql": ("psycopg", "postgres"), "postgres": ("psycopg", "postgres")}
DEFAULT_TABLE = "taskd_results"
JSON = "application/json"


def kind(url: str | None) -> str:
    """``"rpc"``, ``"redis"`` or ``"postgres"`` for a ``result_backend`` URL; raises
    ValueError naming what is accepted."""
    scheme = urllib.parse.urlsplit(url or "rpc://").scheme.lower()
    if scheme == "rpc":
        return "rpc"
    if scheme in ("redis", "rediss"):
        return "redis"
    if scheme in ("postgresql", "postgres"):
        return "postgres"
    raise ValueError(f"unknown result backend {scheme + '://' if scheme else repr(url)}: "
                     "use rpc://, redis://HOST:PORT/DB or postgresql://USER@HOST/DB")


def check_url(url: Any) -> tuple:
    """A settings check for ``result_backend``."""
    if not isinstance(url, str) or not url:
        return None, "rpc://, redis://HOST:PORT/DB or postgresql://USER@HOST/DB"
    try:
        kind(url)
    except ValueError as exc:
        return None, str(exc)
    return url, None


def require(url: str) -> Any:
    """Import the client library of ``url``'s store, or raise ConfigError naming the extra."""
    module, extra = EXTRAS[urllib.parse.urlsplit(url).scheme.lower()]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError([f"result_backend {redact(url)} needs the client library "
                           f"{module!r}: install taskd-queue[{extra}]"], "result_backend") from None


def redact(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    return mask_url(url)


_node: list = []      # the worker's node name (-n, worker.hostname), once it is known


def set_node_name(name: str) -> None:
    _node[:] = [name]


def node_name() -> str:
    """The worker's name in STARTED states and extended results (Celery's ``hostname``):
    its node name (``-n``, ``worker.hostname``), as events and remote control give it."""
    return _node[0] if _node else f"taskd@{socket.gethostname()}"


def ready(meta: dict | None) -> bool:
    return meta is not None and meta.get("status") in protocol.READY_STATES


def decode(body: bytes | str, accept: set | None = None) -> dict:
    """The meta in a stored JSON body (``accept``: the client's result accept list)."""
    if accept is not None and JSON not in accept:
        raise ContentDisallowed("the result store holds JSON results, and application/json is "
                                "not in result_accept_content")
    meta = serialization.json_loads(body)
    if not isinstance(meta, dict) or "status" not in meta:
        raise ValueError(f"not a task meta: {type(meta).__name__}")
    return meta


def encode(meta: dict) -> bytes:
    return serialization.json_dumps(meta)


def as_json(body: bytes, content_type: str | None, content_encoding: str | None) -> bytes:
    """A result body from a child (in the task's serializer) as stored JSON: JSON passes as
    it is; another serializer's is decoded and encoded again, or becomes a FAILURE naming
    what could not be encoded."""
    if (content_type or JSON) == JSON:
        return body
    meta = serialization.loads(body, content_type, content_encoding)
    try:
        return encode(meta)
    except Exception as exc:
        failure = protocol.exception_to_dict(
            TypeError(f"result not storable as JSON (result stores hold JSON only): {exc}"))
        return encode(protocol.result_meta(meta.get("task_id"), protocol.FAILURE, failure,
                                           f"{exc}\n"))


def open_store(url: str, expires: int = 0, fail_fast: bool = False) -> Any:
    """The synchronous store for ``url`` (None for rpc://); the client library is imported
    here, so a missing extra fails at once with its name. ``fail_fast``: short timeouts
    and no retries (a worker child: a store that is down must not hold up tasks)."""
    which = kind(url)
    if which == "rpc":
        return None
    require(url)
    if which == "redis":
        from .redis import RedisStore
        return RedisStore(url, expires, fail_fast)
    from .postgres import PostgresStore
    return PostgresStore(url, expires, fail_fast)


def open_async_store(url: str, expires: int = 0) -> Any:
    """The supervisor's asyncio store for ``url`` (None for rpc://)."""
    which = kind(url)
    if which == "rpc":
        return None
    require(url)
    if which == "redis":
        from .redis import AsyncRedisStore
        return AsyncRedisStore(url, expires)
    from .postgres import AsyncPostgresStore
    return AsyncPostgresStore(url, expires)


# -- the worker's children ------------------------------------------------------------
# The supervisor names its store before it forks; each child opens its own connection on
# first use (never one inherited through fork).

_worker: dict = {}


def set_worker_store(url: str, expires: int, track_started: bool) -> None:
    _worker.clear()
    _worker.update(url=url, expires=expires, track_started=track_started, pid=None, store=None)


def worker_store() -> Any:
    """This worker child's store connection (None with rpc://, or outside a worker)."""
    if not _worker or kind(_worker["url"]) == "rpc":
        return None
    if _worker["pid"] != os.getpid():
        _worker.update(pid=os.getpid(), store=open_store(_worker["url"], _worker["expires"],
                                                         fail_fast=True))
    return _worker["store"]


def worker_tracks_started() -> bool:
    return bool(_worker.get("track_started"))
