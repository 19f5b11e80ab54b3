"""The worker's ResultStore part against a stub store (no Redis, no PostgreSQL): acked
only after the write, batched, kept through an outage and written again with back-off,
new work held while the buffer is full; and what Outcomes sends it."""
import asyncio
import collections
import json
import types

import pika
import pytest

from taskd import config as config_mod, protocol, serialization, stores
from taskd.worker import store as store_mod
from taskd.worker.outcomes import Outcomes
from taskd.worker.store import ResultStore


class StubBackend:
    """An async store: each write_many call waits for the test to answer it."""
    url = "redis://:secret@stub:6379/0"

    def __init__(self):
        self.calls, self.fail_next, self.pruned = [], 0, 0

    async def write_many(self, items):
        self.calls.append(list(items))
        await asyncio.sleep(0)
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("store away")

    async def prune(self):
        self.pruned += 1
        return 3


def job(task_id="t1", ignore=False, queue="q"):
    request = types.SimpleNamespace(id=task_id, name="tasks.add", args=(1, 2), kwargs={},
                                    retries=0, ignore_result=ignore)
    return types.SimpleNamespace(task_id=task_id, request=request, queue=queue,
                                 describe=lambda: task_id)


def body(task_id, status=protocol.SUCCESS, value=3, serializer="json"):
    _, data, ctype, enc = protocol.encode_result(task_id, status, value, serializer=serializer)
    return data, pika.BasicProperties(content_type=ctype, content_encoding=enc)


def make(loop, backend, **kw):
    done = []
    part = ResultStore(loop, backend, done.append, collections.Counter(),
                       buffer_limit=kw.pop("buffer_limit", 10**6), **kw)
    return part, done


async def settle(loop, seconds=0.0):
    await asyncio.sleep(seconds)
    for _ in range(10):
        await asyncio.sleep(0)


def test_acked_only_after_the_write_and_batched():
    async def main():
        loop = asyncio.get_running_loop()
        backend = StubBackend()
        part, done = make(loop, backend)
        a, b, c = job("a"), job("b"), job("c")
        part.publish_result(a, *body("a"))
        await asyncio.sleep(0)
        assert done == [] and part.writing        # the write is under way, nothing acked
        part.publish_result(b, *body("b"))        # these two wait for the next batch
        part.publish_result(c, *body("c"))
        await settle(loop)
        assert done == [a, b, c]
        assert [[i for i, _ in call] for call in backend.calls] == [["a"], ["b", "c"]]
        assert json.loads(backend.calls[0][0][1])["result"] == 3
        assert part.counters["results_stored"] == 3 and not part.waiting and part.bytes == 0
    asyncio.run(main())


def test_outage_keeps_results_and_writes_them_with_back_off(monkeypatch, caplog):
    monkeypatch.setattr(store_mod, "BACKOFF", (0.01, 0.02))
    async def main():
        loop = asyncio.get_running_loop()
        backend = StubBackend()
        backend.fail_next = 3
        part, done = make(loop, backend)
        part.pause = 0.01
        a = job("a")
        part.publish_result(a, *body("a"))
        await settle(loop)
        assert done == [] and part.down_since is not None
        status = part.status()
        assert status["ok"] is False and status["waiting"] == 1 and "store away" in status["error"]
        assert ":secret@" not in status["url"]                       # the password is hidden
        part.publish_result(job("b"), *body("b"))                     # waits behind it
        await settle(loop, 0.2)
        assert [j.task_id for j in done] == ["a", "b"] and part.down_since is None
        assert len(backend.calls) == 4 and part.counters["result_store_errors"] == 3
        assert backend.calls[-1] == [(i, b) for i, b in backend.calls[-1]]
    with caplog.at_level("WARNING", logger="taskd.supervisor"):
        asyncio.run(main())
    assert "failed: ConnectionError: store away" in caplog.text
    assert "answers again" in caplog.text


def test_full_buffer_closes_the_gate_until_written(monkeypatch):
    monkeypatch.setattr(store_mod, "BACKOFF", (0.01, 0.01))
    async def main():
        loop = asyncio.get_running_loop()
        backend = StubBackend()
        backend.fail_next = 1
        woken = []
        data, props = body("a")
        part, done = make(loop, backend, buffer_limit=len(data) + 1, wake=lambda: woken.append(1))
        part.publish_result(job("a"), data, props)
        assert part.accepting()
        part.publish_result(job("b"), *body("b"))
        assert not part.accepting() and not part.status()["accepting"]
        await settle(loop, 0.1)
        assert part.accepting() and woken == [1] and len(done) == 2
    asyncio.run(main())


def test_ignored_results_and_retry_states():
    async def main():
        loop = asyncio.get_running_loop()
        backend = StubBackend()
        part, done = make(loop, backend)
        assert part.reply_to(job(ignore=True)) is None and part.reply_to(job()) == "store"
        undecoded = types.SimpleNamespace(request=None, task_id="?")     # no id to key on
        assert part.reply_to(undecoded) is None
        r = job("r")
        part.note(r, *body("r", protocol.RETRY, ValueError("again")))
        await settle(loop)
        assert done == [] and json.loads(backend.calls[0][0][1])["status"] == "RETRY"
    asyncio.run(main())


def test_other_serializers_stored_as_json_and_extended_fields():
    pytest.importorskip("msgpack")
    async def main():
        loop = asyncio.get_running_loop()
        backend = StubBackend()
        part, _ = make(loop, backend, extended=True)
        part.publish_result(job("m", queue="video"), *body("m", value=[1, 2],
                                                           serializer="msgpack"))
        await settle(loop)
        meta = json.loads(backend.calls[0][0][1])
        assert meta["result"] == [1, 2] and meta["status"] == "SUCCESS"
        assert (meta["name"], meta["args"], meta["queue"]) == ("tasks.add", [1, 2], "video")
        assert meta["worker"].startswith("taskd@")
    asyncio.run(main())


def test_a_result_json_cannot_hold_is_stored_as_failure():
    async def main():
        loop = asyncio.get_running_loop()
        backend = StubBackend()
        part, done = make(loop, backend)
        props = pika.BasicProperties(content_type="application/x-yaml", content_encoding="utf-8")
        part.publish_result(job("y"), b"!!python/object:x {}", props)
        await settle(loop)
        meta = json.loads(backend.calls[0][0][1])
        assert meta["status"] == "FAILURE" and "not storable" in str(meta["result"])
        assert len(done) == 1                     # still ends (acked), as a FAILURE
    asyncio.run(main())


def test_prune_runs_on_its_timer():
    async def main():
        loop = asyncio.get_running_loop()
        backend = StubBackend()
        part, _ = make(loop, backend, prune_every=0.02)
        part.start()
        await settle(loop, 0.1)
        part.stop()
        assert backend.pruned >= 2 and part.counters["results_expired"] == 3 * backend.pruned
    asyncio.run(main())


def test_outcomes_send_results_to_the_store():
    class Rec:
        def __init__(self):
            self.calls = []

        def reply_to(self, job):
            return "store"

        def publish_result(self, job, data, props, attempt=1):
            self.calls.append(("final", job.task_id, json.loads(data)["status"]))

        def note(self, job, data, props):
            self.calls.append(("note", job.task_id, json.loads(data)["status"]))

    rec = Rec()
    replies = types.SimpleNamespace(publisher=None, reply_to=lambda job: None)
    duplicates = types.SimpleNamespace(done=lambda job, reply: [])
    outcomes = Outcomes(None, None, replies, None, duplicates, collections.Counter(),
                        config_mod.loads("{}"), rec)
    j = job("x")
    j.timer = None
    j.request.correlation_id = "x"
    j.properties = pika.BasicProperties(correlation_id="x")
    _, data, ctype, enc = protocol.encode_result("x", protocol.FAILURE, ValueError("v"))
    outcomes.ran(j, types.SimpleNamespace(status=protocol.FAILURE, runtime=0.1, body=data,
                                         content_type=ctype, content_encoding=enc,
                                         error="ValueError: v", retry=None))
    outcomes.fail(j, ValueError("expired"), protocol.REVOKED)
    assert rec.calls == [("final", "x", "FAILURE"), ("final", "x", "REVOKED")]


def test_backend_urls_and_missing_extras(monkeypatch):
    assert [stores.kind(u) for u in ("rpc://", "redis://h:1/0", "postgresql://u@h/d")] == [
        "rpc", "redis", "postgres"]
    with pytest.raises(ValueError, match="unknown result backend mongodb://"):
        stores.kind("mongodb://x")
    assert "pw" not in stores.redact("redis://:pw@h:1/0")
    assert "s/cr" not in stores.redact("postgresql://u:s/cr@h/d")     # unencoded /
    from taskd.exceptions import ConfigError
    with pytest.raises(ConfigError) as err:
        config_mod.validate({"result_backend": "mongo://u:hunter2@h/d"}, environ={})
    assert "hunter2" not in str(err.value)
    import builtins
    real = builtins.__import__

    def no_redis(name, *a, **kw):
        if name == "redis":
            raise ImportError(name)
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_redis)
    monkeypatch.setattr("importlib.import_module", lambda name: no_redis(name))
    from taskd.exceptions import ConfigError
    with pytest.raises(ConfigError, match=r"install taskd-queue\[redis\]"):
        stores.require("redis://127.0.0.1:6379/0")


def test_settings_and_environment_override():
    from taskd.exceptions import ConfigError
    cfg = config_mod.validate({"result_backend": "redis://h:6379/1", "result_expires": 0},
                              environ={})
    assert cfg["result_backend"] == "redis://h:6379/1" and cfg["result_expires"] == 0
    assert cfg["track_started"] is False and cfg["worker.result_buffer"] == 64 * 1024**2
    env = config_mod.validate({}, environ={"TASKD_RESULT_BACKEND": "postgresql://u@h/d"})
    assert env["result_backend"] == "postgresql://u@h/d"
    with pytest.raises(ConfigError, match="result_backend"):
        config_mod.validate({"result_backend": "mongodb://x"}, environ={})
    with pytest.raises(ConfigError, match="result_expires"):
        config_mod.validate({"result_expires": -1}, environ={})
    with pytest.raises(ConfigError, match="App"):
        from taskd import App
        App(backend="sqs://nope", set_as_current=False)


def test_postgres_url_takes_its_table():
    pytest.importorskip("psycopg")
    from taskd.stores.postgres import split_url
    assert split_url("postgresql://u@h/d?table=s.results&sslmode=disable") == (
        "postgresql://u@h/d?sslmode=disable", ["s", "results"])
    assert split_url("postgres://u@h/d")[1] == [stores.DEFAULT_TABLE]
    with pytest.raises(ValueError, match="table="):
        split_url("postgresql://u@h/d?table=a.b.c")
    assert serialization.json_loads(stores.encode({"status": "SUCCESS"})) == {"status": "SUCCESS"}


def test_the_dispatcher_starts_nothing_while_the_store_gate_is_closed():
    from test_worker_parts import deliver, parts

    async def main():
        p = parts(asyncio.get_running_loop())
        open_ = [False]
        p.dispatcher.gate = lambda: open_[0]
        deliver(p, 1, protocol.encode_task("id-1", "t.add", [2, 2], {}))
        assert p.pool.sent == [] and len(p.dispatcher.ready) == 1       # waits, not dropped
        open_[0] = True
        p.dispatcher.dispatch()
        assert [j.request.name for j in p.pool.sent] == ["t.add"]
    asyncio.run(main())


def test_a_reload_keeps_the_store_and_applies_its_limits(caplog):
    async def main():
        loop = asyncio.get_running_loop()
        backend = StubBackend()
        backend.expires = 60
        part, _ = make(loop, backend)
        url = "redis://stub:6379/0"
        new = config_mod.validate({"result_backend": url, "result_expires": 5,
                                   "result_extended": True, "track_started": True,
                                   "worker": {"result_buffer": "1KiB"}}, environ={})
        store_mod.reconfigure(part, url, new)
        assert (part.buffer_limit, part.extended, backend.expires) == (1024, True, 5)
        assert stores.worker_tracks_started()
        other = config_mod.validate({"result_backend": "redis://elsewhere:6379/0"}, environ={})
        with caplog.at_level("WARNING", logger="taskd.supervisor"):
            store_mod.reconfigure(part, url, other)
        assert "only with a restart" in caplog.text and part.buffer_limit == 1024
        stores.set_worker_store("rpc://", 0, False)
    asyncio.run(main())
