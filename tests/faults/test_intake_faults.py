"""The intake under bad, odd and repeated input, with a real worker and the real broker.

Every message ends in one of three ways: it runs and is acked, it is dead-lettered
with a reason (its caller gets a FAILURE), or it is settled as a copy of work done
here. None loops, and none makes the worker reconnect."""
import json
import os
import signal
import uuid

import pika
import pytest

from conftest import executions, wait_for
from tcpproxy import Proxy

LOST = "lost the broker connection"


def publish(broker, queue, name, args, *, task_id=None, body=None, content_type="application/json",
            reply_to=None, **headers):
    task_id = task_id or str(uuid.uuid4())
    h = {"task": name, "id": task_id, "retries": 0, "timelimit": [None, None], **headers}
    broker.publish(queue, body if body is not None else json.dumps([args, {}, {}]).encode(),
                   pika.BasicProperties(content_type=content_type, content_encoding="utf-8",
                                        correlation_id=task_id, reply_to=reply_to, headers=h,
                                        delivery_mode=2))
    return task_id


def make_redelivered(broker, queue, count=1):
    """Take messages without acking them and close: the broker requeues them, flagged."""
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    ch = conn.channel()
    for _ in range(count):
        method, _, _ = ch.basic_get(queue, auto_ack=False)
        assert method is not None
    conn.close()


def dead_letters(broker, topo, count=1, timeout=15):
    """Wait for ``count`` dead letters; returns them, taken off the dead-letter queue."""
    got = []

    def enough():
        got.extend(broker.get_all(topo.dead))
        return len(got) >= count
    wait_for(enough, timeout, message=f"{count} dead letter(s)")
    return got


def test_a_message_that_keeps_causing_internal_errors_is_dead_lettered_not_acked_unhandled(
        topo, workers, app_for, broker, tmp_path):
    path = topo.config({"accept_content": ["json", "buggy-json"],
                        "serializer_modules": ["buggyser"]}, concurrency=1)
    w = workers(path).ready()
    app = app_for(path)
    queue = topo.name("celery")
    out = tmp_path / "runs.txt"
    bad = publish(broker, queue, "ttasks.add", [1, 1], content_type="application/x-buggy-json")
    good = [app.send_task("ttasks.record", [str(out), f"g{i}"]) for i in range(5)]
    assert [r.get(timeout=10) for r in good] == [f"g{i}" for i in range(5)]
    (props, _), = dead_letters(broker, topo)
    assert props.headers["id"] == bad
    assert "internal error, 3 times: RuntimeError: a bug in the custom serializer" \
        in props.headers["x-taskd-reason"]
    assert w.log.count("internal error handling task ttasks.add") == 3
    assert LOST not in w.log and "unknown delivery tag" not in w.log
    wait_for(lambda: broker.queue_state(queue) == (0, 1), message="an empty queue")


@pytest.mark.parametrize("header, value", [("id", ["unhashable"]), ("retries", ["x"]),
                                           ("x-taskd-copy", {"a": 1})])
def test_a_redelivered_message_with_a_header_of_the_wrong_type_is_dead_lettered(
        topo, workers, broker, header, value):
    path = topo.config(concurrency=1)
    workers(path).ready().stop()                       # declares the queue
    queue = topo.name("celery")
    tid = publish(broker, queue, "ttasks.add", [1, 1], **{header: value})
    make_redelivered(broker, queue)
    w = workers(path).ready()
    (props, _), = dead_letters(broker, topo)
    assert props.correlation_id == tid
    assert f"header {header!r}" in props.headers["x-taskd-reason"]
    assert "internal error" not in w.log and LOST not in w.log


def test_arguments_nested_too_deep_to_hand_to_a_child_are_dead_lettered(
        topo, workers, app_for, broker):
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    app = app_for(path)
    nested = "[" * 700 + "]" * 700
    tid = publish(broker, topo.name("celery"), "ttasks.echo", None,
                  body=f"[[{nested}],{{}},{{}}]".encode())
    (props, _), = dead_letters(broker, topo)
    assert props.headers["id"] == tid
    assert "cannot be handed to a child process: RecursionError" in props.headers["x-taskd-reason"]
    assert app.send_task("ttasks.add", [2, 2]).get(timeout=10) == 4
    assert "internal error" not in w.log and LOST not in w.log


def test_a_negative_delivery_count_buys_no_extra_deliveries(topo, workers, broker):
    path = topo.config(concurrency=1, max_deliveries=3)
    w = workers(path).ready()
    publish(broker, topo.name("celery"), "ttasks.die", [], **{"x-taskd-delivery-count": -3})
    (props, _), = dead_letters(broker, topo, timeout=30)
    assert "3 times" in props.headers["x-taskd-reason"]
    assert w.log.count("while running ttasks.die") == 3


def test_a_forged_log_line_in_a_task_name_stays_inside_its_record(topo, workers, broker):
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    name = "nope\n[2026-12-04 00:00:00,000] INFO taskd.supervisor[1]: FORGED succeeded\x1b[2J"
    publish(broker, topo.name("celery"), name, [])
    dead_letters(broker, topo)
    w.wait_log("FORGED")
    assert not any(line.startswith("[2026-12-04 00:00:00,000]") for line in w.lines)
    assert "\x1b" not in w.log and "\\x1b[2J" in w.log


@pytest.fixture
def proxy():
    p = Proxy().start()
    yield p
    p.stop()


def test_a_reused_task_id_that_comes_back_redelivered_still_runs(topo, workers, broker, proxy,
                                                                 tmp_path):
    path = topo.config({"broker": {"url": proxy.url}}, concurrency=1)
    w = workers(path).ready()
    queue = topo.name("celery")
    out = tmp_path / "runs.txt"
    publish(broker, queue, "ttasks.record", [str(out), "monday"], task_id="daily-report")
    wait_for(lambda: executions(out)["monday"] == 1, message="monday's run")
    publish(broker, queue, "ttasks.sleep", [2, str(out), "block"])
    wait_for(lambda: "start" in executions(out), message="the blocking task to start")
    publish(broker, queue, "ttasks.record", [str(out), "tuesday"], task_id="daily-report")
    wait_for(lambda: broker.queue_state(queue)[0] == 0, message="tuesday prefetched")
    assert proxy.cut() >= 1
    w.wait_log("reconnected")
    wait_for(lambda: executions(out)["tuesday"], timeout=15, message=f"tuesday's run:\n{w.log}")
    wait_for(lambda: executions(out)["end"] == 1, message="the blocking task to end")
    wait_for(lambda: broker.queue_state(queue) == (0, 1), message="an empty queue")
    runs = executions(out)
    assert (runs["monday"], runs["tuesday"], runs["start"]) == (1, 1, 1), runs


def test_a_redelivered_copy_of_a_task_given_back_is_given_back_too(topo, workers, broker, proxy,
                                                                   tmp_path):
    path = topo.config({"broker": {"url": proxy.url},
                        "queues": [{"name": "q", "queue_type": "quorum", "delivery_limit": 10}]},
                       queues=["q"], concurrency=1, max_deliveries=5)
    w = workers(path).ready()
    queue = topo.name("q")
    out = tmp_path / "runs.txt"
    publish(broker, queue, "ttasks.sleep", [1.5, str(out), "t"])
    wait_for(lambda: executions(out)["start"] == 1, message="the task to start")
    assert proxy.cut() >= 1
    w.wait_log("its redelivered copy will be acknowledged when it finishes")
    (child,) = w.children()
    os.kill(child, signal.SIGKILL)             # the quorum redeliver gives the task back
    wait_for(lambda: executions(out)["end"] == 1, timeout=15, message="the task to run again")
    wait_for(lambda: broker.queue_state(queue) == (0, 1), message="an empty queue")
