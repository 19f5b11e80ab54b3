"""Workflows on the client: signatures, ``chain``, ``group``, ``chord`` (Celery 5's canvas).

A :class:`Signature` is a task call that has not been sent: the task's name,
partial arguments, options. It is a ``dict`` in Celery's layout (``task``,
``args``, ``kwargs``, ``options``, ``subtask_type``, ``immutable``), which is
what travels in a message's embed, so Celery workers and clients read taskd's
and the other way round.

* ``chain(a, b, c)`` / ``a | b | c``: the first task is sent with the rest in
  its ``chain`` embed (last step first); each worker sends the next step with
  the result as its first argument. A chain stops at the first failure.
* ``group(a, b)``: the tasks sent at once under one group id; a
  :class:`GroupResult`.
* ``chord(header, body)`` (or ``group(...) | body``): the header tasks carry the
  body in their ``chord`` embed; the worker that finishes the last of them
  publishes the body with the header's results in order (no polling task).
  Needs a result store (``redis://`` or ``postgresql://``).

See ``docs/workflows.md``.
"""
from __future__ import annotations

import uuid
from typing import Any, Iterable

from . import current, stores
from .exceptions import TaskdError
from .groups import GROUP_PREFIX, GroupResult, _store
from .options import SendOptions
from .result import AsyncResult

#: Groups at least this large are sent on a pipelined publisher (confirms in flight).
PIPELINE_FROM = 20


def _app(app: Any, tasks: Iterable = ()) -> Any:
    """``app``, else the app of the first signature that has one, else the current app."""
    if app is not None:
        return app
    for task in tasks:
        if getattr(task, "app", None) is not None:
            return task.app
    return current.get_app()


class Signature(dict):
    """One task call, not yet sent: ``add.s(2)``, ``signature("tasks.add", (2, 2))``."""

    def __init__(self, task: Any, args: Iterable = (), kwargs: dict | None = None,
                 options: dict | None = None, *, immutable: bool = False,
                 subtask_type: str | None = None, app: Any = None) -> None:
        if isinstance(task, dict):
            super().__init__(task)
            self.setdefault("options", {})
        else:
            name = task if isinstance(task, str) else task.name
            super().__init__(task=name, args=list(args or ()), kwargs=dict(kwargs or {}),
                             options=dict(options or {}), subtask_type=subtask_type,
                             immutable=bool(immutable))
        self.app = app

    # -- what it is ---------------------------------------------------------------------
    name = property(lambda self: self["task"])
    args = property(lambda self: tuple(self.get("args") or ()))
    kwargs = property(lambda self: dict(self.get("kwargs") or {}))
    options = property(lambda self: self["options"])
    immutable = property(lambda self: bool(self.get("immutable")))
    id = property(lambda self: self["options"].get("task_id"))

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}{'i' if self.immutable else ''}({', '.join(parts)})"

    def as_dict(self) -> dict:
        """The plain dict that goes on the wire (nested signatures as dicts too)."""
        options = {}
        for key, value in self.options.items():
            if isinstance(value, Signature):
                value = value.as_dict()
            elif isinstance(value, (list, tuple)) and value and isinstance(value[0], dict):
                value = [v.as_dict() if isinstance(v, Signature) else dict(v) for v in value]
            options[key] = value
        plain = {k: v for k, v in self.items() if k != "options"}
        plain.update(args=list(self.args), kwargs=self.kwargs, options=options)
        return plain

    # -- making new ones ------------------------------------------------------------------
    def clone(self, args: Iterable = (), kwargs: dict | None = None, **options: Any
              ) -> Signature:
        """A copy with ``args`` put before its partial arguments (unless immutable),
        ``kwargs`` and ``options`` merged in."""
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        copy = Signature(self.name, self.args if self.immutable else args + self.args,
                         dict(self.kwargs, **kwargs), dict(self.options, **options),
                         immutable=self.immutable, app=self.app)
        for key in ("link", "link_error"):
            if key in self.options:
                copy.options[key] = list(self.options[key])
        return copy

    def set(self, **options: Any) -> Signature:
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = bool(immutable)

    def link(self, callback: dict) -> dict:
        """Call ``callback`` with this task's result when it succeeds."""
        self.options.setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback: dict) -> dict:
        """Call ``errback`` with this task's id when it fails."""
        self.options.setdefault("link_error", []).append(errback)
        return errback

    on_error = link_error

    def freeze(self, task_id: str | None = None) -> AsyncResult:
        """Fix the task id now (the result can be handed out before the send)."""
        self.options["task_id"] = task_id or self.id or str(uuid.uuid4())
        return AsyncResult(self.id, app=_app(self.app), task_name=self.name)

    def __or__(self, other: Any) -> Any:
        if isinstance(other, (Signature, dict)):
            return chain(self, other, app=self.app)
        return NotImplemented

    # -- sending -------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task here, in this process (as Celery's signature call does)."""
        task = current.registry.get(self.name)
        if task is None:
            raise TaskdError(f"signature {self.name}: no such task in this process")
        call = self.clone(args, kwargs)
        return task(*call.args, **call.kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable = (), kwargs: dict | None = None, **options: Any
                    ) -> AsyncResult:
        """Send it: ``args`` go before the partial arguments, options are those of
        ``Task.apply_async`` (``link=``, ``link_error=`` ...) over the signature's."""
        call = self.clone(args, kwargs, **options)
        app = _app(self.app)
        sent = {k: v for k, v in call.options.items() if k in SEND_OPTIONS}
        return app.send_task(call.name, call.args, call.kwargs,
                             task=current.registry.get(call.name), **sent)


SEND_OPTIONS = frozenset(SendOptions.__dataclass_fields__)


def signature(task: Any, args: Iterable = (), kwargs: dict | None = None, *, app: Any = None,
              **options: Any) -> Signature:
    """A signature by task (or name, or the dict of one received from elsewhere)."""
    if isinstance(task, dict) and not options:
        kind = task.get("subtask_type")
        if kind == "chain":
            return chain(*task["kwargs"]["tasks"])
        if kind == "group":
            return group(task["kwargs"]["tasks"])
        if kind == "chord":
            return chord(task["kwargs"]["header"], task["kwargs"]["body"])
        return task if isinstance(task, Signature) else Signature(task, app=app)
    immutable = options.pop("immutable", False)
    return Signature(task, args, kwargs, options, immutable=immutable, app=app)


def _sig(value: Any) -> Signature:
    return value if isinstance(value, Signature) else signature(value)


class chain(Signature):
    """Tasks run one after the other, each given its predecessor's result."""

    def __init__(self, *tasks: Any, app: Any = None, **options: Any) -> None:
        if len(tasks) == 1 and isinstance(tasks[0], (list, tuple)):
            tasks = tuple(tasks[0])
        steps: list = []
        for task in map(_sig, tasks):
            steps.extend(task.tasks if isinstance(task, chain) else [task])
        super().__init__("celery.chain", (), {"tasks": steps}, options,
                         subtask_type="chain", app=app)

    tasks = property(lambda self: list(self["kwargs"]["tasks"]))

    def __or__(self, other: Any) -> Any:
        return chain(*self.tasks, other, app=self.app)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.tasks))

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable = (), kwargs: dict | None = None, **options: Any
                    ) -> AsyncResult:
        """Send the first step with the others embedded; the last step's result (its
        ``.parent`` the step before, and so on)."""
        app = _app(self.app, self.tasks)
        options = dict(self.options, **options)
        tasks = self.tasks
        if not tasks:
            raise TaskdError("an empty chain has nothing to send")
        if isinstance(tasks[0], group) and len(tasks) > 1:     # group | task: a chord
            body = tasks[1] if len(tasks) == 2 else chain(*tasks[1:], app=app)
            return chord(tasks[0], body, app=app).apply_async(args, kwargs, **options)
        if isinstance(tasks[0], chord) and len(tasks) > 1:
            first = tasks[0]
            body = chain(first.body, *tasks[1:], app=app)
            return chord(first.header, body, app=app).apply_async(args, kwargs, **options)
        link_error, link = options.pop("link_error", None), options.pop("link", None)
        last_id = options.pop("task_id", None)
        if any(isinstance(t, (group, chord, chain)) for t in tasks[1:]):
            raise TaskdError("a group or chord inside a chain (after its first step) is not "
                             "supported by taskd; chain(group, task) is a chord and is")
        steps = [t.clone() for t in tasks]
        for callback in _listed(link):        # Celery's: on the chain's last task
            steps[-1].link(callback)
        results = []
        parent = None
        for step in steps:
            for errback in _listed(link_error):   # on every step: the one that fails calls it
                step.link_error(errback)
            result = step.freeze(last_id if step is steps[-1] else None)
            result.parent = parent
            results.append(result)
            parent = result
        root = steps[0].id
        for step in steps[1:]:
            step.options.setdefault("root_id", root)
        rest = [s.as_dict() for s in reversed(steps[1:])]
        last = results[-1]
        if rest and _store_kind(app) == "rpc":
            # Results go to the caller's reply queue: the worker that sends the last step
            # names it (the other steps' results are not kept).
            session = app.session()
            with app.session_lock():
                last._reply_to = rest[0]["options"]["reply_to"] = session.results.reply_to()
                last._claim(session.results)
        sent = steps[0].apply_async(args, kwargs, chain=rest or None, **options)
        return last if len(steps) > 1 else sent


def _listed(value: Any) -> list:
    if not value:
        return []
    return [value] if isinstance(value, dict) else list(value)


def _store_kind(app: Any) -> str:
    return stores.kind(app.backend_url)


class group(Signature):
    """Tasks sent together; their results in order (:class:`GroupResult`)."""

    def __init__(self, *tasks: Any, app: Any = None, **options: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], dict):
            tasks = tuple(tasks[0])
        super().__init__("celery.group", (), {"tasks": [_sig(t) for t in tasks]}, options,
                         subtask_type="group", app=app)

    tasks = property(lambda self: list(self["kwargs"]["tasks"]))

    def __or__(self, other: Any) -> Any:
        if isinstance(other, group):
            return chain(self, other, app=self.app)
        return chord(self, other, app=self.app)

    def __len__(self) -> int:
        return len(self.tasks)

    def __call__(self, *args: Any, **kwargs: Any) -> GroupResult:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable = (), kwargs: dict | None = None, **options: Any
                    ) -> GroupResult:
        app = _app(self.app, self.tasks)
        options = dict(self.options, **options)
        group_id = options.pop("task_id", None) or str(uuid.uuid4())
        if any(isinstance(t, (group, chord, chain)) for t in self.tasks):
            raise TaskdError("a group of groups, chords or chains is not supported by taskd")
        results = send_parts(app, self.tasks, args, kwargs, group_id, options)
        return GroupResult(group_id, results, app=app)


def send_parts(app: Any, tasks: list, args: Iterable, kwargs: dict | None, group_id: str,
               options: dict) -> list:
    """Send each of ``tasks`` with the group's id and its index; their results."""
    steps = [t.clone(args, kwargs, group_id=group_id, group_index=i, **options)
             for i, t in enumerate(tasks)]
    if len(steps) < PIPELINE_FROM or app.store is None:
        return [s.apply_async() for s in steps]
    results = []
    with app.get_publisher() as publisher:   # confirms in flight, all awaited at the end
        for step in steps:
            results.append(step.apply_async(publisher=publisher))
    return results


class chord(Signature):
    """A group (the header) and a task (the body) called with the header's results."""

    def __init__(self, header: Any, body: Any = None, app: Any = None, **options: Any
                 ) -> None:
        header = header if isinstance(header, group) else group(header, app=app)
        super().__init__("celery.chord", (), {"header": header,
                                              "body": None if body is None else _sig(body)},
                         options, subtask_type="chord", app=app)

    header = property(lambda self: self["kwargs"]["header"])
    body = property(lambda self: self["kwargs"]["body"])

    def __call__(self, body: Any = None, **options: Any) -> AsyncResult:
        """Send it; ``chord(header)(body)`` names the body here (Celery's idiom)."""
        if body is not None:
            return chord(self.header, body, app=self.app, **self.options).apply_async(
                **options)
        return self.apply_async(**options)

    def apply_async(self, args: Iterable = (), kwargs: dict | None = None, **options: Any
                    ) -> AsyncResult:
        """Send the header; the body's result (its ``.parent``: the header's
        :class:`GroupResult`)."""
        if self.body is None:
            raise TaskdError("a chord without a body: chord(header, body) or "
                             "chord(header)(body)")
        app = _app(self.app, [*self.header.tasks, self.body])
        store = _store(app, "a chord")
        options = dict(self.options, **options)
        body_id = options.pop("task_id", None)
        link_error, link = options.pop("link_error", None), options.pop("link", None)
        body = self.body
        steps = [s.clone() for s in (body.tasks if isinstance(body, chain) else [body])]
        for callback in _listed(link):            # Celery's: on the body (its last task)
            steps[-1].link(callback)
        for errback in _listed(link_error):       # a failed header calls these once
            for step in steps:
                step.link_error(errback)
        if len(steps) > 1:              # the body's first step carries the rest
            results = [s.freeze() for s in steps[:-1]] + [steps[-1].freeze(body_id)]
            for parent, child in zip(results, results[1:]):
                child.parent = parent
            steps[0].options["chain"] = [s.as_dict() for s in reversed(steps[1:])]
            body, result, first = steps[0], results[-1], results[0]
        else:
            body = steps[0]
            result = first = body.freeze(body_id)
        group_id = str(uuid.uuid4())
        header = self.header.tasks
        wire = body.as_dict()
        wire["chord_size"] = len(header)
        if not header:
            body.apply_async(([],))
            first.parent = GroupResult(group_id, [], app=app)
            return result
        if _store_kind(app) == "redis":
            # Celery's chord size key, so that a Celery worker can finish a taskd chord too.
            store.client.set(f"{GROUP_PREFIX}{group_id}.s", len(header),
                             ex=app.config["result_expires"] or 86400)
        parts = send_parts(app, header, args, kwargs, group_id, dict(options, chord=wire))
        first.parent = GroupResult(group_id, parts, app=app)
        return result
