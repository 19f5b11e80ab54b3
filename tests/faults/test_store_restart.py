"""A private Redis result store crashes and comes back under a running worker and client:
no result is missing, no task runs twice, and new work waits while results wait."""
import json
import threading
import time

import pytest

import redisnode
from conftest import executions, wait_for
from taskd.worker import control

pytestmark = pytest.mark.skipif(not redisnode.available(), reason="needs redis-server")


@pytest.fixture
def store(tmp_path):
    node = redisnode.RedisNode(tmp_path).start()
    yield node
    node.destroy()


def test_store_crash_mid_stream_loses_no_result_and_acks_none_early(topo, workers, app_for,
                                                                    store, tmp_path, broker):
    sock = str(tmp_path / "ctl.sock")
    path = topo.config({"result_backend": store.url},
                       control_socket=sock, result_buffer=600)
    w = workers(path).ready()
    app = app_for(path)
    out = tmp_path / "runs.txt"
    n = 60
    results = [app.send_task("ttasks.record", [str(out), f"t{i}", 0.02]) for i in range(n)]
    wait_for(lambda: sum(executions(out).values()) >= 10, timeout=30, message="10 done")

    # A client already waiting in get() through the crash:
    waited = {}
    waiter = threading.Thread(target=lambda: waited.setdefault(
        "value", app.AsyncResult(results[-1].id).get(timeout=60)), daemon=True)
    waiter.start()

    store.kill()
    w.wait_log("result store", timeout=15)
    state = wait_for(lambda: (s := control.query(sock))["result_store"]["waiting"] and s,
                     timeout=15, message="results waiting in the worker")
    assert state["result_store"]["ok"] is False and "DOWN" in control.format_status(state)
    # Beyond worker.result_buffer no new task starts: the runs stop growing.
    wait_for(lambda: not control.query(sock)["result_store"]["accepting"], timeout=15,
             message="the result buffer to fill")
    # (the tasks running when it filled finish; then nothing starts)
    wait_for(lambda: not any(c["task"] for c in control.query(sock)["children"]), timeout=15,
             message="the children idle")
    stalled = sum(executions(out).values())
    time.sleep(1.0)
    assert sum(executions(out).values()) == stalled < n
    assert "no new task starts" in w.log

    store.start()
    w.wait_log("answers again", timeout=30)
    assert [r.get(timeout=60) for r in results] == [f"t{i}" for i in range(n)]
    waiter.join(30)
    assert waited.get("value") == f"t{n - 1}"

    import redis
    client = redis.Redis.from_url(store.url)
    stored = [json.loads(client.get(f"celery-task-meta-{r.id}")) for r in results]
    assert all(m["status"] == "SUCCESS" for m in stored)
    # Every task ran exactly once: none was acked before its result was stored (an early
    # ack would show as a missing result), none ran again.
    runs = executions(out)
    assert len(runs) == n and set(runs.values()) == {1}
    wait_for(lambda: broker.queue_state(topo.name("celery")) == (0, 1), timeout=15,
             message="the queue empty, nothing unacknowledged")
    assert "result_store_errors" in control.query(sock)["counters"]


@pytest.fixture
def pg():
    import pgnode
    if not pgnode.available():
        pytest.skip("needs PostgreSQL's server binaries, the postgres user, and root")
    node = pgnode.PgNode().init().start()
    yield node
    node.destroy()


def test_postgres_store_crash_mid_stream_loses_no_result(topo, workers, app_for, pg, tmp_path):
    import psycopg
    path = topo.config({"result_backend": pg.url + "?table=results"},
                       control_socket=str(tmp_path / "ctl.sock"))
    w = workers(path).ready()
    app = app_for(path)
    out = tmp_path / "runs.txt"
    n = 40
    results = [app.send_task("ttasks.record", [str(out), f"t{i}", 0.02]) for i in range(n)]
    wait_for(lambda: sum(executions(out).values()) >= 8, timeout=30, message="8 done")
    pg.crash()
    w.wait_log("result store", timeout=15)
    pg.start()
    w.wait_log("answers again", timeout=30)
    assert [r.get(timeout=60) for r in results] == [f"t{i}" for i in range(n)]
    with psycopg.connect(pg.url, autocommit=True) as conn:
        rows = dict(conn.execute("SELECT task_id, status FROM results").fetchall())
    assert all(rows[r.id] == "SUCCESS" for r in results)
    runs = executions(out)
    assert len(runs) == n and set(runs.values()) == {1}
