"""The adaptive child window: the pure rules (clock passed in), the dispatcher writing
one job ahead only behind a short task, only a short one, in order, and the consumer's
QoS deepening while every recent task was short."""
import asyncio
import os
import time
import types

from taskd import config as config_mod, protocol
from taskd.worker.childstate import BUSY, Child
from taskd.worker.consumer import Consumer, prefetch_deep
from taskd.worker.pool import Pool
from taskd.worker.window import DEEP_STREAK, MEMORY, STREAK, Window

from test_worker_parts import StubConn, deliver, parts


def teach(window, name, runtime, times, now):
    for _ in range(times):
        window.ran(name, runtime, now)


def test_a_name_counts_short_only_after_a_streak_of_short_runs():
    w = Window(0.02)
    assert not w.is_short("t.a", 100.0)                 # never seen: depth 1
    teach(w, "t.a", 0.001, STREAK - 1, 100.0)
    assert not w.is_short("t.a", 100.0)
    w.ran("t.a", 0.001, 100.0)
    assert w.is_short("t.a", 100.0)


def test_one_long_run_falls_back_at_once_and_the_window_comes_back_after_memory():
    w = Window(0.02)
    teach(w, "t.a", 0.001, STREAK, 100.0)
    w.ran("t.a", 0.5, 101.0)                            # one long run
    assert not w.is_short("t.a", 101.0)
    teach(w, "t.a", 0.001, STREAK, 102.0)               # short again, but recently long
    assert not w.is_short("t.a", 101.0 + MEMORY - 1)
    assert w.is_short("t.a", 101.0 + MEMORY)
    w.ran("t.a", 0.02, 200.0)                           # the bound itself is long
    assert not w.is_short("t.a", 200.0 + MEMORY)        # and the streak starts over


def test_nothing_waits_behind_a_task_that_has_run_past_the_bound_or_when_off():
    w = Window(0.02)
    teach(w, "t.a", 0.001, STREAK, 100.0)
    assert w.behind("t.a", started=99.99, now=100.0)
    assert not w.behind("t.a", started=99.9, now=100.0)     # running 100 ms so far
    assert not w.behind("t.b", started=100.0, now=100.0)    # a name not known short
    w.short = 0.0                                           # worker.child_prefetch_adaptive: 0
    assert not w.is_short("t.a", 100.0) and not w.behind("t.a", 100.0, 100.0)


class Running:
    def __init__(self, task_name):
        self.task_name = task_name


class Children:
    """Two busy children with real (non-blocking) job pipes, in a real Pool."""

    def __init__(self, loop):
        self.pool = Pool(loop, (), memory_limit=0, on_ready=None, on_outcome=None,
                         on_lost=None)
        self.fds = []
        for pid in (101, 102):
            r, w = os.pipe()
            os.set_blocking(w, False)
            self.fds += [r, w]
            child = Child(pid - 100, pid, 1, w, None)
            child.state = BUSY
            self.pool.children[pid] = child

    def run(self, pid, name, started):
        child = self.pool.children[pid]
        child.running = {Running(name): started}
        return child

    def close(self):
        for fd in self.fds:
            os.close(fd)


def with_window(adaptive=0.02, max_tasks=0):
    config = config_mod.loads("worker:\n  dead_letter_queue: dlq\n  child_prefetch_adaptive: "
                              f"{adaptive}\n  max_tasks_per_child: {max_tasks}\n")

    async def main(check):
        p = parts(asyncio.get_running_loop())
        kids = Children(asyncio.get_running_loop())
        p.dispatcher.pool = kids.pool
        p.dispatcher.config = config
        teach(p.dispatcher.window, "t.short", 0.001, STREAK, time.monotonic())
        p.dispatcher.window.ran("t.long", 5.0, time.monotonic())
        try:
            check(p, kids)
        finally:
            kids.close()
    return main


def test_a_short_job_is_written_ahead_only_to_the_child_running_a_short_task():
    def check(p, kids):
        now = time.monotonic()
        short_child = kids.run(101, "t.short", now)
        long_child = kids.run(102, "t.long", now)
        deliver(p, 1, protocol.encode_task("id-1", "t.short", [], {}))
        deliver(p, 2, protocol.encode_task("id-2", "t.short", [], {}))
        assert [j.task_id for j in short_child.queued] == ["id-1"]
        assert not long_child.queued                    # never behind a long task
        assert [j.task_id for j in p.dispatcher.ready] == ["id-2"]     # one ahead at most
    asyncio.run(with_window()(check))


def test_no_job_is_written_ahead_behind_a_task_running_past_the_bound():
    def check(p, kids):
        child = kids.run(101, "t.short", time.monotonic() - 1.0)  # short name, running 1 s
        kids.pool.children.pop(102)
        deliver(p, 1, protocol.encode_task("id-1", "t.short", [], {}))
        assert not child.queued and len(p.dispatcher.ready) == 1
    asyncio.run(with_window()(check))


def test_a_long_or_unknown_job_is_not_written_ahead_and_keeps_its_place_in_line():
    def check(p, kids):
        child = kids.run(101, "t.short", time.monotonic())
        kids.pool.children.pop(102)
        deliver(p, 1, protocol.encode_task("id-1", "t.long", [], {}))
        deliver(p, 2, protocol.encode_task("id-2", "t.short", [], {}))
        deliver(p, 3, protocol.encode_task("id-3", "t.new", [], {}))
        assert not child.queued                         # the long one first: nothing jumps it
        assert [j.task_id for j in p.dispatcher.ready] == ["id-1", "id-2", "id-3"]
    asyncio.run(with_window()(check))


def test_with_the_window_off_a_child_holds_only_what_it_runs():
    def check(p, kids):
        child = kids.run(101, "t.short", time.monotonic())
        kids.pool.children.pop(102)
        deliver(p, 1, protocol.encode_task("id-1", "t.short", [], {}))
        assert not child.queued and len(p.dispatcher.ready) == 1
    asyncio.run(with_window(0)(check))


def test_the_window_learns_from_the_outcomes_the_dispatcher_is_told_of():
    p = parts(asyncio.new_event_loop())
    job = types.SimpleNamespace(task_name="t.a")
    for _ in range(STREAK):
        p.dispatcher.ran(job, 0.001)
    assert p.dispatcher.window.is_short("t.a", time.monotonic())
    p.dispatcher.ran(job, 1.0)
    assert not p.dispatcher.window.is_short("t.a", time.monotonic())


def test_the_qos_deepens_after_a_streak_of_short_runs_and_returns_at_one_long_run():
    w = Window(0.02)
    for i in range(DEEP_STREAK - 1):
        w.ran(f"t.{i % 3}", 0.001, 100.0)               # any task names count
    assert not w.deep(100.0)
    w.ran("t.a", 0.001, 100.0)
    assert w.deep(100.0)
    w.ran("t.b", 1.0, 101.0)                            # one long run: back at once
    assert not w.deep(101.0)
    teach(w, "t.a", 0.001, DEEP_STREAK, 102.0)
    assert not w.deep(101.0 + MEMORY - 1) and w.deep(101.0 + MEMORY)
    w.short = 0.0
    assert not w.deep(500.0)


def test_the_dispatcher_tells_the_consumer_only_when_the_verdict_changes():
    p = parts(asyncio.new_event_loop())
    told = []
    p.dispatcher.deepen = told.append
    job = types.SimpleNamespace(task_name="t.a")
    for _ in range(DEEP_STREAK + 5):
        p.dispatcher.ran(job, 0.001)
    p.dispatcher.ran(job, 0.5)
    p.dispatcher.ran(job, 0.001)
    assert told == [True, False]


def test_the_consumer_adds_the_deep_slots_to_its_qos_and_removes_them():
    config = config_mod.loads("worker:\n  concurrency: 2\n")
    assert prefetch_deep(2, config) == 2 * (16 - 4)     # the defaults
    assert prefetch_deep(2, config_mod.loads("worker:\n  child_prefetch_adaptive: 0\n")) == 0
    assert prefetch_deep(2, config_mod.loads("worker:\n  async_concurrency: 10\n")) == 0
    assert prefetch_deep(2, config_mod.loads("worker:\n  prefetch_multiplier: 32\n")) == 0
    c = Consumer(None, None, None, config)
    c.conn, c.base = StubConn(), 8
    c.deepen(24)
    c.deepen(24)                                        # unchanged: no new basic.qos
    c.hold(3)
    c.deepen(0)
    assert [kw["prefetch_count"] for _, _, kw in c.conn.channel.sent] == [8 + 24, 8 + 24 + 11, 8 + 11]


def test_no_job_is_written_ahead_to_a_child_retired_after_its_current_task():
    def check(p, kids):
        last = kids.run(101, "t.short", time.monotonic())
        last.tasks_done = 4                             # its 5th task runs: then replaced
        other = kids.run(102, "t.short", time.monotonic())
        other.tasks_done = 3
        deliver(p, 1, protocol.encode_task("id-1", "t.short", [], {}))
        deliver(p, 2, protocol.encode_task("id-2", "t.short", [], {}))
        assert not last.queued and [j.task_id for j in other.queued] == ["id-1"]
    asyncio.run(with_window(max_tasks=5)(check))
