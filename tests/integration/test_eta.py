"""The ETA schedule: hold near tasks, park far ones in the broker, lose none on restart."""
import time

import pytest

from conftest import wait_for
from taskd.exceptions import TaskRevokedError


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_far_task_is_parked_in_the_broker_then_runs_on_time(topo, workers, app_for):
    path = topo.config(eta_horizon=1.5)
    workers(path).ready()
    app = app_for(path)
    sent = time.time()
    result = app.send_task("ttasks.now", countdown=5.5)
    # 5.5 s away, horizon 1.5 s: parked in the 4 s bucket, not held by the worker
    wait_for(lambda: (topo.broker.queue_state(topo.delay_queue(4)) or (0,))[0] == 1,
             message="the task in the 4 s delay queue")
    ran_at = result.get(timeout=20)
    assert ran_at >= sent + 5.5                  # never early
    assert ran_at < sent + 5.5 + 2.0             # and soon after
    assert topo.broker.queue_state(topo.delay_queue(4))[0] == 0


def test_max_held_parks_even_near_tasks(topo, workers, app_for):
    path = topo.config(max_held=0)
    w = workers(path).ready()
    app = app_for(path)
    sent = time.time()
    result = app.send_task("ttasks.now", countdown=2.5)
    wait_for(lambda: (topo.broker.queue_state(topo.delay_queue(2)) or (0,))[0] == 1,
             message="the task in the 2 s delay queue")
    assert result.get(timeout=20) >= sent + 2.5
    assert w.proc.poll() is None


def test_expires_before_eta_is_revoked(topo, workers, app_for):
    path = topo.config()
    workers(path).ready()
    app = app_for(path)
    result = app.send_task("ttasks.add", [1, 2], countdown=30, expires=5)
    with pytest.raises(TaskRevokedError, match="before its ETA"):
        result.get(timeout=10)


def test_restart_loses_no_scheduled_task_and_runs_none_twice(topo, workers, app_for, tmp_path):
    path = topo.config(eta_horizon=2)
    w1 = workers(path).ready()
    app = app_for(path)
    out = tmp_path / "eta.txt"
    due = {}
    sent = time.time()
    for i in range(20):                          # held (due in 3 s)
        app.send_task("ttasks.record", [str(out), f"h{i}"], countdown=3, ignore_result=True)
        due[f"h{i}"] = sent + 3
    for i in range(5):                           # parked (due in 6 s)
        app.send_task("ttasks.record", [str(out), f"p{i}"], countdown=6, ignore_result=True)
        due[f"p{i}"] = sent + 6
    wait_for(lambda: (topo.broker.queue_state(topo.delay_queue(4)) or (0,))[0] == 5,
             message="5 parked tasks")
    assert w1.stop() == 0                        # warm shutdown gives the held ones back
    assert lines(out) == []
    workers(path).ready()
    wait_for(lambda: len(lines(out)) >= 25, timeout=30, message="25 tasks done")
    time.sleep(0.5)                              # a duplicate would show up by now
    done = [line.split()[0] for line in lines(out)]
    assert sorted(done) == sorted(due)           # each exactly once
    assert out.stat().st_mtime >= sent + 6


def test_many_countdown_tasks_are_never_early(topo, workers, app_for, tmp_path):
    path = topo.config()
    workers(path).ready()
    app = app_for(path)
    sends = [(time.time(), app.send_task("ttasks.now", countdown=1.0)) for _ in range(200)]
    early = [(ran, sent) for sent, r in sends if (ran := r.get(timeout=20)) < sent + 1.0]
    assert early == []
