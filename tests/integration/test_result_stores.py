"""Result stores against the real Redis and PostgreSQL: results from any process,
states, expiry, failures, and Celery reading taskd's results and the other way round."""
import os
import subprocess
import sys
import time
import uuid

import pytest

from conftest import BROKER_URL, PYTHONPATH, ROOT, Broker, Topology, Worker, wait_for

REDIS_URL = os.environ.get("TASKD_TEST_REDIS", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("TASKD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1/test")


def _start(tmp_path_factory, backend, **extra):
    topo = Topology(tmp_path_factory.mktemp("store"), Broker())
    path = topo.config({"result_backend": backend, "result_expires": 600, **extra},
                       control_socket=str(topo.tmp_path / "ctl.sock"))
    worker = Worker(path).ready()
    return topo, path, worker


@pytest.fixture(scope="module")
def redis_worker(tmp_path_factory):
    topo, path, worker = _start(tmp_path_factory, REDIS_URL, result_extended=True)
    yield topo, path, worker
    worker.stop()
    topo.cleanup()


@pytest.fixture(scope="module")
def pg_worker(tmp_path_factory):
    table = f"taskd_results_{uuid.uuid4().hex[:10]}"
    url = f"{PG_URL}?table={table}"
    topo, path, worker = _start(tmp_path_factory, url)
    yield topo, path, worker, url, table
    worker.stop()
    topo.cleanup()
    import psycopg
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def other_process(path, code):
    """Run ``code`` in a new interpreter with ``app`` = App(config=path); its stdout."""
    script = f"from taskd import App\napp = App(config={str(path)!r})\n{code}"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=PYTHONPATH), cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def app_of(path):
    from taskd import App
    return App("tests", config=str(path), set_as_current=False)


@pytest.mark.parametrize("store", ["redis", "postgres"])
def test_get_from_another_process_and_twice(store, request):
    fixture = request.getfixturevalue(f"{'redis' if store == 'redis' else 'pg'}_worker")
    path = fixture[1]
    app = app_of(path)
    result = app.send_task("ttasks.add", (2, 3))
    # No reply queue with a store: the id is all another process needs.
    printed = other_process(path, f"r = app.AsyncResult({result.id!r})\n"
                                  "print(r.get(timeout=15), r.get(timeout=0), r.state)")
    assert printed == "5 5 SUCCESS"
    assert result.get(timeout=5) == 5 and result.get(timeout=5) == 5
    assert result.ready() and result.successful() and result.date_done
    again = app.AsyncResult(result.id)
    assert again.get(timeout=0) == 5 and again.info == 5
    app.close()


@pytest.mark.parametrize("store", ["redis", "postgres"])
def test_failure_reraised_in_another_process(store, request):
    fixture = request.getfixturevalue(f"{'redis' if store == 'redis' else 'pg'}_worker")
    path = fixture[1]
    app = app_of(path)
    result = app.send_task("ttasks.fail", ("bad input",))
    printed = other_process(path, f"""
r = app.AsyncResult({result.id!r})
try:
    r.get(timeout=15)
except ValueError as exc:
    print(type(exc).__name__, exc.args[0], r.state, "ValueError: bad input" in r.traceback)
""")
    assert printed == "ValueError bad input FAILURE True"
    assert isinstance(result.get(timeout=5, propagate=False), ValueError)
    app.close()


@pytest.mark.parametrize("store", ["redis", "postgres"])
def test_states_started_custom_then_success(store, request, tmp_path):
    fixture = request.getfixturevalue(f"{'redis' if store == 'redis' else 'pg'}_worker")
    app = app_of(fixture[1])
    go, done = tmp_path / "go", tmp_path / "done"
    result = app.send_task("ttasks.progress", (str(go), str(done)))
    seen = app.AsyncResult(result.id)
    wait_for(lambda: seen.state == "STARTED", 15, message="STARTED")
    assert seen.info["hostname"] == fixture[0].node and seen.info["pid"] > 0
    assert not seen.ready()
    go.touch()
    wait_for(lambda: seen.state == "PROGRESS", 15, message="PROGRESS")
    assert seen.info == {"done": 1, "of": 2}
    done.touch()
    assert seen.get(timeout=15) == "finished" and seen.state == "SUCCESS"
    app.close()


def test_pending_forget_and_redis_ttl(redis_worker):
    import redis
    app = app_of(redis_worker[1])
    assert app.AsyncResult(str(uuid.uuid4())).state == "PENDING"
    result = app.send_task("ttasks.add", (1, 1))
    assert result.get(timeout=15) == 2
    client = redis.Redis.from_url(REDIS_URL)
    key = f"celery-task-meta-{result.id}"
    assert 0 < client.ttl(key) <= 600           # result_expires: 600
    app.AsyncResult(result.id).forget()
    assert client.exists(key) == 0 and app.AsyncResult(result.id).state == "PENDING"
    app.close()


def test_extended_fields_in_celery_layout(redis_worker):
    import json

    import redis
    topo, path, _ = redis_worker
    app = app_of(path)
    result = app.send_task("ttasks.add", (4, 5))
    result.get(timeout=15)
    raw = json.loads(redis.Redis.from_url(REDIS_URL).get(f"celery-task-meta-{result.id}"))
    assert {k: raw[k] for k in ("task_id", "status", "result", "traceback", "children")} == {
        "task_id": result.id, "status": "SUCCESS", "result": 9, "traceback": None,
        "children": []}
    assert raw["date_done"].endswith("+00:00")
    assert (raw["name"], raw["args"], raw["kwargs"], raw["retries"], raw["queue"]) == (
        "ttasks.add", [4, 5], {}, 0, topo.name("celery"))
    assert raw["worker"] == topo.node          # the worker's node name (-n, worker.hostname)
    app.close()


def test_celery_client_reads_taskd_results(redis_worker):
    from celery import Celery
    path = redis_worker[1]
    app = app_of(path)
    ok = app.send_task("ttasks.add", (20, 22))
    bad = app.send_task("ttasks.fail", ("from taskd",))
    ok.get(timeout=15)
    bad.get(timeout=15, propagate=False)
    celery = Celery(broker=BROKER_URL, backend=REDIS_URL, set_as_current=False)
    try:
        assert celery.AsyncResult(ok.id).get(timeout=10) == 42
        failed = celery.AsyncResult(bad.id)
        with pytest.raises(ValueError, match="from taskd"):
            failed.get(timeout=10)
        assert failed.state == "FAILURE"
        # ... and Celery's pub/sub get() wakes on a taskd worker's write:
        late = app.send_task("ttasks.sleep", (0.3,))
        assert celery.AsyncResult(late.id).get(timeout=15) == 0.3
    finally:
        celery.close()
        app.close()


def test_taskd_client_reads_celery_worker_results(tmp_path):
    queue = f"celery-interop-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, CELERY_TEST_BROKER=BROKER_URL,
               CELERY_TEST_BACKEND=REDIS_URL)
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celerytasks", "worker", "--pool=solo",
         "-Q", queue, "-n", f"{queue}@%h", "--without-mingle", "--without-gossip",
         "--without-heartbeat", "-l", "warning"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    from taskd import App
    app = App("tests", broker=BROKER_URL, backend=REDIS_URL, set_as_current=False)
    try:
        ok = app.send_task("celerytasks.mul", (6, 7), queue=queue)
        bad = app.send_task("celerytasks.boom", ("missing",), queue=queue)
        assert ok.get(timeout=30) == 42 and ok.state == "SUCCESS"
        with pytest.raises(KeyError):
            bad.get(timeout=15)
        assert bad.state == "FAILURE" and "KeyError" in bad.traceback
        assert app.AsyncResult(ok.id).get(timeout=0) == 42      # any handle, any time
    finally:
        proc.kill()         # its work is done (solo pool): no warm shutdown to wait for
        proc.wait()
        app.close()
        Broker().delete([queue])


def test_postgres_rows_are_jsonb_and_expire(pg_worker):
    import asyncio

    import psycopg

    from taskd import stores
    _, path, _, url, table = pg_worker
    app = app_of(path)
    result = app.send_task("ttasks.add", (3, 4))
    assert result.get(timeout=15) == 7
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        status, kind, value, expires = conn.execute(
            f"SELECT status, pg_typeof(meta)::text, meta->'result', expires_at - now() "
            f"FROM {table} WHERE task_id = %s", (result.id,)).fetchone()
        assert (status, kind, value) == ("SUCCESS", "jsonb", 7)
        assert 500 < expires.total_seconds() <= 600
        # An expired row is invisible at once, and deleted by the workers' prune:
        conn.execute(f"UPDATE {table} SET expires_at = now() - interval '1 second' "
                     "WHERE task_id = %s", (result.id,))
    assert app.AsyncResult(result.id).state == "PENDING"

    async def prune():
        store = stores.open_async_store(url, 600)
        try:
            return await store.prune()
        finally:
            await store.close()
    assert asyncio.run(prune()) >= 1
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE task_id = %s",
                            (result.id,)).fetchone()[0] == 0
    app.close()


def test_update_state_with_rpc_says_a_store_is_needed():
    from taskd import App
    from taskd.exceptions import TaskdError
    rpc = App(broker=BROKER_URL, set_as_current=False)

    @rpc.task(name=f"tests.rpc_progress_{uuid.uuid4().hex}", bind=True)
    def rpc_progress(self):
        pass
    with pytest.raises(TaskdError, match="needs a result store"):
        rpc_progress.update_state(task_id="x", state="PROGRESS", meta={})
