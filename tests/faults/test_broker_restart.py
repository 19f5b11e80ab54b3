"""A private RabbitMQ node, stopped and started again under a running worker and client."""
import threading
import time

import pytest

import rmqnode
from conftest import executions, wait_for

pytestmark = pytest.mark.skipif(not rmqnode.available(),
                                reason="needs rabbitmq-server on this machine and root "
                                       "(to run a private node as the rabbitmq user)")


@pytest.fixture
def node():
    n = rmqnode.RabbitNode().start()
    yield n
    n.destroy()



def test_broker_restart_mid_stream_loses_nothing_and_runs_nothing_twice(topo, workers, app_for,
                                                                       node, tmp_path):
    path = topo.config({"broker": {"url": node.url, "heartbeat": 5, "connect_timeout": 2}})
    w = workers(path).ready()
    app = app_for(path)
    out = tmp_path / "runs.txt"
    n = 400
    for i in range(n):
        app.send_task("ttasks.record", [str(out), f"t{i}", 0.005], ignore_result=True)
    app.close()
    wait_for(lambda: sum(executions(out).values()) >= n // 4, timeout=30, message="a quarter done")
    node.stop()
    w.wait_log("waiting for the broker", timeout=30)
    node.start()
    w.wait_log("reconnected", timeout=60)
    wait_for(lambda: len(executions(out)) == n, timeout=60, message="every task done")
    time.sleep(1.0)          # a late duplicate would show up by now
    counts = executions(out)
    assert set(counts) == {f"t{i}" for i in range(n)}
    assert {t: c for t, c in counts.items() if c > 1} == {}
    assert w.proc.poll() is None


def test_every_send_during_a_restart_was_confirmed_or_raised(topo, workers, app_for, node,
                                                             tmp_path):
    path = topo.config({"broker": {"url": node.url, "connect_timeout": 1, "publish_retries": 0}})
    app = app_for(path)
    out = tmp_path / "runs.txt"
    sent, failed = [], []
    stop = threading.Event()

    def restart():
        time.sleep(0.3)
        node.stop()
        node.start()
        stop.set()
    threading.Thread(target=restart, daemon=True).start()
    i = 0
    while not stop.is_set() or i < 50:
        token = f"t{i}"
        try:
            app.send_task("ttasks.record", [str(out), token], ignore_result=True)
            sent.append(token)
        except Exception as exc:        # ConnectionError / PublishError: the caller knows
            failed.append((token, type(exc).__name__))
            time.sleep(0.05)
        i += 1
    assert failed, "the restart should have made some sends fail"
    assert {name for _, name in failed} <= {"ConnectionError", "PublishError"}
    workers(path).ready()
    wait_for(lambda: set(sent) <= set(executions(out)), timeout=60,
             message="every confirmed send executed")
    print(f"confirmed {len(sent)}, raised {len(failed)}")


@pytest.mark.timeout(240)
def test_parked_tasks_outlive_the_consumer_timeout(topo, workers, app_for, tmp_path):
    """consumer_timeout = 10 s; RabbitMQ 3.10 checks it about once a minute. A task due
    in 75 s is parked in the broker, so no delivery stays unacked that long."""
    node = rmqnode.RabbitNode(consumer_timeout_ms=10000).start()
    try:
        path = topo.config({"broker": {"url": node.url}}, eta_horizon=5)
        w = workers(path).ready()
        app = app_for(path)
        sent = time.time()
        result = app.send_task("ttasks.now", countdown=75)
        ran_at = result.get(timeout=150)
        assert ran_at >= sent + 75
        assert "lost the broker connection" not in w.log
        assert w.log.count("consuming") == 1      # never had to reconnect
    finally:
        node.destroy()
