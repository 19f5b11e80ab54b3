"""Remote control and revoke against real workers and the real broker: Celery's own CLI
reaches a taskd worker, `taskd inspect` reads its state, and a revoke is honoured on
receipt, when an ETA falls due, by a worker started after it was sent, and (terminate)
while the task runs."""
import json
import os
import subprocess
import sys
import time

import pika
import pytest

from conftest import BROKER_URL, PYTHONPATH, ROOT, TASKD, executions, wait_for
from taskd.exceptions import TaskRevokedError

pytestmark = pytest.mark.broker
CELERY = [os.path.join(os.path.dirname(sys.executable), "celery"), "-A", "celeryctl"]


def run(cmd, topo, timeout=30):
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, TASKD_BROKER_URL=BROKER_URL,
               CELERYCTL_EXCHANGE=topo.prefix + "ctl")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT / "tests" / "support")


def taskd(topo, path, *args):
    return run([*TASKD, *args, "--config", str(path), "-d", topo.node], topo)


def test_celerys_own_cli_pings_inspects_and_revokes_on_a_taskd_worker(topo, workers, app_for):
    path = topo.config()
    worker = workers(path).ready()
    ping = run([*CELERY, "inspect", "ping", "-d", topo.node], topo)
    assert ping.returncode == 0 and f"{topo.node}: OK" in ping.stdout and "pong" in ping.stdout
    revoke = run([*CELERY, "control", "revoke", "id-from-celery", "-d", topo.node], topo)
    assert revoke.returncode == 0 and "id-from-celery flagged as revoked" in revoke.stdout
    revoked = taskd(topo, path, "inspect", "revoked", "--json")
    assert json.loads(revoked.stdout) == {topo.node: ["id-from-celery"]}, revoked.stderr
    # Bad input on the control exchange: logged and dropped, and the worker goes on.
    topo.broker.publish("", b"\x80\x04K\x01.", pika.BasicProperties(
        content_type="application/x-python-serialize"), exchange=topo.prefix + "ctl.pidbox")
    topo.broker.publish("", b"{oops", pika.BasicProperties(content_type="application/json"),
                        exchange=topo.prefix + "ctl.pidbox")
    app = app_for(path)
    [unknown] = app.control.broadcast("no_such_command", reply=True, destination=[topo.node])
    assert "No such command" in unknown[topo.node]["error"]
    assert app.control.ping([topo.node]) == [{topo.node: {"ok": "pong"}}]
    assert "pickle (application/x-python-serialize) refused" in worker.log
    assert "not valid JSON" in worker.log


def test_taskd_inspect_shows_stats_active_registered_and_queues(topo, workers, app_for, tmp_path):
    path = topo.config()
    workers(path, "-c", "1").ready()
    app = app_for(path)
    app.send_task("ttasks.add", [1, 1]).get(timeout=10)
    marks = tmp_path / "marks"
    running = app.send_task("ttasks.sleep", [30, str(marks), "long"])
    wait_for(lambda: marks.exists(), message="the task to start")
    active = taskd(topo, path, "inspect", "active")
    assert active.returncode == 0 and running.id in active.stdout, active.stdout + active.stderr
    assert active.stdout.splitlines()[0].split() == ["NODE", "ID", "TASK", "ARGS,", "KWARGS",
                                                     "RUNNING", "FOR"]
    stats = json.loads(taskd(topo, path, "inspect", "stats", "--json").stdout)[topo.node]
    assert stats["total"] == {"ttasks.add": 1, "ttasks.sleep": 1}
    assert stats["pool"]["max-concurrency"] == 1 and len(stats["pool"]["processes"]) == 1
    table = taskd(topo, path, "inspect", "stats").stdout
    assert topo.node in table and "1/1" in table
    registered = taskd(topo, path, "inspect", "registered").stdout
    assert f"{topo.node}  ttasks.add" in registered
    queues = taskd(topo, path, "inspect", "active_queues").stdout
    assert topo.name("celery") in queues and "direct" in queues
    running.revoke(terminate=True, signal="KILL")
    with pytest.raises(TaskRevokedError):
        running.get(timeout=10)
    extra = topo.name("extra")
    topo.queues.add(extra)
    topo.exchanges.add(extra)
    added = taskd(topo, path, "control", "add_consumer", extra)
    assert added.returncode == 0 and f"add consumer {extra}" in added.stdout
    assert app.send_task("ttasks.add", [2, 2], queue=extra).get(timeout=10) == 4
    queues = json.loads(taskd(topo, path, "inspect", "active_queues", "--json").stdout)
    assert [q["name"] for q in queues[topo.node]] == [topo.name("celery"), extra]
    cancelled = taskd(topo, path, "control", "cancel_consumer", extra)
    assert cancelled.returncode == 0 and f"no longer consuming from {extra}" in cancelled.stdout
    assert topo.broker.queue_state(extra)[1] == 0               # no consumer left


def test_a_revoke_sent_while_no_worker_runs_is_honoured_by_a_worker_started_later(
        topo, workers, app_for, tmp_path):
    path = topo.config()
    app = app_for(path)
    marks = tmp_path / "marks"
    doomed = app.send_task("ttasks.record", [str(marks), "doomed"])
    app.control.revoke(doomed.id)               # no worker anywhere yet
    kept = app.send_task("ttasks.record", [str(marks), "kept"])
    workers(path).ready()
    assert kept.get(timeout=20) == "kept"
    with pytest.raises(TaskRevokedError):
        doomed.get(timeout=10)
    assert doomed.state == "REVOKED" and executions(marks) == {"kept": 1}


def test_terminate_ends_a_running_task_within_a_second_and_it_is_not_run_again(
        topo, workers, app_for, tmp_path):
    path = topo.config()
    worker = workers(path, "-c", "1").ready()
    app = app_for(path)
    marks = tmp_path / "marks"
    result = app.send_task("ttasks.sleep", [30, str(marks), "t"])
    wait_for(lambda: marks.exists(), message="the task to start")
    started = time.monotonic()
    result.revoke(terminate=True)
    with pytest.raises(TaskRevokedError, match="terminated"):
        result.get(timeout=5)
    assert time.monotonic() - started < 1.0
    # The child is replaced and the pool serves again; the task never runs a second time.
    assert app.send_task("ttasks.add", [2, 3]).get(timeout=10) == 5
    time.sleep(0.5)
    assert marks.read_text().split()[:2] == ["start", "t"] and marks.read_text().count("start") == 1
    assert topo.broker.queue_state(topo.name("celery"))[0] == 0
    assert "redeliver" not in worker.log and "terminated by a revoke" in worker.log


def test_a_revoked_eta_task_is_not_run_when_it_falls_due(topo, workers, app_for, tmp_path):
    path = topo.config()
    workers(path).ready()
    app = app_for(path)
    marks = tmp_path / "marks"
    sent = time.monotonic()
    later = app.send_task("ttasks.record", [str(marks), "later"], countdown=1.5)
    time.sleep(0.3)                         # received and held by the worker
    answers = later.revoke(wait=True, timeout=0.5)
    assert answers == [{topo.node: {"ok": f"tasks {later.id} flagged as revoked"}}]
    with pytest.raises(TaskRevokedError):
        later.get(timeout=10)
    assert time.monotonic() - sent >= 1.4        # settled when due, not before
    assert not marks.exists()


def test_remote_control_off_means_no_control_queue_and_no_answer(topo, workers, app_for):
    path = topo.config(remote_control=False)
    workers(path).ready()
    app = app_for(path)
    assert app.control.ping([topo.node], timeout=0.5) == []
    assert topo.broker.queue_state(f"{topo.node}.{topo.prefix}ctl.pidbox") is None
    off = taskd(topo, path, "inspect", "ping", "--timeout", "0.5")
    assert off.returncode == 69 and "no worker answered" in off.stderr
