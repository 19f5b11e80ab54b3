"""Workflows without a broker: signatures and the dicts they put on the wire (compared with
Celery 5's own), and the worker's Workflows part against a stub channel (next steps
confirmed before the task settles; refusals)."""
import asyncio
import collections
import types

import pytest

from taskd import chain, chord, config as config_mod, group, protocol, serialization, signature
from taskd.canvas import GroupResult, Signature
from taskd.exceptions import InvalidTaskMessage, TaskdError
from taskd.options import SendOptions
from taskd.worker.canvas import Workflows

CONFIG = config_mod.loads("worker:\n  dead_letter_queue: dlq\n")


class FakeApp:
    """Records what a workflow sends, with the store kind of its result_backend."""

    def __init__(self, backend="redis://127.0.0.1:6379/0"):
        self.backend_url, self.sent = backend, []
        self.config = {"result_expires": 60}
        self.store = None if backend.startswith("rpc") else types.SimpleNamespace(
            client=types.SimpleNamespace(set=lambda *a, **kw: None))

    def send_task(self, name, args, kwargs, task=None, **options):
        options = SendOptions.of(options).resolved(CONFIG)
        message = options.encode(name, args, kwargs)
        self.sent.append((message.headers, serialization.json_loads(message.body)))
        from taskd.result import AsyncResult
        return AsyncResult(options.task_id, app=self)


def test_a_signature_is_celerys_dict():
    celery = pytest.importorskip("celery")
    ours = signature("tasks.add", (2,), {"y": 3}, countdown=5)
    theirs = celery.signature("tasks.add", (2,), {"y": 3}, countdown=5)
    assert ours.as_dict() == dict(theirs, args=list(theirs["args"]))
    assert Signature(dict(theirs)).as_dict()["options"] == {"countdown": 5}


def test_partial_args_immutable_clone_and_options():
    add = signature("tasks.add", (2,))
    assert add.clone((1,)).args == (1, 2) and add.args == (2,)
    frozen = signature("tasks.add", (2, 2), immutable=True)
    assert frozen.clone((9,)).args == (2, 2)
    assert add.clone(queue="q").options == {"queue": "q"} and add.options == {}
    assert add.set(priority=3).options == {"priority": 3}
    err = signature("tasks.err")
    add.link_error(err)
    copy = add.clone()
    copy.link_error(signature("tasks.other"))
    assert len(add.options["link_error"]) == 1          # a clone's lists are its own


def test_pipes_make_chains_and_a_group_then_a_task_is_a_chord():
    a, b, c = (signature(f"tasks.{n}") for n in "abc")
    flat = a | (b | c)
    assert isinstance(flat, chain) and [t.name for t in flat.tasks] == ["tasks.a", "tasks.b",
                                                                         "tasks.c"]
    assert isinstance(group(a, b) | c, chord)
    assert [t.name for t in chain(a, chain(b, c)).tasks] == ["tasks.a", "tasks.b", "tasks.c"]


def test_a_chain_sends_its_first_step_with_the_rest_reversed_in_the_embed():
    app = FakeApp()
    a, b, c = (signature(f"tasks.{n}", (1,), app=app) for n in "abc")
    result = chain(a, b, c).apply_async((5,))
    assert len(app.sent) == 1
    headers, (args, kwargs, embed) = app.sent[0]
    assert headers["task"] == "tasks.a" and args == [5, 1]
    assert [s["task"] for s in embed["chain"]] == ["tasks.c", "tasks.b"]
    assert embed["chain"][0]["options"]["task_id"] == result.id
    assert result.parent.id == embed["chain"][1]["options"]["task_id"]
    assert result.parent.parent.id == headers["id"] == headers["root_id"]
    assert embed["chain"][1]["options"]["root_id"] == headers["id"]


def test_link_and_link_error_go_in_callbacks_and_errbacks():
    app = FakeApp()
    signature("tasks.a", app=app).apply_async(link=signature("tasks.ok"),
                                              link_error=[signature("tasks.e1")])
    _, (_, _, embed) = app.sent[0]
    assert [s["task"] for s in embed["callbacks"]] == ["tasks.ok"]
    assert [s["task"] for s in embed["errbacks"]] == ["tasks.e1"]
    assert embed["chain"] is None and embed["chord"] is None
    with pytest.raises(TypeError, match="link must be a signature"):
        SendOptions(link=[{"no": "task"}])


def test_a_chord_sends_header_parts_with_group_index_and_the_body():
    app = FakeApp()
    body = signature("tasks.tsum", app=app)
    result = chord([signature("tasks.add", (i, i), app=app) for i in range(3)], body)()
    assert len(app.sent) == 3
    group_ids = {h["group"] for h, _ in app.sent}
    assert len(group_ids) == 1 and result.parent.id in group_ids
    assert [h["group_index"] for h, _ in app.sent] == [0, 1, 2]
    wire = app.sent[0][1][2]["chord"]
    assert wire["task"] == "tasks.tsum" and wire["chord_size"] == 3
    assert wire["options"]["task_id"] == result.id


def test_a_chord_without_a_store_is_refused_when_sent():
    app = FakeApp("rpc://")
    with pytest.raises(TaskdError, match="a chord needs a result store.*redis://"):
        chord([signature("tasks.a", app=app)], signature("tasks.b", app=app))()
    assert app.sent == []
    with pytest.raises(TaskdError, match="GroupResult.save.*needs a result store"):
        GroupResult("g", [], app=app).save()


def test_a_group_inside_a_chain_is_refused_when_sent():
    app = FakeApp()
    a = signature("tasks.a", app=app)
    with pytest.raises(TaskdError, match="group or chord inside a chain"):
        chain(a, group(a, a), a)()
    assert app.sent == []


# == the worker's part ===========================================================================

class StubChannel:
    is_open, frame_max = True, 0

    def __init__(self):
        self.published = []

    def publish(self, exchange, routing_key, body, properties, on_confirm, mandatory=False):
        self.published.append((routing_key, properties, body, on_confirm))


class StubCopies:
    def publish(self, channel, exchange, routing_key, body, properties, on_confirm):
        channel.publish(exchange, routing_key, body, properties, on_confirm, mandatory=True)


def _job(embed, name="tasks.a", group_id=None):
    body = serialization.json_dumps([[1], {}, embed])
    headers = {"task": name, "id": "t-1", "root_id": "r-0", "group": group_id}
    return types.SimpleNamespace(request=protocol.decode_task(headers, body,
                                                              "application/json"),
                                 describe=lambda: name)


def _outcome(status, result):
    meta = protocol.result_meta("t-1", status, result)
    return serialization.json_dumps(meta)


async def _turns(n=5):
    for _ in range(n):
        await asyncio.sleep(0)


def _run(coro_fn):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro_fn(loop))
    finally:
        loop.close()


def test_next_steps_are_confirmed_before_the_task_settles():
    step = {"task": "tasks.b", "args": [10], "kwargs": {},
            "options": {"task_id": "t-2", "expires": 60, "priority": 200},
            "subtask_type": None, "immutable": False}
    link = dict(step, task="tasks.cb", options={})

    async def scenario(loop):
        channel, events = StubChannel(), []
        parts = Workflows(loop, CONFIG, StubCopies(), lambda: channel, None,
                          collections.Counter())
        job = _job({"chain": [step], "callbacks": [link]})
        assert parts.follow(job, protocol.SUCCESS, _outcome(protocol.SUCCESS, 4),
                            "application/json", "utf-8", lambda: events.append("settled"),
                            lambda j: events.append("fault"))
        await _turns()
        assert len(channel.published) == 2 and events == []   # nothing settled yet
        channel.published[0][3](True)
        await _turns()
        assert events == []
        channel.published[1][3](True)
        await _turns()
        assert events == ["settled"]
        (_, props, body, _), = [p for p in channel.published if p[0] == "celery"
                                and p[1].headers["task"] == "tasks.b"]
        args, _, embed = serialization.json_loads(body)
        assert args == [4, 10] and embed["chain"] is None
        assert (props.headers["id"], props.headers["parent_id"], props.headers["root_id"]) \
            == ("t-2", "t-1", "r-0")
        assert props.headers["expires"] and props.priority is None   # 200: not taskd's
    _run(scenario)


def test_a_step_not_confirmed_hands_the_task_to_fault_and_errbacks_get_the_failed_id():
    errback = {"task": "tasks.err", "args": ["x"], "kwargs": {}, "options": {},
               "subtask_type": None, "immutable": False}

    async def scenario(loop):
        channel, events = StubChannel(), []
        parts = Workflows(loop, CONFIG, StubCopies(), lambda: channel, None,
                          collections.Counter())
        job = _job({"errbacks": [errback], "chain": [dict(errback, task="tasks.never")]})
        parts.follow(job, protocol.FAILURE, _outcome(protocol.FAILURE, {"exc_type": "E"}),
                     "application/json", "utf-8", lambda: events.append("settled"),
                     lambda j: events.append("fault"))
        await _turns()
        (_, props, body, confirm), = channel.published        # no chain step on failure
        assert props.headers["task"] == "tasks.err"
        assert serialization.json_loads(body)[0] == ["t-1", "x"]
        confirm(False)                                         # returned: no queue took it
        await _turns()
        assert events == ["fault"]
    _run(scenario)


def test_a_revoked_step_runs_neither_its_callbacks_nor_its_errbacks():
    step = {"task": "tasks.b", "args": [], "kwargs": {}, "options": {},
            "subtask_type": None, "immutable": False}

    async def scenario(loop):
        channel, events = StubChannel(), []
        parts = Workflows(loop, CONFIG, StubCopies(), lambda: channel, None,
                          collections.Counter())
        job = _job({"errbacks": [dict(step, task="tasks.err")], "chain": [step],
                    "callbacks": [dict(step, task="tasks.cb")]})
        assert parts.follow(job, protocol.FAILURE, _outcome(protocol.REVOKED, {}),
                            "application/json", "utf-8", lambda: events.append("settled"),
                            lambda j: events.append("fault"), revoked=True)
        await _turns()
        assert channel.published == [] and events == ["settled"]
    _run(scenario)


def test_a_chord_part_is_refused_by_a_worker_without_a_redis_store():
    body = {"task": "tasks.sum", "args": [], "kwargs": {}, "options": {},
            "subtask_type": None, "immutable": False}
    parts = Workflows(None, CONFIG, StubCopies(), lambda: None, None, collections.Counter())
    with pytest.raises(InvalidTaskMessage, match="chord, which needs result_backend redis:// or postgresql"):
        parts.check(_job({"chord": body}, group_id="g").request)
    parts.check(_job({"chain": [body]}).request)          # a chain needs no store
    assert not parts.follow(_job(None), protocol.SUCCESS, b"", "", "", None, None)


class StubJoin:
    """The chord join: counts what it is given; ``claim`` says whether this part completes."""

    def __init__(self, claim, parts):
        self.claim, self._parts, self.counted, self.done = claim, parts, [], []

    async def count(self, group_id, task_id, index, state, result, size):
        self.counted.append((group_id, task_id, index, state, result, size))
        return len(self._parts), size, self.claim

    async def parts(self, group_id):
        return self._parts

    async def published(self, group_id):
        self.done.append(group_id)


class StubStore:
    url = "redis://stub"

    def __init__(self):
        self.written = []

    async def write_many(self, items):
        self.written.extend(items)


def _chord_part(join, status, result, body):
    async def scenario(loop):
        channel, events, store = StubChannel(), [], StubStore()
        parts = Workflows(loop, CONFIG, StubCopies(), lambda: channel, None,
                          collections.Counter())
        parts.join, parts.backend = join, store
        job = _job({"chord": body}, group_id="g-1")
        parts.follow(job, status, _outcome(status, result), "application/json", "utf-8",
                     lambda: events.append("settled"), lambda j: events.append("fault"))
        for _ in range(10):
            await _turns()
            for published in channel.published:
                if published[3] is not None:
                    published[3](True)
                    channel.published[channel.published.index(published)] = \
                        published[:3] + (None,)
        return channel.published, events, store.written
    return _run(scenario)


def test_the_part_that_completes_a_chord_publishes_its_body_with_the_results_in_order():
    body = {"task": "tasks.tsum", "args": [], "kwargs": {}, "chord_size": 2,
            "options": {"task_id": "body-1"}, "subtask_type": None, "immutable": False}
    join = StubJoin(True, [["t-0", "SUCCESS", 1], ["t-1", "SUCCESS", 2]])
    published, events, written = _chord_part(join, protocol.SUCCESS, 2, body)
    assert join.counted == [("g-1", "t-1", None, "SUCCESS", 2, 2)] and join.done == ["g-1"]
    (_, props, raw, _), = published
    assert props.headers["id"] == "body-1" and props.headers["group"] is None
    assert serialization.json_loads(raw)[0] == [[1, 2]]
    assert events == ["settled"] and written == []
    # A part that does not complete it publishes nothing and settles:
    join = StubJoin(False, [])
    published, events, _ = _chord_part(join, protocol.SUCCESS, 2, body)
    assert published == [] and events == ["settled"] and join.done == []


def test_a_failed_header_fails_the_body_with_chord_error_and_calls_its_errback():
    errback = {"task": "tasks.err", "args": [], "kwargs": {}, "options": {},
               "subtask_type": None, "immutable": False}
    body = {"task": "tasks.tsum", "args": [], "kwargs": {}, "chord_size": 2,
            "options": {"task_id": "body-1", "link_error": [errback]},
            "subtask_type": None, "immutable": False}
    failure = {"exc_type": "ValueError", "exc_message": ["bad"], "exc_module": "builtins"}
    join = StubJoin(True, [["t-0", "FAILURE", failure], ["t-1", "SUCCESS", 2]])
    published, events, written = _chord_part(join, protocol.SUCCESS, 2, body)
    (body_id, meta), = written
    meta = serialization.json_loads(meta)
    assert body_id == "body-1" and meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "ChordError"
    assert "Dependency t-0 raised ValueError('bad')" in meta["result"]["exc_message"][0]
    (_, props, raw, _), = published
    assert props.headers["task"] == "tasks.err" and serialization.json_loads(raw)[0] == ["body-1"]
    assert events == ["settled"] and join.done == ["g-1"]


def test_a_refused_body_is_read_only_in_an_accepted_content_type():
    """refused() reads the chain's end from the raw body - never in a content type the
    worker does not accept (a pickle it refused stays unread)."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    async def scenario(loop):
        store = StubStore()
        parts = Workflows(loop, CONFIG, StubCopies(), lambda: None, None,
                          collections.Counter())
        parts.backend = store
        end = {"task": "b", "options": {"task_id": "end-1"}}
        for body, ctype, expect in [
                (pickle.dumps([[], {}, {"chain": [end]}, Boom()]), "application/x-python-serialize",
                 []),
                (serialization.json_dumps([[], {}, {"chain": [end]}]), "application/json",
                 ["end-1"])]:
            job = types.SimpleNamespace(body=body, describe=lambda: "a[x]",
                                        properties=types.SimpleNamespace(
                                            content_type=ctype, content_encoding="utf-8"))
            parts.refused(job, "InvalidTaskMessage: refused")
            await _turns()
            assert [i for i, _ in store.written] == expect
            store.written.clear()
    _run(scenario)


def test_link_and_task_id_of_a_chain_go_to_its_last_step_and_chord_header_then_body():
    app = FakeApp()
    a, b = signature("tasks.a", app=app), signature("tasks.b", app=app)
    result = chain(a, b).apply_async(task_id="last-1", link=signature("tasks.ok"))
    headers, (_, _, embed) = app.sent[0]
    assert result.id == "last-1" and embed["callbacks"] is None
    (last,) = embed["chain"]
    assert last["options"]["task_id"] == "last-1"
    assert [s["task"] for s in last["options"]["link"]] == ["tasks.ok"]
    app.sent.clear()
    body = chord([a, b])(signature("tasks.sum", app=app))      # Celery's chord(header)(body)
    assert len(app.sent) == 2 and app.sent[0][1][2]["chord"]["options"]["task_id"] == body.id
    with pytest.raises(TaskdError, match="a chord without a body"):
        chord([a]).apply_async()
