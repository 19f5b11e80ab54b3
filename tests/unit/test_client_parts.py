"""Pure parts of the client: exception rebuilding, the session lock, option checks."""
import asyncio
import math
import threading
import time

import pytest

from taskd import App, exceptions
from taskd.app import ProcessLocal, TurnLock
from taskd.exceptions import OptionError, RemoteError


@pytest.mark.parametrize("exc_type, exc_module", [
    ("SystemExit", "builtins"), ("KeyboardInterrupt", "builtins"),
    ("GeneratorExit", "builtins"), ("CancelledError", "asyncio.exceptions"),
    ("CancelledError", "asyncio"),
])
def test_a_result_cannot_raise_what_except_exception_does_not_catch(exc_type, exc_module):
    exc = exceptions.dict_to_exception({"exc_type": exc_type, "exc_module": exc_module,
                                      "exc_message": ["remote text"]})
    assert isinstance(exc, RemoteError) and isinstance(exc, Exception)
    assert type(exc).__name__ == exc_type and exc.remote_type == f"{exc_module}.{exc_type}"
    assert str(exc) == "remote text"
    # an unpickled instance is mapped the same way
    rebuilt = exceptions.dict_to_exception(asyncio.CancelledError("x"))
    assert isinstance(rebuilt, RemoteError) and not isinstance(rebuilt, asyncio.CancelledError)
    # real exception classes are still rebuilt
    assert type(exceptions.dict_to_exception({"exc_type": "ValueError", "exc_module": "builtins",
                                            "exc_message": ["v"]})) is ValueError


def test_synthetic_exception_classes_are_bounded():
    for i in range(exceptions.SYNTHETIC_CLASSES_MAX * 3):
        exceptions.dict_to_exception({"exc_type": f"E{i}", "exc_module": "not.imported",
                                    "exc_message": []})
    assert len(exceptions._synthetic) <= exceptions.SYNTHETIC_CLASSES_MAX


def test_threads_that_first_touch_the_session_together_share_one():
    made = []

    def slow_factory():
        time.sleep(0.05)
        made.append(object())
        return made[-1]

    local = ProcessLocal(slow_factory)
    barrier = threading.Barrier(8)
    got = []

    def touch():
        barrier.wait()
        got.append(local.get())

    threads = [threading.Thread(target=touch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and all(g is made[0] for g in got)


def test_the_session_lock_is_handed_over_in_arrival_order():
    lock = TurnLock()
    order = []
    lock.acquire()
    lock.acquire()          # reentrant
    waiting = []

    def take(name):
        waiting.append(name)
        with lock:
            order.append(name)

    threads = []
    for name in ("a", "b", "c"):
        t = threading.Thread(target=take, args=(name,))
        t.start()
        threads.append(t)
        while len(waiting) < len(threads) or lock._next < len(threads) + 1:
            time.sleep(0.001)
    lock.release()
    assert not order        # still held once
    lock.release()
    for t in threads:
        t.join()
    assert order == ["a", "b", "c"]


@pytest.mark.parametrize("option, value", [
    ("countdown", math.nan), ("countdown", math.inf), ("countdown", 1e300),
    ("countdown", -1e300), ("expires", math.nan), ("expires", -math.inf), ("expires", 1e20),
])
def test_unusable_countdown_or_expires_is_a_clear_error_naming_the_option(option, value):
    app = App("t", broker="amqp://guest:guest@127.0.0.1:1/", set_as_current=False)
    with pytest.raises(OptionError, match=option):
        app.send_task("tasks.add", [1, 1], **{option: value})
