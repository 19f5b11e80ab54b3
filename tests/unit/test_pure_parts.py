"""Framing, ack batching and the schedule: pure parts, tested directly."""
import os

from taskd.worker import framing
from taskd.worker.acker import AckTracker
from taskd.worker.schedule import Schedule


def test_frames_survive_arbitrary_chunking():
    objs = [("done", i, "x" * i) for i in range(50)]
    data = b"".join(framing.encode(o) for o in objs)
    reader, got = framing.FrameReader(), []
    for i in range(0, len(data), 7):
        got += reader.feed(data[i:i + 7])
    assert got == objs and reader.pending == 0


def test_blocking_frame_read_over_a_real_pipe():
    r, w = os.pipe()
    framing.write_all(w, framing.encode({"a": 1}) + framing.encode([2]))
    os.close(w)
    assert list(framing.iter_frames(r)) == [{"a": 1}, [2]]     # ends at end of file
    os.close(r)


def test_frame_reads_take_whatever_the_pipe_holds_and_wait_for_the_rest():
    frames = [("job", i, "x" * 100) for i in range(5)]
    data = b"".join(framing.encode(f) for f in frames)
    chunks = [data[:3], data[3:250], data[250:], b""]       # what successive reads return
    reads = []

    def read(fd, n):
        reads.append(n)
        return chunks.pop(0)
    assert list(framing.iter_frames(0, read=read)) == frames
    assert len(reads) == 4          # one read per chunk, however many frames it holds


def test_acks_batch_the_contiguous_run():
    t = AckTracker()
    for tag in range(1, 6):
        t.received(tag)
    for tag in (1, 2, 3):
        t.completed(tag)
    assert t.pending == 3
    assert t.flush() == [(3, True)]
    assert len(t) == 2 and t.pending == 0


def test_acks_do_not_hold_completed_tags_behind_a_running_one():
    t = AckTracker()
    for tag in range(1, 5):
        t.received(tag)
    t.completed(2)
    t.completed(4)
    assert t.flush() == [(2, False), (4, False)]
    t.completed(1)
    assert t.flush() == [(1, True)]     # 2 was acked already: not covered twice
    t.completed(3)
    assert t.flush() == [(3, True)]
    assert len(t) == 0


def test_acks_skip_forgotten_tags():
    t = AckTracker()
    for tag in (1, 2, 3):
        t.received(tag)
    t.forget(1)
    t.completed(2)
    t.completed(3)
    assert t.flush() == [(3, True)]


def test_schedule_releases_in_due_order():
    s = Schedule()
    s.hold(5.0, "b")
    s.hold(1.0, "a")
    s.hold(9.0, "c")
    assert s.next_due() == 1.0
    assert s.pop_due(4.9) == ["a"]
    assert s.pop_due(9.0) == ["b", "c"]
    assert len(s) == 0 and s.next_due() is None


def test_reconnect_backoff_grows_with_jitter_to_a_cap():
    from taskd.worker.recovery import backoff
    delays = [backoff(n, base=0.5, cap=10, rng=lambda: 1.0) for n in range(8)]
    assert delays[:3] == [0.5, 1.0, 2.0] and max(delays) == 10.0
    assert backoff(3, rng=lambda: 0.0) == 2.0          # jitter keeps at least half


def test_parking_buckets():
    from taskd.worker import parking
    assert parking.bucket_for(0.5) is None
    assert parking.bucket_for(5.5) == 4
    assert parking.bucket_for(86400) == 65536
    assert parking.bucket_for(10 ** 9) == 2 ** 22
    assert parking.should_park(700, held=0, horizon=600, max_held=10) is True
    assert parking.should_park(60, held=0, horizon=600, max_held=10) is False
    assert parking.should_park(60, held=10, horizon=600, max_held=10) is True
    assert parking.should_park(0.5, held=10, horizon=600, max_held=10) is False


def test_pool_room_and_a_batch_written_at_once():
    from taskd.worker import pool as pool_mod
    p = pool_mod.Pool(None, (), memory_limit=0, on_ready=None, on_outcome=None, on_lost=None)
    pipes = []

    def child(index, state, generation=1, queued=0):
        r, w = os.pipe()
        pipes.append((r, w))
        c = pool_mod.Child(index, 1000 + index, generation, w, None)
        c.state = state
        if state == pool_mod.BUSY:
            c.job = f"running-{index}"
        c.queued.extend(f"q{index}-{i}" for i in range(queued))
        p.children[c.pid] = c
        return c
    idle, busy, full = child(1, pool_mod.IDLE), child(2, pool_mod.BUSY), child(3, pool_mod.BUSY, queued=2)
    child(4, pool_mod.RETIRING)
    child(5, pool_mod.IDLE, generation=0)          # from before a reload
    assert p.room(3) == {idle: 3, busy: 2}
    assert p.room(1) == {idle: 1}

    frames = [framing.encode(("job", i)) for i in range(3)]
    started = p.send(idle, ["a", "b", "c"], b"".join(frames))
    assert started == ["a"] and idle.job == "a" and list(idle.queued) == ["b", "c"]
    assert idle.state == pool_mod.BUSY
    assert framing.FrameReader().feed(os.read(pipes[0][0], 1 << 16)) == [("job", i) for i in range(3)]
    assert p.send(busy, ["d"], frames[0]) == [] and list(busy.queued) == ["d"]
    for r, w in pipes:
        os.close(r)
        os.close(w)


def test_a_child_retired_while_importing_gets_no_work_when_it_is_ready():
    from taskd.worker import pool as pool_mod
    ready = []
    p = pool_mod.Pool(None, (), memory_limit=0, on_ready=lambda c, names: ready.append(c),
                      on_outcome=None, on_lost=None)
    r, w = os.pipe()
    old = pool_mod.Child(1, 1001, 1, w, None)
    p.children[old.pid] = old
    p.retire(old)                       # a reload while it was still importing
    assert old.state == pool_mod.RETIRING and old.to_child is None
    p.generation += 1
    new = pool_mod.Child(1, 1002, 2, None, None)
    p.children[new.pid] = new
    p._on_frame(old, ("ready", old.pid, {"old.task": (None, None)}))
    p._on_frame(new, ("ready", new.pid, {"new.task": (None, None)}))
    assert old.state == pool_mod.RETIRING and new.state == pool_mod.IDLE
    assert ready == [new]                       # the old one's task list is not taken
    assert p.room(1) == {new: 1}
    os.close(r)
