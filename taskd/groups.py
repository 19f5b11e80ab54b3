"""``GroupResult``: the results of a group, in order; saved to and restored from the
result store in Celery's layout (key ``celery-taskset-meta-<id>``, value ``{"result":
[[id, null], [[[task_id, null], null], ...]]}``)."""
from __future__ import annotations

import time
from typing import Any

from . import current, serialization, stores
from .exceptions import TaskdError, TimeoutError as TaskdTimeoutError
from .result import AsyncResult

#: Celery's key prefix for a saved group (``GroupResult.save``).
GROUP_PREFIX = "celery-taskset-meta-"


def _store(app: Any, what: str) -> Any:
    store = app.store
    if store is None:
        raise TaskdError(f"{what} needs a result store: set result_backend to "
                         "redis://HOST:PORT/DB or postgresql://USER@HOST/DB (rpc:// keeps no "
                         "state that a worker could join on or another process read)")
    return store


class GroupResult:
    """The results of a group, in the order of its tasks (Celery's ``GroupResult``)."""

    def __init__(self, id: str, results: list, app: Any = None) -> None:
        self.id, self.results, self.app = id, list(results), app
        self.parent = None

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self):
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult:
        return self.results[index]

    @property
    def children(self) -> list:
        return self.results

    def get(self, timeout: float | None = None, propagate: bool = True) -> list:
        """Every result, in order; ``timeout`` bounds the whole wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                values.append(result.get(timeout=left, propagate=propagate))
            except TaskdTimeoutError:
                raise TaskdTimeoutError(f"group {self.id}: {self.completed_count()} of "
                                        f"{len(self)} done within {timeout:g}s") from None
        return values

    join = get

    def completed_count(self) -> int:
        """How many finished successfully."""
        return sum(1 for r in self.results if r.successful())

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        return any(r.failed() for r in self.results)

    def waiting(self) -> bool:
        return not self.ready()

    def forget(self) -> None:
        for result in self.results:
            result.forget()

    def as_tuple(self) -> list:
        """Celery's layout: ``[[id, parent], [[[task_id, None], None], ...]]``."""
        return [[self.id, None], [[[r.id, None], None] for r in self.results]]

    def save(self) -> None:
        """Keep the group (its task ids) in the store, for :meth:`restore` elsewhere."""
        app = self.app or current.get_app()
        store = _store(app, "GroupResult.save()")
        value = {"result": self.as_tuple()}
        if stores.kind(app.backend_url) == "redis":
            ttl = app.config["result_expires"]
            store.client.set(GROUP_PREFIX + self.id, serialization.json_dumps(value),
                             ex=ttl or None)
        else:
            store.store(GROUP_PREFIX + self.id, dict(value, status="SUCCESS", traceback=None,
                                                    children=[], date_done=None))

    @classmethod
    def restore(cls, id: str, app: Any = None) -> GroupResult | None:
        """The group saved under ``id`` (None if there is none)."""
        app = app or current.get_app()
        store = _store(app, "GroupResult.restore()")
        if stores.kind(app.backend_url) == "redis":
            raw = store.client.get(GROUP_PREFIX + id)
            meta = None if raw is None else serialization.json_loads(raw)
        else:
            meta = store.get_meta(GROUP_PREFIX + id)
        if not meta:
            return None
        ids = [item[0][0] for item in meta["result"][1]]
        return cls(id, [AsyncResult(i, app=app) for i in ids], app=app)
