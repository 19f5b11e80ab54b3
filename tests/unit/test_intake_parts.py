"""The intake's pure parts: what it refuses, and how it recognises work done before."""
import re
import types

import pytest

from taskd import protocol, serialization
from taskd.exceptions import DecodeError, InvalidTaskMessage
from taskd.worker import jobs
from taskd.worker.recovery import RecentlyDone, delivery_key
from taskd.worker.strikes import Strikes, message_digest


def _request(task_id="daily-report", body=b"[[],{},{}]", **headers):
    h = {"task": "ttasks.add", "id": task_id, **headers}
    return protocol.decode_task(h, body, "application/json"), body


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# -- the duplicate record -------------------------------------------------------------

def test_a_reused_task_id_with_other_arguments_is_another_delivery():
    monday, tuesday = _request(body=b'[["monday"],{},{}]'), _request(body=b'[["tuesday"],{},{}]')
    assert delivery_key(*monday) != delivery_key(*tuesday)
    assert delivery_key(*monday) == delivery_key(*_request(body=b'[["monday"],{},{}]'))
    copy = _request(body=b'[["monday"],{},{}]', **{"x-taskd-copy": "c1"})
    later = _request(body=b'[["monday"],{},{}]', eta="2030-01-01T00:00:00")
    retried = _request(body=b'[["monday"],{},{}]', retries=1)
    keys = {delivery_key(*r) for r in (monday, copy, later, retried)}
    assert len(keys) == 4


def test_the_record_answers_only_for_deliveries_of_a_lost_channel():
    done = RecentlyDone()
    done.add(b"k", done.epoch, (b"result", "props"))
    assert done.find(b"k", done.epoch) is None       # same channel: a new message
    done.next_channel()
    assert done.find(b"k", done.epoch).result == (b"result", "props")
    assert done.find(b"other", done.epoch) is None


def test_the_record_is_bounded_in_bytes_and_entries():
    done = RecentlyDone(max_entries=1000, max_bytes=10 * 1024 + 5000, max_result=1024)
    for i in range(100):
        done.add(b"k%d" % i, 0, (b"x" * 1024, "props"))
    assert done.bytes <= 10 * 1024 + 5000 and 5 <= len(done) < 15
    done.next_channel()
    assert done.find(b"k99", 1) is not None and done.find(b"k0", 1) is None
    done.add(b"big", 1, (b"x" * 1025, "props"))      # too big to keep: remembered without
    done.next_channel()
    assert done.find(b"big", 2).result is None
    few = RecentlyDone(max_entries=3)
    for i in range(5):
        few.add(b"k%d" % i, 0)
    assert len(few) == 3


def test_entries_expire_after_max_age_or_after_their_channel_was_replaced():
    clock = Clock()
    done = RecentlyDone(max_age=600, clock=clock)
    done.add(b"old", 0)
    clock.now += 500
    done.add(b"new", 0)
    clock.now += 200                    # "old" finished 700 s ago on a live channel
    done.next_channel()
    assert done.find(b"old", 1) is None and done.find(b"new", 1) is not None
    clock.now += 550                    # "new" is kept 600 s after the channel changed
    assert done.find(b"new", 1) is not None
    clock.now += 100
    assert done.find(b"new", 1) is None and len(done) == 0


# -- internal errors ----------------------------------------------------------------

def test_a_message_that_keeps_causing_internal_errors_strikes_out():
    strikes = Strikes(limit=3, size=2)
    digest = message_digest("id-1", b"body")
    assert [strikes.add(digest) for _ in range(3)] == [False, False, True]
    assert strikes.add(digest) is False                  # counted afresh after a verdict
    for i in range(5):
        strikes.add(message_digest(f"other-{i}", b"body"))
    assert len(strikes) == 2


# -- header validation ------------------------------------------------------------

@pytest.mark.parametrize("headers, match", [
    ({"id": ["unhashable"]}, "header 'id' must be a string"),
    ({"retries": ["x"]}, "retries"),
    ({"root_id": {"a": 1}}, "header 'root_id' must be a string"),
    ({"group": 5}, "header 'group' must be a string"),
])
def test_headers_of_the_wrong_type_are_refused_before_use(headers, match):
    with pytest.raises(InvalidTaskMessage, match=match):
        protocol.decode_task({"task": "t", "id": "x", **headers}, b"[[],{},{}]",
                             "application/json")


@pytest.mark.parametrize("value", [["c"], {"a": 1}, 5, b"raw"])
def test_a_copy_id_that_is_not_a_string_is_refused(value):
    with pytest.raises(InvalidTaskMessage, match="x-taskd-copy"):
        jobs.check_headers({"x-taskd-copy": value})


@pytest.mark.parametrize("value", [True, "3", 1.5, [1], 1 << 40])
def test_a_delivery_count_that_is_not_a_count_is_refused(value):
    with pytest.raises(InvalidTaskMessage, match="x-taskd-delivery-count"):
        jobs.check_headers({"x-taskd-delivery-count": value})


@pytest.mark.parametrize("value, count", [(-3, 1), (-10 ** 9, 1), (0, 1), (2, 3),
                                          ("x", 1), (True, 1), (1 << 40, 1)])
def test_a_negative_delivery_count_counts_as_zero(value, count):
    props = types.SimpleNamespace(headers={"x-taskd-delivery-count": value})
    job = jobs.Job(1, 1, None, "q", "", "q", props, b"")
    assert job.delivery_count == count
    jobs.check_headers({"x-taskd-delivery-count": -3})   # a negative count is not refused


def test_a_bad_message_is_described_without_touching_its_odd_headers():
    deep = []
    for _ in range(5000):
        deep = [deep]
    props = types.SimpleNamespace(headers={"id": deep, "task": ["x"]}, correlation_id=None)
    job = jobs.Job(1, 1, None, "q", "", "q", props, b"")
    assert job.describe() == "?[?]"


# -- bodies -------------------------------------------------------------------------------

def test_workflow_steps_are_kept_and_what_a_worker_cannot_run_is_refused_whole():
    step = {"task": "b", "args": [], "kwargs": {}, "options": {}, "subtask_type": None}
    for embed in ({"callbacks": [step], "errbacks": None, "chain": None, "chord": None},
                  {"chain": [step, dict(step, task="c")]}, {"chord": step}):
        body = serialization.json_dumps([[1], {}, embed])
        request = protocol.decode_task({"task": "a", "id": "x"}, body, "application/json")
        assert request.embed == {k: v for k, v in embed.items() if v}
    for embed, refused in [({"chain": [dict(step, subtask_type="group")]}, "'group' signature"),
                           ({"callbacks": [step], "stamps": [1]}, "unknown workflow field"),
                           ({"chain": [{"args": []}]}, "not a task signature"),
                           ({"chain": [dict(step, options={"link": [{"x": 1}]})]},
                            "not a task signature"),
                           ({"errbacks": "b"}, "must be a list")]:
        body = serialization.json_dumps([[1], {}, embed])
        with pytest.raises(InvalidTaskMessage, match=refused):
            protocol.decode_task({"task": "a", "id": "x"}, body, "application/json")
    empty = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    for embed in (empty, {}, None, {"chain": []}):
        body = serialization.json_dumps([[1], {}, embed])
        assert protocol.decode_task({"task": "a", "id": "x"}, body, "application/json").args == (1,)
    with pytest.raises(InvalidTaskMessage, match="must be a mapping, got list"):
        protocol.decode_task({"task": "a", "id": "x"}, b"[[],{},[1]]", "application/json")


def test_yaml_aliases_are_refused_so_an_alias_bomb_cannot_expand():
    bomb = b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
           b"c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    with pytest.raises(DecodeError, match="aliases are not accepted"):
        serialization.loads(bomb, "application/x-yaml")
    shared = [1, 2]
    body, ctype, _ = serialization.dumps([[shared, shared], {}, None], "yaml")
    assert b"*" not in body and serialization.loads(body, ctype) == [[[1, 2], [1, 2]], {}, None]


# -- the log ------------------------------------------------------------------------------

def test_sender_text_cannot_forge_a_log_line_or_reach_the_terminal():
    import logging
    from taskd.logsafe import Formatter
    name = "ttasks.add\n[2026-01-01 00:00:00] INFO taskd.supervisor[1]: task x succeeded" \
           "\x1b[2J\r\x9b\u2028"
    record = logging.LogRecord("taskd.supervisor", logging.ERROR, __file__, 1,
                               "dead-lettering task %s: %s", (name, "bad"), None)
    line = Formatter("[%(levelname)s] %(message)s").format(record)
    assert line.count("\n") == 1 and "\n  [2026-01-01" in line
    assert "\x1b" not in line and "\r" not in line and "\x9b" not in line
    assert "\\x1b[2J\\x0d\\x9b\\u2028" in line
    assert all(part.startswith("  ") for part in line.split("\n")[1:])
