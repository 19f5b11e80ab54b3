"""A private RabbitMQ node, stopped and started again under a running worker and client."""
import os
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


def test_memory_alarm_blocks_results_until_it_clears_and_loses_nothing(topo, workers, app_for,
                                                                       node, tmp_path):
    import json
    import subprocess
    import sys
    from conftest import PYTHONPATH, ROOT
    sock = tmp_path / "ctl.sock"
    path = topo.config({"broker": {"url": node.url}}, control_socket=str(sock))
    w = workers(path).ready()
    app = app_for(path)
    out = tmp_path / "runs.txt"
    results = [app.send_task("ttasks.record", [str(out), f"t{i}"]) for i in range(20)]
    wait_for(lambda: len(executions(out)) == 20, message="the tasks to run")   # warm up
    assert [r.get(timeout=10) for r in results] == [f"t{i}" for i in range(20)]

    def watermark(value):
        subprocess.run(["rabbitmqctl", "-n", node.name, "set_vm_memory_high_watermark",
                        str(value)], env=node._env(), check=True, capture_output=True, timeout=30)

    def status():
        out = subprocess.run([sys.executable, "-m", "taskd", "status", "--json", "--socket",
                              str(sock)], capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=PYTHONPATH), timeout=30)
        return json.loads(out.stdout)

    # due in 2 s: they run, and want to publish their results, during the alarm
    late = [app.send_task("ttasks.record", [str(out), f"u{i}"], countdown=2) for i in range(5)]
    watermark(0)            # memory alarm: the broker blocks every publishing connection
    try:
        wait_for(lambda: len(executions(out)) == 25, message="tasks to run during the alarm")
        w.wait_log("the broker blocked this connection", timeout=30)
        assert wait_for(lambda: status()["publishing_blocked"], message="status shows it")
        assert w.proc.poll() is None
    finally:
        watermark(0.4)
    w.wait_log("the broker unblocked this connection", timeout=30)
    # the results held back by the alarm arrive, and nothing ran twice
    assert [r.get(timeout=20) for r in late] == [f"u{i}" for i in range(5)]
    counts = executions(out)
    assert len(counts) == 25 and max(counts.values()) == 1
