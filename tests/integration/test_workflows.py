"""Workflows end to end: a real taskd worker with the real Redis store runs chains,
groups, chords, link and link_error; Celery's canvas runs on it, and taskd's on Celery's
worker."""
import os
import subprocess
import sys
import time
import uuid

import pytest

from conftest import BROKER_URL, PYTHONPATH, ROOT, Broker, Topology, Worker, wait_for

REDIS_URL = os.environ.get("TASKD_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """A worker with the Redis store; the client app and its tasks (by name)."""
    topo = Topology(tmp_path_factory.mktemp("flow"), Broker())
    path = topo.config({"result_backend": REDIS_URL, "result_expires": 600,
                        "imports": ["flowtasks"]})
    worker = Worker(path).ready()
    from taskd import App, signature
    app = App("flow", config=str(path), set_as_current=False)

    class Tasks:
        pass
    tasks = Tasks()
    for name in ("add", "tsum", "fail", "ids", "on_error", "step"):
        setattr(tasks, name, _Named(f"flowtasks.{name}", app, signature))
    yield topo, app, tasks, worker
    app.close()
    worker.stop()
    topo.cleanup()


class _Named:
    """``t.s(...)`` / ``t.si(...)`` for a task known only by name (the worker has it)."""

    def __init__(self, name, app, signature):
        self.name, self.app, self._sig = name, app, signature

    def s(self, *args, **kwargs):
        return self._sig(self.name, args, kwargs, app=self.app)

    def si(self, *args, **kwargs):
        return self._sig(self.name, args, kwargs, app=self.app, immutable=True)


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_chain_passes_each_result_on_with_parent_and_root_ids(flow):
    from taskd import chain
    _, app, t, _ = flow
    assert chain(t.add.s(2, 2), t.add.s(4))().get(timeout=20) == 8
    result = (t.add.s(1, 1) | t.ids.s()).apply_async()
    me, parent, root = result.get(timeout=20)
    first = result.parent
    assert first.get(timeout=5) == 2
    assert (me, parent, root) == (result.id, first.id, first.id)


def test_nested_chains_flatten_and_partial_args_go_first(flow):
    from taskd import chain
    _, _, t, _ = flow
    inner = chain(t.add.s(10), t.add.s(100))
    workflow = chain(t.add.s(1, 1), inner, t.add.s(1000) | t.add.si(5, 5))
    assert len(workflow.tasks) == 5
    assert workflow().get(timeout=20) == 10
    assert chain(t.add.s(3), t.add.s(4)).apply_async((1,)).get(timeout=20) == 8


def test_a_step_that_retries_keeps_the_rest_of_its_chain_and_its_chord(flow, tmp_path):
    from taskd import chain, chord, signature
    _, app, t, _ = flow
    retry = signature("flowtasks.retry_once", app=app)
    result = chain(t.add.s(1, 1), retry.clone((str(tmp_path / "a"),)), t.add.s(10))()
    assert result.get(timeout=20) == 13
    body = chord([t.add.s(1, 1), retry.clone((5, str(tmp_path / "b")))], t.tsum.s())()
    assert body.get(timeout=20) == 8
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()     # both retried


def test_group_result_in_order_saved_and_restored(flow):
    from taskd import GroupResult, group
    _, app, t, _ = flow
    result = group(t.add.s(i, i) for i in range(6))()
    assert result.get(timeout=20) == [0, 2, 4, 6, 8, 10]
    assert result.ready() and result.successful() and result.completed_count() == 6
    result.save()
    again = GroupResult.restore(result.id, app=app)
    assert [r.id for r in again.results] == [r.id for r in result.results]
    assert again.get(timeout=5) == [0, 2, 4, 6, 8, 10]
    assert GroupResult.restore(str(uuid.uuid4()), app=app) is None
    mixed = group(t.add.s(1, 1), t.fail.s("x"))()
    assert mixed.get(timeout=20, propagate=False)[0] == 2
    assert mixed.failed() and not mixed.successful() and mixed.completed_count() == 1


def test_chord_calls_its_body_once_with_the_header_results_in_order(flow, tmp_path):
    from taskd import chord, group
    _, _, t, _ = flow
    out = tmp_path / "body.txt"
    result = chord([t.add.s(i, i) for i in range(10)], t.tsum.s(str(out)))()
    assert result.get(timeout=30) == 90
    assert result.parent.get(timeout=5) == [2 * i for i in range(10)]
    assert lines(out) == [f"sum {[2 * i for i in range(10)]}"]
    # group | task is a chord, and a chord's body may be a chain:
    assert (group(t.add.s(1, 1), t.add.s(2, 2)) | t.tsum.s() | t.add.s(100))().get(
        timeout=30) == 106


def test_chord_header_failure_fails_the_body_and_calls_its_errback_once(flow, tmp_path):
    from taskd import chord
    from taskd.exceptions import ChordError
    _, app, t, _ = flow
    out, body_ran = tmp_path / "errors.txt", tmp_path / "body.txt"
    body = t.tsum.s(str(body_ran))
    body.link_error(t.on_error.s(str(out)))
    result = chord([t.add.s(1, 1), t.fail.s("header"), t.add.s(2, 2)], body)()
    with pytest.raises(ChordError, match="Dependency .* raised ValueError"):
        result.get(timeout=30)
    wait_for(lambda: lines(out), 20, message="the body's errback")
    assert lines(out) == [f"error {result.id}"]
    assert not body_ran.exists()
    assert app.AsyncResult(result.id).state == "FAILURE"


def test_a_header_task_killed_by_its_time_limit_fails_the_chord_once(flow, tmp_path):
    from taskd import chord
    from taskd.exceptions import ChordError
    _, app, t, _ = flow
    out = tmp_path / "errors.txt"
    slow = t.step.s(0, str(tmp_path / "steps.txt"), "slow", 30).set(time_limit=1)
    body = t.tsum.s()
    body.link_error(t.on_error.s(str(out)))
    result = chord([t.add.s(1, 1), slow], body)()
    with pytest.raises(ChordError, match="TimeLimitExceeded"):
        result.get(timeout=30)
    wait_for(lambda: lines(out), 20, message="the body's errback")
    assert lines(out) == [f"error {result.id}"]


def test_link_and_link_error(flow, tmp_path):
    _, app, t, _ = flow
    out = tmp_path / "errors.txt"
    ok = t.add.s(2, 2).apply_async(link=t.add.s(10))
    assert ok.get(timeout=20) == 4
    bad = t.fail.s("once").apply_async(link_error=t.on_error.s(str(out)), link=t.add.s(1))
    with pytest.raises(ValueError):
        bad.get(timeout=20)
    wait_for(lambda: lines(out), 20, message="the errback")
    assert lines(out) == [f"error {bad.id}"]


def test_a_chain_stops_at_its_first_failure_and_runs_its_errback_once(flow, tmp_path):
    from taskd import chain
    _, app, t, _ = flow
    out, steps = tmp_path / "errors.txt", tmp_path / "steps.txt"
    result = chain(t.step.s(0, str(steps), "a"), t.fail.s(), t.step.s(str(steps), "c")
                   ).apply_async(link_error=t.on_error.s(str(out)))
    failed = result.parent
    with pytest.raises(ValueError):
        failed.get(timeout=20)
    wait_for(lambda: lines(out), 20, message="the errback")
    assert lines(out) == [f"error {failed.id}"]
    assert lines(steps) == ["done a"] and result.state == "PENDING"


def test_a_redelivered_header_task_counts_once(flow, tmp_path):
    """Header parts sent again with their ids (a redelivery after a crash, as the
    worker sees it): the chord's count is of distinct ids; the body runs once."""
    from taskd import chord
    _, app, t, _ = flow
    out = tmp_path / "body.txt"
    result = chord([t.add.s(i, 1) for i in range(3)], t.tsum.s(str(out)))()
    assert result.get(timeout=30) == 6
    parts = result.parent.results
    wire = result.parent  # the same chord, its parts again, after it completed
    body = t.tsum.s(str(out)).clone()
    body.freeze(result.id)
    body_wire = dict(body.as_dict(), chord_size=3)
    again = [app.send_task("flowtasks.add", (i, 1), task_id=r.id, group_id=wire.id,
                           group_index=i, chord=body_wire) for i, r in enumerate(parts)]
    assert [r.get(timeout=20) for r in again] == [1, 2, 3]
    import redis
    client = redis.Redis.from_url(REDIS_URL)
    # A body a part published again would be queued before that part's result was
    # stored; give it the time to run before looking:
    time.sleep(0.5)
    assert lines(out) == ["sum [1, 2, 3]"]          # the body ran once
    assert client.scard(f"taskd-chord-{wire.id}.m") == 3


def test_a_header_part_counted_twice_does_not_complete_a_chord_early(flow, tmp_path):
    """Two of three parts, the first sent twice (its worker crashed after counting): the
    count stays at two, so the body is not sent; the third part completes it."""
    _, app, t, _ = flow
    out = tmp_path / "body.txt"
    body = t.tsum.s(str(out)).clone()
    result = body.freeze()
    wire = dict(body.as_dict(), chord_size=3)
    group_id, ids = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(3)]

    def part(i):
        return app.send_task("flowtasks.add", (i, 10), task_id=ids[i], group_id=group_id,
                             group_index=i, chord=wire)
    assert [part(0).get(timeout=20), part(0).get(timeout=20), part(1).get(timeout=20)] == \
        [10, 10, 11]
    assert result.state == "PENDING" and not out.exists()
    part(2)
    assert result.get(timeout=20) == 33
    assert lines(out) == ["sum [10, 11, 12]"]


def test_a_refused_workflow_fails_its_first_and_its_last_handle(flow, tmp_path):
    """A chain whose middle is a group (which a taskd worker does not run) is refused
    whole: no step runs, and both the first task and the chain's end read FAILURE."""
    from taskd.exceptions import InvalidTaskMessage
    topo, app, t, _ = flow
    out = tmp_path / "steps.txt"
    last = t.step.s(str(out), "c").clone()
    end = last.freeze()
    nested = {"task": "celery.group", "args": [], "kwargs": {"tasks": []}, "options": {},
              "subtask_type": "group", "immutable": False}
    first = app.send_task("flowtasks.step", (0, str(out), "a"),
                          chain=[last.as_dict(), nested])
    with pytest.raises(InvalidTaskMessage, match="'group' signature"):
        first.get(timeout=20)
    with pytest.raises(InvalidTaskMessage, match="workflow of task .* was refused"):
        end.get(timeout=20)
    assert not out.exists()


def test_celery_client_canvas_runs_on_a_taskd_worker(flow):
    _, _, _, _ = flow
    topo = flow[0]
    queue = topo.name("celery")
    code = f"""
from celery import Celery, chain, chord
app = Celery(broker={BROKER_URL!r}, backend={REDIS_URL!r})
add = app.signature('flowtasks.add', queue={queue!r})
tsum = app.signature('flowtasks.tsum', queue={queue!r})
print('chain', chain(add.clone((2, 2)), add.clone((4,))).apply_async().get(timeout=20))
print('chord', chord([add.clone((i, i)) for i in range(5)], tsum.clone()).apply_async().get(timeout=30))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=90, env=dict(os.environ, PYTHONPATH=PYTHONPATH))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[:2] == ["chain 8", "chord 20"], run.stdout


def test_taskd_client_chain_runs_on_a_celery_worker():
    queue = f"celery-flow-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, CELERY_TEST_BROKER=BROKER_URL,
               CELERY_TEST_BACKEND=REDIS_URL)
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celerytasks", "worker", "--pool=solo",
         "-Q", queue, "-n", f"{queue}@%h", "--without-mingle", "--without-gossip",
         "--without-heartbeat", "-l", "warning"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    from taskd import App, chain, chord, signature
    app = App("tests", broker=BROKER_URL, backend=REDIS_URL, set_as_current=False)
    try:
        mul = signature("celerytasks.mul", app=app, queue=queue)
        result = chain(mul.clone((2, 3)), mul.clone((4,)), mul.clone((5,)))()
        assert result.get(timeout=40) == 120
        assert result.parent.get(timeout=5) == 24
        # A taskd chord finished by Celery's worker (Celery's chord size key is set):
        body = chord([mul.clone((i, 1)) for i in range(4)],
                     signature("celerytasks.mul", (1,), app=app, queue=queue))()
        assert body.get(timeout=40) == [0, 1, 2, 3]
    finally:
        proc.kill()
        proc.wait()
        app.close()
        Broker().delete([queue])


def test_chords_with_the_postgresql_store(tmp_path_factory, tmp_path):
    """The same join in PostgreSQL: a chord's body once, in order; a part sent twice
    counts once; a header failure fails the body with ChordError and calls its errback
    once; its rows are gone once the body is published."""
    import psycopg

    from taskd import App, chord, signature
    from taskd.exceptions import ChordError
    pg = os.environ.get("TASKD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1/test")
    table = f"taskd_flow_{uuid.uuid4().hex[:10]}"
    topo = Topology(tmp_path_factory.mktemp("pgflow"), Broker())
    path = topo.config({"result_backend": f"{pg}?table={table}", "result_expires": 600,
                        "imports": ["flowtasks"]})
    worker = Worker(path).ready()
    app = App("pgflow", config=str(path), set_as_current=False)
    try:
        def sig(name, *args):
            return signature(f"flowtasks.{name}", args, app=app)
        out = tmp_path / "body.txt"
        result = chord([sig("add", i, i) for i in range(6)], sig("tsum", str(out)))()
        assert result.get(timeout=30) == 30
        assert lines(out) == ["sum [0, 2, 4, 6, 8, 10]"]

        body = sig("tsum", str(tmp_path / "early.txt")).clone()
        early = body.freeze()
        wire = dict(body.as_dict(), chord_size=2)
        group_id, first = str(uuid.uuid4()), str(uuid.uuid4())
        for _ in range(2):
            app.send_task("flowtasks.add", (1, 1), task_id=first, group_id=group_id,
                          group_index=0, chord=wire).get(timeout=20)
        assert early.state == "PENDING"
        app.send_task("flowtasks.add", (2, 2), group_id=group_id, group_index=1, chord=wire)
        assert early.get(timeout=20) == 6

        errors = tmp_path / "errors.txt"
        failing = sig("tsum")
        failing.link_error(sig("on_error", str(errors)))
        failed = chord([sig("add", 1, 1), sig("fail", "pg")], failing)()
        with pytest.raises(ChordError):
            failed.get(timeout=30)
        wait_for(lambda: lines(errors), 20, message="the errback")
        assert lines(errors) == [f"error {failed.id}"]

        def state():    # (written just after the body's or errback's publish is confirmed)
            with psycopg.connect(pg, autocommit=True) as conn:
                left = conn.execute(f"SELECT count(*) FROM {table}_chords").fetchone()[0]
                claims = conn.execute(f"SELECT owner FROM {table}_chord_claims").fetchall()
            return left, sorted(c[0] for c in claims)
        wait_for(lambda: state() == (0, ["published"] * 3), 10, message="chord rows deleted")
    finally:
        app.close()
        worker.stop()
        topo.cleanup()
        with psycopg.connect(pg, autocommit=True) as conn:
            for suffix in ("", "_chords", "_chord_claims", "_counters"):
                conn.execute(f"DROP TABLE IF EXISTS {table}{suffix}")
