"""Periodic tasks on real workers and the real broker: one leader at a time, another
within seconds when it is killed or cut off, no slot run twice, a reload that changes
the schedule. The task queue is consumed by a worker that never leads and is never
killed, so that a duplicate could only come from the schedule itself."""
import signal
import time
from datetime import datetime, timedelta

import pytest

from conftest import wait_for
from taskd.worker import control
from tcpproxy import Proxy

pytestmark = pytest.mark.broker


def records(path):
    """[(slot datetime, task id, entry, supervisor pid)] in the order they ran."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        slot, task_id, entry, pid = line.split()
        out.append((datetime.fromisoformat(slot), task_id, entry, int(pid)))
    return out


def config(topo, path, beat=True, queues=("idle",), entries=None, broker=None, name=None,
           **worker):
    entries = entries if entries is not None else {"rec": 1}
    schedule = {name: {"task": "ttasks.periodic_record", "every": every,
                       "args": [str(path)], "options": {"queue": topo.name("work")}}
                for name, every in entries.items()}
    beat_queue = topo.name("beat")
    topo.queues.add(beat_queue)
    data = {"queues": [{"name": "work"}, {"name": "idle"}], "schedule": schedule}
    if broker:
        data["broker"] = broker
    return topo.config(data,
                       name=name or f"taskd-{'beat' if beat else 'runner'}-{len(entries)}.yaml",
                       beat=beat, beat_queue=beat_queue, queues=list(queues), concurrency=1,
                       **worker)


def leader_of(candidates):
    leading = [w for w in candidates if "leading the schedule" in w.log]
    return leading[0] if len(leading) == 1 else None


def one_leader(candidates, timeout=10):
    try:
        return wait_for(lambda: leader_of(candidates), timeout, message="one leader")
    except AssertionError as exc:
        logs = "\n".join(f"--- worker {w.pid}:\n{w.log}" for w in candidates)
        raise AssertionError(f"{exc}\n{logs}") from None


def check_slots(recs, gap_allowed):
    """Each slot ran once; slots follow each other by 1 s but for at most one gap."""
    slots = [r[0] for r in recs]
    assert len(slots) == len(set(slots)), f"a slot ran twice: {sorted(slots)}"
    ids = [r[1] for r in recs]
    assert len(ids) == len(set(ids))
    steps = [b - a for a, b in zip(sorted(slots), sorted(slots)[1:])]
    gaps = [s for s in steps if s != timedelta(seconds=1)]
    assert len(gaps) <= 1 and all(g <= gap_allowed for g in gaps), (gaps, sorted(slots))


def test_the_leader_killed_the_other_takes_over_and_no_slot_runs_twice(topo, workers,
                                                                        tmp_path):
    path = tmp_path / "runs"
    runner = workers(config(topo, path, beat=False, queues=("work",)))
    beat_config = config(topo, path)
    a, b = workers(beat_config), workers(beat_config)
    for w in (runner, a, b):
        w.ready()
    leader = one_leader([a, b])
    other = b if leader is a else a
    wait_for(lambda: len(records(path)) >= 3, 10, message="three runs")
    leader.proc.kill()                                  # SIGKILL
    killed_at = time.monotonic()
    other.wait_log("leading the schedule", timeout=10)
    took_over = time.monotonic() - killed_at
    print(f"took over {took_over:.2f}s after the SIGKILL")
    assert took_over < 5, took_over
    before = len(records(path))
    wait_for(lambda: len(records(path)) >= before + 3, 10, message="three runs after")
    runner.stop()
    recs = records(path)
    assert {r[2] for r in recs} == {"rec"}
    check_slots(recs, gap_allowed=timedelta(seconds=took_over + 2))
    assert {r[3] for r in recs} == {runner.pid}       # only the runner ran them


def test_a_leader_cut_off_from_the_broker_stops_and_another_leads(topo, workers, tmp_path,
                                                                   request):
    proxy = Proxy().start()
    request.addfinalizer(proxy.stop)
    path = tmp_path / "runs"
    runner = workers(config(topo, path, beat=False, queues=("work",)))
    cut_off = workers(config(topo, path), env={"TASKD_BROKER_URL": proxy.url})
    cut_off.ready()
    runner.ready()
    cut_off.wait_log("leading the schedule", timeout=10)
    other = workers(config(topo, path)).ready()
    wait_for(lambda: len(records(path)) >= 3, 10, message="three runs")
    proxy.cut()
    cut_at = time.monotonic()
    other.wait_log("leading the schedule", timeout=10)
    took_over = time.monotonic() - cut_at
    print(f"took over {took_over:.2f}s after the cut")
    assert took_over < 5, took_over
    assert "lost the broker connection while leading" in cut_off.log
    before = len(records(path))
    wait_for(lambda: len(records(path)) >= before + 3, 10, message="three runs after")
    cut_off.stop()
    runner.stop()
    recs = records(path)
    check_slots(recs, gap_allowed=timedelta(seconds=took_over + 2))
    assert {r[3] for r in recs} == {runner.pid}


def test_a_leader_whose_connection_hangs_stops_firing_and_another_leads(topo, workers,
                                                                         tmp_path, request):
    proxy = Proxy().start()
    request.addfinalizer(proxy.stop)
    path = tmp_path / "runs"
    runner = workers(config(topo, path, beat=False, queues=("work",)))
    hung = workers(config(topo, path, broker={"url": proxy.url, "heartbeat": 2}, name="hung"))
    runner.ready()
    hung.ready()
    hung.wait_log("leading the schedule", timeout=10)
    other = workers(config(topo, path)).ready()
    wait_for(lambda: len(records(path)) >= 3, 10, message="three runs")
    proxy.freeze()                  # nothing more is forwarded, nothing is closed
    frozen_at = time.monotonic()
    other.wait_log("leading the schedule", timeout=20)
    took_over = time.monotonic() - frozen_at
    print(f"took over {took_over:.2f}s after the freeze")
    assert ("no tick of this worker came back" in hung.log
            or "lost the broker connection while leading" in hung.log), hung.log
    before = len(records(path))
    wait_for(lambda: len(records(path)) >= before + 3, 10, message="three runs after")
    hung.proc.kill()                # its stop would wait for close-oks on frozen sockets
    runner.stop()
    check_slots(records(path), gap_allowed=timedelta(seconds=took_over + 2))


def test_a_reload_adds_an_entry_and_removes_another(topo, workers, tmp_path):
    path = tmp_path / "runs"
    runner = workers(config(topo, path, beat=False, queues=("work",)))
    sock = tmp_path / "beat.sock"
    first = config(topo, path, entries={"old": 1}, control_socket=str(sock))
    w = workers(first)
    runner.ready()
    w.ready()
    wait_for(lambda: len(records(path)) >= 2, 10, message="runs of the old entry")
    status = control.format_status(control.query(str(sock)))
    assert "schedule:   LEADING" in status and "  old: ttasks.periodic_record every 1s; last 20" \
        in status, status
    first.write_text(config(topo, path, entries={"new": 1, "also": 3},
                            control_socket=str(sock)).read_text())
    w.signal(signal.SIGHUP)
    w.wait_log("entry old is not in the schedule any more", timeout=10)
    wait_for(lambda: "new" in {r[2] for r in records(path)}, 10, message="a run of new")
    switched = len(records(path))
    wait_for(lambda: len(records(path)) >= switched + 2, 10, message="more runs of new")
    runner.stop()
    recs = records(path)
    entries = [r[2] for r in recs]
    assert "old" not in entries[switched:], entries
    assert "new" in entries
    for name in ("old", "new"):
        check_slots([r for r in recs if r[2] == name], gap_allowed=timedelta(0))
    state = control.query(str(sock))["beat"]
    assert sorted(e["name"] for e in state["entries"]) == ["also", "new"] and state["leading"]
