"""Signals, the test mode, and the parts of async def tasks that need no worker."""
import asyncio
import gc
import logging
import os
import time

import pytest

from taskd import App, signals
from taskd.exceptions import ConnectionError as TaskdConnectionError
from taskd.exceptions import ContentDisallowed, EncodeError, SoftTimeLimitExceeded
from taskd.worker import aiochild, framing
from taskd.worker import pool as pool_mod


# == signals ===================================================================

def test_connect_as_decorator_with_sender_and_disconnect():
    sig = signals.Signal("test_signal")
    calls = []

    @sig.connect
    def everyone(sender=None, **kwargs):
        calls.append(("everyone", sender, kwargs["value"], kwargs["signal"] is sig))

    @sig.connect(sender="only-this")
    def one(sender=None, **kwargs):
        calls.append(("one", sender))

    sig.connect(everyone)                   # connected once only
    sig.send(sender="other", value=1)
    sig.send(sender="only-this", value=2)
    assert calls == [("everyone", "other", 1, True), ("everyone", "only-this", 2, True),
                     ("one", "only-this")]
    assert sig.disconnect(one, sender="only-this") and not sig.disconnect(one)
    calls.clear()
    sig.send(sender="only-this", value=3)
    assert calls == [("everyone", "only-this", 3, True)]


def test_a_receiver_that_raises_is_logged_and_the_others_still_run(caplog):
    sig = signals.Signal("test_raising")
    ran = []

    @sig.connect
    def broken(**kwargs):
        raise RuntimeError("receiver bug")

    @sig.connect
    def fine(**kwargs):
        ran.append(True)
        return "ok"

    with caplog.at_level(logging.ERROR, logger="taskd.signals"):
        responses = sig.send(sender=None)
    assert ran == [True]
    assert isinstance(responses[0][1], RuntimeError) and responses[1] == (fine, "ok")
    assert "signal test_raising: receiver" in caplog.text and "receiver bug" in caplog.text


def test_receivers_are_weak_unless_told_otherwise():
    sig = signals.Signal("test_weak")

    def make():
        def receiver(**kwargs):
            return "here"
        return receiver

    sig.connect(make())
    strong = make()
    sig.connect(strong, weak=False, dispatch_uid="strong")
    gc.collect()
    assert sig.receivers == [strong]
    assert sig.disconnect(dispatch_uid="strong") and sig.receivers == []


# == the test mode ================================================================

@pytest.fixture(scope="module")
def eager_app():
    app = App("eager", config={"broker": {"url": "amqp://127.0.0.1:1/"}},
              set_as_current=False)

    @app.task(name="eager.add")
    def add(x, y):
        return x + y

    @app.task(name="eager.fail")
    def fail(message):
        raise KeyError(message)

    @app.task(name="eager.unencodable")
    def unencodable():
        return object()

    @app.task(name="eager.flaky", bind=True, max_retries=3)
    def flaky(self, n):
        if self.request.retries < n:
            raise self.retry(countdown=3600, args=[n])
        return self.request.retries

    @app.task(name="eager.anap")
    async def anap(x):
        await asyncio.sleep(0.01)
        return {"x": x, "loop": id(asyncio.get_running_loop()) != 0}

    @app.task(name="eager.routed", queue="elsewhere")
    def routed():
        return os.getpid()

    return app, {t.name.split(".")[1]: t for t in (add, fail, unencodable, flaky, anap,
                                                   routed)}


def test_the_test_mode_runs_in_process_and_answers_like_an_async_result(eager_app):
    app, t = eager_app
    with app.testing():
        result = t["add"].delay(2, 3)
        assert result.get() == 5 and result.state == "SUCCESS" and result.ready()
        assert result.successful() and not result.failed() and result.result == 5
        assert result.traceback is None and result.date_done
        assert t["routed"].delay().get() == os.getpid()
        assert (t["routed"].delay().route.routing_key, t["add"].delay(1, 1).route.routing_key) \
            == ("elsewhere", "celery")
        assert t["anap"].delay(4).get() == {"x": 4, "loop": True}
        # retries run again at once, countdown not waited, the retry's args honoured
        began = time.monotonic()
        flaky = t["flaky"].delay(2)
        assert flaky.get() == 2 and flaky.retries == 2 and time.monotonic() - began < 5
    with pytest.raises(TaskdConnectionError):    # outside the block: sent for real (no broker)
        t["add"].apply_async((1, 1), connect_timeout=0.5, retry=False)


def test_the_test_mode_encodes_for_real_and_failures_propagate_as_from_a_worker(eager_app):
    app, t = eager_app
    with app.testing():
        with pytest.raises(EncodeError, match="not JSON serializable"):
            t["add"].delay(object(), 1)     # the argument cannot be sent: fails at the call
        bad = t["unencodable"].delay()      # the result cannot be encoded: a FAILURE
        assert bad.state == "FAILURE" and isinstance(bad.result, EncodeError)
        failed = t["fail"].delay("missing")
        assert failed.state == "FAILURE" and failed.failed()
        with pytest.raises(KeyError, match="missing"):
            failed.get()
        assert isinstance(failed.get(propagate=False), KeyError)
        assert "raise KeyError(message)" in failed.traceback
        over = t["flaky"].delay(5)          # past max_retries (3): fails
        assert over.state == "FAILURE"
        with pytest.raises(ContentDisallowed):      # the worker's accept_content applies
            t["add"].apply_async((1, 1), serializer="pickle")
    with app.testing(propagate=True):
        with pytest.raises(KeyError, match="at once"):
            t["fail"].delay("at once")


def test_task_always_eager_in_the_configuration_and_signals_in_the_caller():
    app = App("always", config={"broker": {"url": "amqp://127.0.0.1:1/"},
                                "task_always_eager": True, "task_eager_propagates": True},
              set_as_current=False)

    @app.task(name="always.add")
    def add(x, y):
        return x + y

    @app.task(name="always.fail")
    def fail():
        raise ValueError("propagated")

    seen = []

    def prerun(sender=None, task_id=None, **kwargs):
        seen.append(("prerun", sender.name, os.getpid()))

    def before(sender=None, headers=None, **kwargs):
        headers["x-traced"] = "yes"     # a receiver's change reaches the message
        seen.append(("before", sender))

    def postrun(sender=None, task=None, **kwargs):
        seen.append(("postrun", task.request.headers.get("x-traced"), kwargs["state"]))

    signals.task_prerun.connect(prerun)
    signals.before_task_publish.connect(before)
    signals.task_postrun.connect(postrun)
    try:
        assert add.delay(1, 2).get() == 3
        with pytest.raises(ValueError, match="propagated"):
            fail.delay()
    finally:
        signals.task_prerun.disconnect(prerun)
        signals.before_task_publish.disconnect(before)
        signals.task_postrun.disconnect(postrun)
    assert seen[:3] == [("before", "always.add"), ("prerun", "always.add", os.getpid()),
                        ("postrun", "yes", "SUCCESS")]


# == async def tasks: the pieces ===================================================

def test_the_soft_limit_raises_inside_the_coroutine_and_a_blocking_step_is_logged(caplog):
    async def waits():
        try:
            await asyncio.sleep(5)
        except SoftTimeLimitExceeded as exc:
            await asyncio.sleep(0)          # it may still await while cleaning up
            return f"cleaned up after {exc}"

    async def blocks():
        time.sleep(0.15)
        await asyncio.sleep(0)
        return "done"

    async def main():
        return await asyncio.gather(aiochild.Guarded(waits(), "t.waits[1]", 0.05),
                                    aiochild.Guarded(blocks(), "t.blocks[2]", None))

    aiochild.configure(0.1)
    try:
        with caplog.at_level(logging.WARNING, logger="taskd.child"):
            assert asyncio.run(main()) == ["cleaned up after soft time limit (0.05s) exceeded",
                                           "done"]
    finally:
        aiochild.configure(1.0)
    assert "task t.blocks[2] blocked the event loop for" in caplog.text
    assert "t.waits" not in caplog.text


class _Job:
    def __init__(self, seq):
        self.seq = seq


def test_a_child_with_slots_runs_several_jobs_and_outcomes_match_by_seq():
    r, w = os.pipe()
    lost, done = [], []
    p = pool_mod.Pool(None, (), memory_limit=0, on_ready=None,
                      on_outcome=lambda c, job, outcome: done.append(job.seq),
                      on_lost=lambda c, job, reason, unstarted: lost.append(
                          (job and job.seq, [j.seq for j in unstarted])))
    try:
        c = pool_mod.Child(1, 4242, 1, w, None, slots=3)
        c.state = pool_mod.IDLE
        p.children[c.pid] = c
        assert p.room(2) == {c: 6}
        jobs = [_Job(i) for i in range(5)]
        assert p.send(c, jobs[:4], b"x") == jobs[:3] and list(c.queued) == [jobs[3]]
        assert p.room(2) == {c: 2}
        p._on_outcome(c, framing.Outcome(1, "SUCCESS", b"", "", "", 0, 0, None, None))
        assert done == [1] and list(c.running) == [jobs[0], jobs[2], jobs[3]]
        assert p.send(c, [jobs[4]], b"x") == [] and list(c.queued) == [jobs[4]]
        p._died(c, None)        # killed: the job, its sibling coroutines and the queued one
        assert lost == [(0, [4]), (2, []), (3, [])]
        assert c.to_child is None           # the pool closed its end of the job pipe
    finally:
        os.close(r)
