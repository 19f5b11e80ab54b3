"""The pool's pipes, on real pipes and real processes, without a broker."""
import asyncio
import os
import pathlib
import signal
import sys
import time

from taskd.worker import framing
from taskd.worker import pool as pool_mod

SUPPORT = str(pathlib.Path(__file__).resolve().parent.parent / "support")


class Loop:
    """Stands in for the event loop where a test drives the pool's callbacks itself."""

    def __init__(self):
        self.writers = {}

    def add_reader(self, fd, callback, *args):
        pass

    def remove_reader(self, fd):
        pass

    def add_writer(self, fd, callback, *args):
        self.writers[fd] = (callback, args)

    def remove_writer(self, fd):
        self.writers.pop(fd, None)


def done(seq):
    return ("done", seq, "SUCCESS", b"{}", "application/json", "utf-8", 0.1, 0, None, None)


def test_a_frame_writer_keeps_what_the_pipe_cannot_take_and_never_blocks():
    r, w = os.pipe()
    os.set_blocking(w, False)
    writer = framing.FrameWriter(w)
    small = framing.encode(("job", 1))
    assert writer.send(small) is True and writer.pending == 0        # fits: out at once
    big = framing.encode(("job", "y" * 300_000))
    assert writer.send(big) is False and writer.pending > 0          # returns, does not block
    assert writer.send(small) is False                               # queued behind, in order
    got = framing.FrameReader()
    frames = []
    while writer.pending:
        frames += got.feed(os.read(r, 1 << 16))
        writer.flush()
    frames += got.feed(os.read(r, 1 << 16))
    assert frames == [("job", 1), ("job", "y" * 300_000), ("job", 1)]
    os.close(r)
    os.close(w)


def test_an_exception_in_a_pool_callback_loses_neither_that_job_nor_the_next_frames():
    handled, faults, lost = [], [], []

    def on_outcome(child, job, frame):
        if job == "a":
            raise RuntimeError("a bug while publishing a's result")
        handled.append(job)

    def on_lost(child, job, reason, unstarted):
        lost.append(job)
        raise RuntimeError("a bug while redelivering")

    p = pool_mod.Pool(Loop(), (), memory_limit=0, on_ready=None, on_outcome=on_outcome,
                      on_lost=on_lost, on_fault=faults.append)

    def busy_child(frames, jobs):
        r, w = os.pipe()
        os.set_blocking(r, False)
        pid = os.fork()
        if pid == 0:            # writes its outcomes, then exits
            os.write(w, b"".join(framing.encode(f) for f in frames))
            os._exit(0)
        os.close(w)
        c = pool_mod.Child(1, pid, 1, None, r)
        c.state, c.job = pool_mod.BUSY, jobs[0]
        c.queued.extend(jobs[1:])
        p.children[pid] = c
        return c

    # read while it runs: both frames of one chunk are handled
    c = busy_child([done(1), done(2)], ["a", "b"])
    deadline = time.monotonic() + 5
    while not handled and time.monotonic() < deadline:
        p._on_readable(c)
    assert handled == ["b"] and faults == ["a"]
    os.waitpid(c.pid, 0)
    p._on_readable(c)                       # end of file: the child is gone, reaped
    assert c.pid not in p.children

    # reaped after it died: its last outcomes are drained, and its death still handled
    handled.clear(), faults.clear()
    c = busy_child([done(1), done(2)], ["a", "b", "c"])
    deadline = time.monotonic() + 5
    while c.pid in p.children and time.monotonic() < deadline:
        p.reap()
    assert handled == ["b"] and faults == ["a", "c"] and lost == [None, "c"]


def test_an_outcome_over_the_frame_limit_kills_the_child_and_reports_its_job_lost():
    sys.path.insert(0, SUPPORT)         # the child imports ttasks after fork
    try:
        asyncio.run(asyncio.wait_for(_oversized_outcome(), 10))
    finally:
        sys.path.remove(SUPPORT)


async def _oversized_outcome():
    loop = asyncio.get_running_loop()
    ready, lost = loop.create_future(), loop.create_future()
    p = pool_mod.Pool(loop, ("ttasks",), memory_limit=0, max_frame=10_000,
                      on_ready=lambda child, names: ready.set_result(child),
                      on_outcome=lambda child, job, frame: None,
                      on_lost=lambda child, job, reason, unstarted: lost.set_result((job, reason)))
    loop.add_signal_handler(signal.SIGCHLD, p.reap)
    try:
        child = p.spawn()
        await ready
        frame = framing.encode((1, "id-1", "ttasks.echo", ["y" * 50_000], {}, {}))
        assert p.send(child, ["the job"], frame) == ["the job"]
        job, reason = await lost
        assert job == "the job"
        assert "exceeds the limit of 10000 bytes" in reason
        assert child.exit_status is not None and os.WTERMSIG(child.exit_status) == signal.SIGKILL
    finally:
        loop.remove_signal_handler(signal.SIGCHLD)
        for c in list(p.children.values()):
            p.kill(c)
