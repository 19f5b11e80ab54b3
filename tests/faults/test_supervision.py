"""Supervision: dying children, limits, recycling, retries and bad input, with real
processes and real signals. "Exactly once" is counted by task token in a file."""
import json
import os
import signal
import time

import pika
import pytest

from conftest import wait_for
from taskd.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError


def tokens(path):
    if not os.path.exists(path):
        return []
    return [line.split()[0] for line in open(path).read().splitlines()]


def test_child_killed_mid_task_is_replaced_and_the_task_runs_once(topo, workers, app_for, tmp_path):
    path = topo.config(concurrency=2)
    w = workers(path).ready()
    app = app_for(path)
    log = tmp_path / "run.txt"
    results = [app.send_task("ttasks.sleep", [1.0, str(log), f"t{i}"]) for i in range(2)]
    # both children busy: kill one of them from outside with SIGKILL
    started = wait_for(lambda: [line for line in open(log).read().splitlines()
                                if line.startswith("start")] if log.exists() else [],
                       message="a task to start")
    victim = int(started[0].split()[2])
    os.kill(victim, signal.SIGKILL)
    assert [r.get(timeout=20) for r in results] == [1.0, 1.0]
    ends = [line.split()[1] for line in open(log).read().splitlines() if line.startswith("end")]
    assert sorted(ends) == ["t0", "t1"]          # each finished exactly once
    assert "redelivering (delivery 2 of 3)" in w.log
    children = wait_for(lambda: len(w.children()) == 2 and w.children(), message="2 children")
    assert victim not in children


def test_task_that_always_kills_its_child_is_dead_lettered(topo, workers, app_for, broker):
    path = topo.config(max_deliveries=3)
    w = workers(path).ready()
    app = app_for(path)
    result = app.send_task("ttasks.die")
    good = app.send_task("ttasks.add", [1, 1])
    with pytest.raises(WorkerLostError, match="killed by SIGKILL, 3 times"):
        result.get(timeout=30)
    assert good.get(timeout=10) == 2
    dead = wait_for(lambda: broker.get_all(topo.dead), message="the dead letter")
    headers = dead[0][0].headers
    assert headers["id"] == result.id
    assert "WorkerLostError" in headers["x-taskd-reason"]
    assert headers["x-taskd-delivery-count"] == 3
    assert headers["x-taskd-queue"] == topo.name("celery")
    assert w.proc.poll() is None                 # the worker is still serving


def test_a_child_killed_once_retries_transparently(topo, workers, app_for, tmp_path):
    path = topo.config()
    workers(path).ready()
    app = app_for(path)
    out = tmp_path / "out.txt"
    assert app.send_task("ttasks.die_once", [str(out), "x"]).get(timeout=20) == "x"
    assert tokens(out) == ["x"]


def test_hard_time_limit_kills_only_that_task(topo, workers, app_for):
    path = topo.config(concurrency=2)
    w = workers(path).ready()
    app = app_for(path)
    slow = app.send_task("ttasks.sleep", [30], time_limit=1)
    fine = app.send_task("ttasks.sleep", [1.5])
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded, match=r"hard time limit \(1s\)"):
        slow.get(timeout=15)
    assert time.monotonic() - started < 5
    assert fine.get(timeout=15) == 1.5           # the other child was not disturbed
    assert "exceeded its hard time limit" in w.log
    wait_for(lambda: len(w.children()) == 2, message="replacement child")


def test_soft_time_limit_is_catchable_and_config_limits_apply(topo, workers, app_for):
    path = topo.config(time_limit=2, soft_time_limit=1)
    workers(path).ready()
    app = app_for(path)
    # the task's own attribute (0.5 s) beats the config's soft limit
    assert app.send_task("ttasks.soft_limited").get(timeout=10) == "caught the soft limit"
    # the config's soft limit raises in a task that does not catch it
    with pytest.raises(SoftTimeLimitExceeded):
        app.send_task("ttasks.sleep", [10]).get(timeout=10)


def test_recycling_by_task_count_keeps_every_task(topo, workers, app_for, tmp_path):
    path = topo.config(concurrency=2, max_tasks_per_child=5)
    workers(path).ready()
    app = app_for(path)
    out = tmp_path / "rec.txt"
    results = [app.send_task("ttasks.record", [str(out), f"t{i}"]) for i in range(40)]
    assert [r.get(timeout=30) for r in results] == [f"t{i}" for i in range(40)]
    assert sorted(tokens(out)) == sorted(f"t{i}" for i in range(40))
    child_pids = {line.split()[2] for line in out.read_text().splitlines()}
    assert len(child_pids) >= 8                  # 40 tasks / 5 per child


def test_recycling_by_memory_keeps_every_task(topo, workers, app_for, tmp_path):
    path = topo.config(concurrency=1, max_memory_per_child="150MiB")
    w = workers(path).ready()
    app = app_for(path)
    out = tmp_path / "mem.txt"
    results = [app.send_task("ttasks.allocate", [200, f"m{i}", str(out)]) for i in range(3)]
    assert [r.get(timeout=30) for r in results] == ["m0", "m1", "m2"]
    child_pids = [line.split()[2] for line in out.read_text().splitlines()]
    assert len(set(child_pids)) == 3             # replaced after each allocating task
    assert "limit 150 MiB): replacing it" in w.log


def test_retry_with_countdown_reaches_the_final_result(topo, workers, app_for, tmp_path):
    path = topo.config()
    w = workers(path).ready()
    app = app_for(path)
    attempts = tmp_path / "attempts.txt"
    result = app.send_task("ttasks.flaky", [2, str(attempts)])
    assert result.get(timeout=20) == 2
    times = [float(line.split()[2]) for line in attempts.read_text().splitlines()]
    assert [line.split()[1] for line in attempts.read_text().splitlines()] == ["0", "1", "2"]
    assert times[1] - times[0] >= 0.3 and times[2] - times[1] >= 0.3   # countdown honoured
    assert w.log.count("retry") >= 2


def test_autoretry_gives_up_after_max_retries(topo, workers, app_for, tmp_path):
    path = topo.config()
    workers(path).ready()
    app = app_for(path)
    attempts = tmp_path / "a.txt"
    with pytest.raises(KeyError):
        app.send_task("ttasks.always_keyerror", [str(attempts)]).get(timeout=20)
    assert len(attempts.read_text().splitlines()) == 3     # first run + max_retries=2


BAD_INPUTS = {
    "invalid body": dict(body=b"{not json", content_type="application/json",
                         headers={"task": "ttasks.add", "id": "bad-body"}, reason="DecodeError"),
    "refused content type": dict(body=b"\x80\x04K\x01.", content_type="application/x-python-serialize",
                                 headers={"task": "ttasks.add", "id": "bad-ctype"},
                                 reason="ContentDisallowed"),
    "unknown content type": dict(body=b"x", content_type="text/x-nonsense",
                                 headers={"task": "ttasks.add", "id": "bad-unknown-ctype"},
                                 reason="ContentDisallowed"),
    "unknown task": dict(body=b'[[],{},{}]', content_type="application/json",
                         headers={"task": "ttasks.nope", "id": "bad-name"}, reason="NotRegistered"),
    "no task header": dict(body=b'[[],{},{}]', content_type="application/json",
                           headers={"id": "bad-noheader"}, reason="no 'task' header"),
    "wrong body shape": dict(body=b'{"a": 1}', content_type="application/json",
                             headers={"task": "ttasks.add", "id": "bad-shape"}, reason="body must be"),
    "bad eta": dict(body=b'[[1,2],{},{}]', content_type="application/json",
                    headers={"task": "ttasks.add", "id": "bad-eta", "eta": "next tuesday"},
                    reason="ISO 8601"),
    "bad expires": dict(body=b'[[1,2],{},{}]', content_type="application/json",
                        headers={"task": "ttasks.add", "id": "bad-expires", "expires": "soon"},
                        reason="ISO 8601"),
    "oversized": dict(body=b'[["' + b"x" * 20000 + b'"],{},{}]', content_type="application/json",
                      headers={"task": "ttasks.add", "id": "bad-size"}, reason="max_message_size"),
}


def test_bad_input_is_dead_lettered_while_good_tasks_keep_completing(topo, workers, app_for,
                                                                      broker, tmp_path):
    path = topo.config(max_message_size=10000)
    w = workers(path).ready()
    app = app_for(path)
    out = tmp_path / "good.txt"
    queue = topo.name("celery")
    session = app.session()
    reply_to = session.results.reply_to()
    good = []
    for i, (label, bad) in enumerate(BAD_INPUTS.items()):
        good.append(app.send_task("ttasks.record", [str(out), f"g{i}"]))
        broker.publish(queue, bad["body"], pika.BasicProperties(
            content_type=bad["content_type"], headers=bad["headers"], reply_to=reply_to,
            correlation_id=bad["headers"]["id"], delivery_mode=2))
    assert [r.get(timeout=20) for r in good] == [f"g{i}" for i in range(len(BAD_INPUTS))]
    dead = wait_for(lambda: len(broker.queue_state(topo.dead) or ()) and
                    broker.queue_state(topo.dead)[0] == len(BAD_INPUTS) and
                    broker.get_all(topo.dead), message="every bad message dead-lettered")
    reasons = {p.headers.get("id"): p.headers["x-taskd-reason"] for p, _ in dead}
    for label, bad in BAD_INPUTS.items():
        assert bad["reason"] in reasons[bad["headers"]["id"]], label
    # and each sender got a FAILURE that says why
    for label, bad in BAD_INPUTS.items():
        result = app.AsyncResult(bad["headers"]["id"])
        with pytest.raises(Exception) as info:
            result.get(timeout=10)
        assert result.state == "FAILURE", label
        assert info.value is not None
    assert w.proc.poll() is None
    assert "Traceback" not in w.log


def test_crash_loop_backs_off_and_the_supervisor_stays_up(topo, workers, tmp_path):
    broken = tmp_path / "broken_tasks.py"
    broken.write_text("raise RuntimeError('deliberately broken module')\n")
    sock = tmp_path / "ctl.sock"
    path = topo.config({"imports": ["broken_tasks"]}, control_socket=str(sock))
    w = workers(path, env={"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"})
    w.wait_log("next attempt in 2s", timeout=20)
    assert "RuntimeError: deliberately broken module" in w.log
    assert "next attempt in 1s" in w.log
    assert w.proc.poll() is None
    forks = w.log.count("could not start")
    assert forks <= 4                             # backing off, not fork-bombing
    import subprocess
    import sys
    from conftest import PYTHONPATH, ROOT
    status = subprocess.run([sys.executable, "-m", "taskd", "status", "--socket", str(sock)],
                            capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=PYTHONPATH), timeout=30)
    assert status.returncode == 0, status.stderr        # answers, though never ready
    assert "FAILING TO START" in status.stdout and "deliberately broken" in status.stdout


def test_dead_letters_can_be_listed_and_replayed(topo, workers, app_for, broker, tmp_path):
    import subprocess
    import sys
    from conftest import PYTHONPATH, ROOT
    path = topo.config()
    # a task name the worker does not know yet: dead-lettered
    w = workers(path).ready()
    app = app_for(path)
    with pytest.raises(Exception):
        app.send_task("ttasks.later", [1]).get(timeout=10)
    wait_for(lambda: (broker.queue_state(topo.dead) or (0,))[0] == 1, message="dead letter")
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    listing = subprocess.run([sys.executable, "-m", "taskd", "dead-letters", "--config", str(path)],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert "ttasks.later" in listing.stdout and "NotRegistered" in listing.stdout
    assert broker.queue_state(topo.dead)[0] == 1          # listing leaves it there
    w.stop()
    replay = subprocess.run([sys.executable, "-m", "taskd", "dead-letters", "--replay",
                             "--config", str(path)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert replay.returncode == 0, replay.stderr
    assert "replayed 1" in replay.stdout
    assert broker.queue_state(topo.dead)[0] == 0
    props, body = broker.get_all(topo.name("celery"))[0]
    assert props.headers["task"] == "ttasks.later"
    assert "x-taskd-reason" not in props.headers and json.loads(body)[0] == [1]


def test_quorum_queue_uses_the_brokers_delivery_count(topo, workers, app_for, broker, tmp_path):
    path = topo.config({"queues": [{"name": "q", "queue_type": "quorum", "delivery_limit": 10}]},
                       queues=["q"], max_deliveries=2)
    w = workers(path).ready()
    app = app_for(path)
    out = tmp_path / "q.txt"
    queue = topo.name("q")
    assert app.send_task("ttasks.die_once", [str(out), "once"], queue=queue).get(timeout=20) == "once"
    result = app.send_task("ttasks.die", queue=queue)
    with pytest.raises(WorkerLostError, match="2 times"):
        result.get(timeout=30)
    dead = wait_for(lambda: broker.get_all(topo.dead), message="dead letter")
    assert dead[0][0].headers["id"] == result.id
    assert w.proc.poll() is None


def test_child_prefetch_jobs_sent_in_advance_survive_a_dying_child(topo, workers, app_for,
                                                                   tmp_path):
    path = topo.config(concurrency=1, child_prefetch=2, time_limit=20)
    w = workers(path).ready()
    app = app_for(path)
    log = tmp_path / "log.txt"
    running = app.send_task("ttasks.sleep", [1.0, str(log), "a"])
    waiting = app.send_task("ttasks.whoami")             # sent to the same child in advance
    wait_for(lambda: log.exists() and "start a" in log.read_text(), message="a to start")
    (victim,) = w.children()
    os.kill(victim, signal.SIGKILL)
    assert waiting.get(timeout=20)["delivery_count"] == 1   # never started: not a delivery
    assert running.get(timeout=20) == 1.0
    assert [line.split()[0] for line in log.read_text().splitlines()].count("end") == 1


def test_child_prefetch_keeps_every_task_with_recycling(topo, workers, app_for, tmp_path):
    path = topo.config(concurrency=2, child_prefetch=2, max_tasks_per_child=7)
    workers(path).ready()
    app = app_for(path)
    out = tmp_path / "rec.txt"
    results = [app.send_task("ttasks.record", [str(out), f"t{i}"]) for i in range(60)]
    assert [r.get(timeout=30) for r in results] == [f"t{i}" for i in range(60)]
    assert sorted(tokens(out)) == sorted(f"t{i}" for i in range(60))


def test_child_prefetch_time_limit_counts_from_the_start(topo, workers, app_for):
    path = topo.config(concurrency=1, child_prefetch=2)
    workers(path).ready()
    app = app_for(path)
    first = app.send_task("ttasks.sleep", [1.5])
    second = app.send_task("ttasks.sleep", [1.0], time_limit=2)   # waits 1.5 s, runs 1 s
    assert first.get(timeout=15) == 1.5
    assert second.get(timeout=15) == 1.0                          # not killed at 2 s after send


def test_a_large_job_sent_ahead_to_a_busy_child_never_blocks_the_supervisor(topo, workers,
                                                                            app_for, tmp_path):
    """A job frame larger than the pipe buffer, for a child busy with a task that then
    returns more than the pipe buffer: the supervisor keeps answering, nothing deadlocks."""
    from taskd.worker import control
    sock = tmp_path / "ctl.sock"
    path = topo.config(concurrency=1, child_prefetch=2, control_socket=str(sock))
    workers(path).ready()
    app = app_for(path)
    log = tmp_path / "log.txt"
    running = app.send_task("ttasks.big_after", [3.0, 300_000, str(log), "a"])
    wait_for(lambda: log.exists() and "start a" in log.read_text(), message="a to start")
    sent_ahead = app.send_task("ttasks.echo", ["y" * 300_000])

    def status():
        return control.query(str(sock), timeout=1.0)     # raises if the loop is stuck
    wait_for(lambda: status()["counters"].get("received") == 2, message="the second delivery")
    for _ in range(3):                                     # it has been sent to the busy child
        (child,) = status()["children"]
        assert child["task"] == "ttasks.big_after"
        time.sleep(0.2)
    assert running.get(timeout=20) == "x" * 300_000
    assert sent_ahead.get(timeout=20) == {"args": ["y" * 300_000], "kwargs": {}}


def test_a_busy_child_dies_with_its_killed_supervisor(topo, workers, app_for, tmp_path):
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    app = app_for(path)
    log = tmp_path / "log.txt"
    app.send_task("ttasks.sleep", [30, str(log), "long"], ignore_result=True)
    wait_for(lambda: log.exists() and "start long" in log.read_text(), message="the task")
    (child,) = w.children()
    w.proc.kill()                                 # SIGKILL, or the OOM killer
    w.proc.wait()

    def gone():
        try:
            with open(f"/proc/{child}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True
    wait_for(gone, timeout=2.0, message="the orphaned child to die")
    assert "end long" not in log.read_text()


def test_children_are_not_recycled_for_the_memory_they_inherit_from_the_supervisor(
        topo, workers, app_for, tmp_path):
    path = topo.config({"serializer_modules": ["ballast"]}, concurrency=1,
                       max_memory_per_child="150MiB")
    w = workers(path, env={"TASKD_TEST_BALLAST_MB": "250"}).ready()
    app = app_for(path)
    out = tmp_path / "runs.txt"
    results = [app.send_task("ttasks.record", [str(out), f"m{i}"]) for i in range(3)]
    assert [r.get(timeout=30) for r in results] == ["m0", "m1", "m2"]
    child_pids = {line.split()[2] for line in out.read_text().splitlines()}
    assert len(child_pids) == 1 and "replacing it" not in w.log


def test_the_adaptive_window_never_queues_a_short_task_behind_a_long_one(topo, workers,
                                                                         app_for, tmp_path):
    """Default settings (the adaptive window on): ``ttasks.sleep`` and ``ttasks.record``
    are known short, then one sleep runs 3 s. The short tasks sent once it has run past
    the window's bound all run on the other child, before it ends: none was written
    ahead behind it (with ``child_prefetch: 2`` one would be, and would run only after
    it). Sent within the bound's first 20 ms, one could be: see docs/benchmarks.md."""
    path = topo.config(concurrency=2)
    workers(path).ready()
    app = app_for(path)
    log = tmp_path / "log.txt"
    warm = [app.send_task("ttasks.sleep", [0]) for _ in range(6)]
    warm += [app.send_task("ttasks.record", [str(tmp_path / "warm.txt"), f"w{i}"])
             for i in range(6)]
    [r.get(timeout=20) for r in warm]
    long = app.send_task("ttasks.sleep", [3.0, str(log), "long"])
    wait_for(lambda: log.exists() and "start long" in log.read_text(), message="long to start")
    time.sleep(0.2)
    shorts = [app.send_task("ttasks.record", [str(log), f"s{i}"]) for i in range(10)]
    assert [r.get(timeout=20) for r in shorts] == [f"s{i}" for i in range(10)]
    assert long.get(timeout=20) == 3.0
    lines = [line.split() for line in log.read_text().splitlines()]
    long_pid = lines[0][2]
    assert lines[0][:2] == ["start", "long"] and lines[-1] == ["end", "long", long_pid]
    assert sorted(line[0] for line in lines[1:-1]) == sorted(f"s{i}" for i in range(10))
    assert all(line[2] != long_pid for line in lines[1:-1])
