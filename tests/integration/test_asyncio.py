"""async def tasks and signals end to end: a real worker on the real broker.

The tasks and the signal receivers are in tests/support/aiotasks.py; the
receivers write ``<signal> <pid> <detail>`` lines to a file, so a test sees
which process each signal ran in.
"""
import os

import pytest

from conftest import executions, wait_for
from taskd import signals
from taskd.exceptions import TimeLimitExceeded


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_coroutines_run_together_on_one_loop_per_child_with_limits_retries_and_signals(
        topo, workers, app_for, tmp_path):
    notes = tmp_path / "signals.txt"
    path = topo.config({"imports": ["aiotasks"]}, concurrency=1, async_concurrency=10,
                       async_block_warning=0.2)
    worker = workers(path, env={"AIOTASKS_SIGNALS": str(notes)}).ready()
    app = app_for(path)
    published = []

    @signals.before_task_publish.connect
    def before(sender=None, headers=None, routing_key=None, **kwargs):
        published.append(("before", os.getpid(), sender, headers["id"], routing_key))

    @signals.after_task_publish.connect(sender="aiotasks.nap")
    def after(sender=None, headers=None, **kwargs):
        published.append(("after", os.getpid(), headers["task"]))

    # ten coroutines that each await 0.5 s run at once in the one child, on one loop
    results = [app.send_task("aiotasks.nap", [0.5, i]) for i in range(10)]
    naps = [r.get(timeout=20) for r in results]
    pids = {n["pid"] for n in naps}
    assert len(pids) == 1 and {n["loops"] for n in naps} == {1}
    assert all(n["init_loop"] for n in naps)    # worker_process_init saw the same loop
    starts = sorted(n["started"] for n in naps)
    assert starts[-1] - starts[0] < 0.5, "the last started after the first had finished"

    # the soft limit raises SoftTimeLimitExceeded at the await, inside the coroutine
    assert app.send_task("aiotasks.soft", [10], soft_time_limit=0.3).get(timeout=10) == \
        "caught SoftTimeLimitExceeded"
    # a coroutine that holds the loop is logged with its task's name
    hog = app.send_task("aiotasks.hog", [0.5])
    assert hog.get(timeout=10) == "hogged"
    worker.wait_log(f"task aiotasks.hog[{hog.id}] blocked the event loop for")
    # self.retry inside a coroutine, and a failure with its exception
    assert app.send_task("aiotasks.flaky").get(timeout=10) == "retried 1"
    with pytest.raises(ValueError, match="async boom"):
        app.send_task("aiotasks.boom", ["async boom"]).get(timeout=10)

    # client signals ran here; sender filtering applies
    assert published[0] == ("before", os.getpid(), "aiotasks.nap", results[0].id,
                            topo.name("celery"))
    assert ("after", os.getpid(), "aiotasks.nap") in published
    assert not any(p[0] == "after" and p[2] != "aiotasks.nap" for p in published)
    signals.before_task_publish.disconnect(before)
    signals.after_task_publish.disconnect(after, sender="aiotasks.nap")

    worker.stop()
    child = str(pids.pop())
    seen = [line.split(None, 2) for line in _lines(notes)]
    by_signal = {}
    for name, pid, detail in seen:
        by_signal.setdefault(name, []).append((pid, detail))
    assert by_signal["worker_process_init"] == [(child, "-")]
    assert by_signal["worker_process_shutdown"] == [(child, f"{child}:0")]
    assert by_signal["task_prerun"].count((child, "aiotasks.nap")) == 10
    assert (child, "aiotasks.flaky:0") in by_signal["task_retry"]
    assert (child, "aiotasks.flaky:RETRY") in by_signal["task_postrun"]
    assert (child, "aiotasks.boom:ValueError") in by_signal["task_failure"]
    assert (child, "aiotasks.soft:'caught SoftTimeLimitExceeded'") in by_signal["task_success"]
    # receivers that raise are logged; the tasks still succeeded (above)
    assert "receiver _broken_receiver raised RuntimeError (ignored)" in worker.log
    assert "receiver _raises_on_success raised RuntimeError (ignored)" in worker.log


def test_a_hard_limit_kills_the_child_and_its_other_coroutines_are_redelivered(
        topo, workers, app_for, tmp_path):
    runs = tmp_path / "runs.txt"
    path = topo.config({"imports": ["aiotasks"]}, concurrency=1, async_concurrency=3)
    worker = workers(path).ready()
    app = app_for(path)
    stuck = app.send_task("aiotasks.hang", [str(runs), "stuck", 60], time_limit=1)
    others = [app.send_task("aiotasks.hang", [str(runs), f"other{i}", 1.5]) for i in range(2)]
    wait_for(lambda: len(executions(runs)) == 3, 10, message="three coroutines started")
    with pytest.raises(TimeLimitExceeded):
        stuck.get(timeout=15)
    assert [r.get(timeout=15) for r in others] == ["other0", "other1"]
    counts = executions(runs)
    assert counts["stuck"] == 1                     # failed, as a plain task's hard limit
    assert counts["other0"] == counts["other1"] == 2    # killed with it, then run again
    worker.wait_log("redelivering (delivery 2 of 3)")


def test_an_async_task_on_a_worker_of_plain_children(topo, workers, app_for):
    """worker.async_concurrency 1 (the default): the child runs one job at a time and an
    async def task on its loop, made once; plain tasks beside it as before."""
    path = topo.config({"imports": ["aiotasks", "ttasks"]}, concurrency=1)
    workers(path).ready()
    app = app_for(path)
    first = app.send_task("aiotasks.nap", [0.01]).get(timeout=10)
    assert app.send_task("ttasks.add", [2, 2]).get(timeout=10) == 4
    second = app.send_task("aiotasks.nap", [0.01]).get(timeout=10)
    assert first["pid"] == second["pid"] and second["loops"] == 1 and second["init_loop"]
    assert app.send_task("aiotasks.soft", [10], soft_time_limit=0.2).get(timeout=10) == \
        "caught SoftTimeLimitExceeded"
