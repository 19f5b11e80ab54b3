"""One task end to end through the prefork supervisor, on the real broker."""
import signal
import subprocess
import sys

import pytest

from conftest import PYTHONPATH, ROOT, wait_for
from taskd import Task


def test_round_trip_returns_the_value(topo, workers, app_for):
    path = topo.config()
    workers(path).ready()
    app = app_for(path)
    assert app.send_task("ttasks.add", [2, 2]).get(timeout=10) == 4
    assert app.send_task("ttasks.echo", [1, "a"], {"k": [1, 2]}).get(timeout=10) == \
        {"args": [1, "a"], "kwargs": {"k": [1, 2]}}


def test_failing_task_raises_its_exception_with_traceback(topo, workers, app_for):
    path = topo.config()
    workers(path).ready()
    result = app_for(path).send_task("ttasks.fail", ["it broke"])
    with pytest.raises(ValueError, match="it broke"):
        result.get(timeout=10)
    assert result.state == "FAILURE"
    assert result.failed() and not result.successful()
    assert "raise ValueError(message)" in result.traceback
    assert isinstance(result.get(timeout=1, propagate=False), ValueError)


def test_class_based_task_via_the_class(topo, workers, app_for):
    path = topo.config()
    workers(path).ready()
    app = app_for(path)

    class Multiply(Task):
        name = "ttasks.echo"      # same name as a worker task: sent by the class
        abstract = False

    Multiply.app = app
    result = Multiply.apply_async(args=[6, 7])
    assert result.get(timeout=10) == {"args": [6, 7], "kwargs": {}}
    assert Multiply.delay(1).get(timeout=10) == {"args": [1], "kwargs": {}}


def test_result_state_before_and_after(topo, workers, app_for):
    path = topo.config()
    app = app_for(path)
    result = app.send_task("ttasks.add", [1, 1])
    assert result.state == "PENDING" and not result.ready()
    workers(path).ready()
    assert result.get(timeout=10) == 2
    assert result.ready() and result.successful() and result.result == 2


def test_celery_client_calls_a_taskd_worker(topo, workers):
    pytest.importorskip("celery")
    path = topo.config()
    workers(path).ready()
    code = f"""
from celery import Celery
app = Celery(broker={topo.broker.url!r}, backend='rpc://')
r = app.send_task('tasks.add', (2, 3), queue={topo.name('celery')!r})
print('sum', r.get(timeout=10))
r = app.send_task('ttasks.fail', ('nope',), queue={topo.name('celery')!r})
try:
    r.get(timeout=10)
except ValueError as exc:
    print('raised ValueError', exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sum 5" in out.stdout
    assert "raised ValueError nope" in out.stdout


def test_sub_second_time_limits_from_a_celery_client_are_honoured_as_floats(topo, workers):
    """Celery sends its limits as AMQP doubles: 0.5 must not become 0, nor 1.5 become 1."""
    pytest.importorskip("celery")
    path = topo.config(concurrency=2)
    workers(path).ready()
    code = f"""
from celery import Celery
app = Celery(broker={topo.broker.url!r}, backend='rpc://')
q = {topo.name('celery')!r}
soft = app.send_task('ttasks.seconds_to_soft_limit', queue=q, soft_time_limit=1.5, time_limit=20)
hard = app.send_task('ttasks.sleep', (10,), queue=q, time_limit=0.5)
try:
    hard.get(timeout=10)
except Exception as exc:
    print('hard', type(exc).__name__, exc)
print('soft after', soft.get(timeout=10))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    hard_line = next(line for line in out.stdout.splitlines() if line.startswith("hard"))
    assert hard_line.split()[1] == "TimeLimitExceeded", out.stdout
    assert "(0.5s)" in hard_line, out.stdout       # the limit the worker applied
    soft_after = float(out.stdout.split("soft after")[1])
    # 1.0 would mean truncated; the task's own clock starts a little after the timer
    # the child arms for the limit, so it may read a hair under 1.5 s.
    assert 1.45 <= soft_after < 5, out.stdout


def test_two_workers_on_one_queue_run_each_task_exactly_once(topo, workers, app_for, tmp_path):
    path = topo.config(prefetch_multiplier=1)
    w1, w2 = workers(path).ready(), workers(path).ready()
    app = app_for(path)
    out = tmp_path / "done.txt"
    n = 200
    results = [app.send_task("ttasks.record", [str(out), f"tok{i}", 0.002]) for i in range(n)]
    assert [r.get(timeout=30) for r in results] == [f"tok{i}" for i in range(n)]
    lines = out.read_text().split()
    tokens = lines[0::3]
    assert sorted(tokens) == sorted(f"tok{i}" for i in range(n))   # each exactly once
    supervisors = set(lines[1::3])
    assert supervisors == {str(w1.pid), str(w2.pid)}                # both did work


def test_process_titles_show_supervisor_and_children(topo, workers):
    path = topo.config(concurrency=3)
    w = workers(path).ready()
    children = wait_for(lambda: len(w.children()) == 3 and w.children(), message="3 children")
    titles = subprocess.run(["ps", "-o", "args=", "-p", ",".join(map(str, [w.pid, *children]))],
                            capture_output=True, text=True).stdout.splitlines()
    assert titles[0].startswith(f"taskd: supervisor [{topo.name('celery')}]")
    assert sorted(t.split()[2] for t in titles[1:]) == ["1", "2", "3"]
    assert all(t.startswith("taskd: child ") for t in titles[1:])


def test_sigterm_stops_the_worker_cleanly(topo, workers):
    w = workers(topo.config()).ready()
    children = wait_for(w.children, message="children")
    w.signal(signal.SIGTERM)
    assert w.proc.wait(20) == 0
    assert "stopped (exit code 0)" in w.log
    for pid in children:   # no orphan left behind
        assert subprocess.run(["ps", "-p", str(pid)], capture_output=True).returncode != 0


def test_demo_examples_run_against_a_worker(topo, workers):
    import yaml
    sample = yaml.safe_load((ROOT / "etc" / "taskd.yaml").read_text())
    sample.pop("routes")
    sample["worker"].pop("control_socket")
    path = topo.config(sample)
    w = workers(path).ready()
    env = {"PYTHONPATH": PYTHONPATH, "TASKD_CONFIG": str(path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"),
                          "--worker-pid", str(w.pid)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "add.delay(2, 2).get(timeout=30)" in text and "-> 4" in text
    assert "add.apply_async(args=[10, 10]).get()" in text and "-> 20" in text
    assert "'compressed f.mp4'" in text and "'recommendations updated'" in text
    assert "UnroutableError: task tasks.add" in text and "no binding for routing key " \
        "'nowhere.at.all'" in text
    assert "UnroutableError" in text and "NotDeliveredError" in text
    assert "taskd: supervisor" in text and "taskd: child 1" in text


def test_a_celery_chain_and_link_run_with_rpc_and_a_nested_group_is_refused_whole(
        topo, workers, broker, tmp_path):
    """With rpc:// a stock Celery client's link and chain run on a taskd worker (each step
    once, the chain's result to the caller's reply queue); a step the worker cannot run
    (a group inside a chain) gets the whole message refused: not even its first task runs."""
    pytest.importorskip("celery")
    path = topo.config()
    workers(path).ready()
    out = tmp_path / "runs.txt"
    queue = topo.name("celery")
    code = f"""
from celery import Celery, chain
app = Celery(broker={topo.broker.url!r}, backend='rpc://')
record = app.signature('ttasks.record', queue={queue!r})
linked = record.clone(({str(out)!r}, 'first')).apply_async(
    link=record.clone(({str(out)!r}, 'linked')).set(immutable=True))
print('link returned', linked.get(timeout=20))
result = chain(record.clone(({str(out)!r}, 'one')),
               record.clone(({str(out)!r}, 'two')).set(immutable=True)).apply_async()
print('chain returned', result.get(timeout=20))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "link returned" in run.stdout and "chain returned" in run.stdout
    wait_for(lambda: out.exists() and len(out.read_text().split("\n")) > 4, 20,
             message="four steps recorded")
    tokens = sorted(line.split()[0] for line in out.read_text().splitlines())
    assert tokens == ["first", "linked", "one", "two"]

    from taskd import App, chain, signature
    app = App("tests", config=str(path), set_as_current=False)
    # taskd's own chain with rpc://: the last step replies to this client's queue. (The
    # examples' tasks.add: tests in this process register other classes as ttasks.add.)
    add = signature("tasks.add", app=app)
    assert chain(add.clone((1, 1)), add.clone((10,)), add.clone((100,)))().get(timeout=20) == 112
    group_step = {"task": "celery.group", "args": [], "kwargs": {"tasks": []}, "options": {},
                  "subtask_type": "group", "immutable": False}
    from taskd.exceptions import InvalidTaskMessage
    last = signature("ttasks.record", (str(out), "never-last"), app=app, immutable=True)
    end = last.freeze()
    last.set(reply_to=app.session().results.reply_to())
    with app.session_lock():
        end._reply_to = last.options["reply_to"]
        end._claim(app.session().results)
    refused = app.send_task("ttasks.record", (str(out), "never"),
                            chain=[last.as_dict(), group_step])
    with pytest.raises(InvalidTaskMessage, match="'group' signature.*refused rather than "
                                                 "half-run"):
        refused.get(timeout=20)
    with pytest.raises(InvalidTaskMessage, match="workflow of task .* was refused"):
        end.get(timeout=20)         # the chain's end hears of it too
    app.close()
    assert "never" not in out.read_text()          # no step ran, not even the first
    reasons = [p.headers["x-taskd-reason"] for p, _ in broker.get_all(topo.dead)]
    assert len(reasons) == 1 and "half-run" in reasons[0]
