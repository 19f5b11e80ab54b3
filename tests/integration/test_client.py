"""The client against the real broker (and a real worker where one is needed): what
reaches its reply queue, its locking, its reply queue's life, its memory and channels."""
import json
import pickle
import subprocess
import threading
import time
import uuid

import pika
import pytest

from conftest import wait_for
from tcpproxy import Proxy
import taskd.result
from taskd.exceptions import ConfirmTimeout, ConnectionError, ContentDisallowed, TimeoutError


class _Touch:
    """Unpickling this creates a file: proof that code ran in the client."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _publish_result(broker, queue, task_id, body, content_type, encoding="utf-8"):
    broker.publish(queue, body, pika.BasicProperties(
        content_type=content_type, content_encoding=encoding, correlation_id=task_id))


def test_a_result_of_a_content_type_not_accepted_is_a_failure_and_never_decoded(
        topo, broker, app_for, tmp_path):
    app = app_for(topo.config())      # accept_content: [json]; result_accept_content: null
    queue = app.session().results.reply_to()
    marker = tmp_path / "pwned"
    task_id = str(uuid.uuid4())
    body = pickle.dumps({"status": "SUCCESS", "result": _Touch(str(marker)), "task_id": task_id})
    _publish_result(broker, queue, task_id, body, "application/x-python-serialize", "binary")
    result = app.AsyncResult(task_id)
    with pytest.raises(ContentDisallowed, match="not accepted.*result_accept_content"):
        result.get(timeout=5)
    assert result.state == "FAILURE"
    assert not marker.exists()


def test_a_remote_systemexit_is_caught_by_except_exception(topo, broker, app_for):
    app = app_for(topo.config())
    queue = app.session().results.reply_to()
    task_id = str(uuid.uuid4())
    meta = {"status": "FAILURE", "task_id": task_id, "traceback": None,
            "result": {"exc_type": "SystemExit", "exc_module": "builtins", "exc_message": [3]}}
    _publish_result(broker, queue, task_id, json.dumps(meta).encode(), "application/json")
    with pytest.raises(Exception) as caught:      # not SystemExit: that would end pytest
        app.AsyncResult(task_id).get(timeout=5)
    assert caught.value.remote_type == "builtins.SystemExit"


def test_a_send_from_another_thread_does_not_wait_behind_a_get(topo, workers, app_for):
    path = topo.config(concurrency=2)
    workers(path).ready()
    app = app_for(path)
    app.send_task("ttasks.add", [0, 0]).get(timeout=10)       # the session is up
    slow = app.send_task("ttasks.sleep", [3])
    waiter = threading.Thread(target=slow.get, kwargs={"timeout": 20})
    waiter.start()
    took = []
    while waiter.is_alive() and len(took) < 10:
        started = time.monotonic()
        app.send_task("ttasks.add", [1, 1], ignore_result=True)
        took.append(time.monotonic() - started)
    waiter.join()
    assert len(took) == 10 and slow.get() == 3      # all sent while get() waited
    assert max(took) < 1, took      # behind a get() each would wait for the whole 3 s


def test_a_deleted_reply_queue_fails_its_pending_gets_at_once_and_is_replaced(
        topo, workers, app_for, broker):
    path = topo.config(concurrency=2)
    workers(path).ready()
    app = app_for(path)
    assert app.send_task("ttasks.add", [1, 1]).get(timeout=10) == 2
    pending = app.send_task("ttasks.sleep", [4])    # outlasts rabbitmqctl's start-up
    # an exclusive queue can be deleted only by its connection, or by an operator
    subprocess.run(["rabbitmqctl", "-q", "delete_queue", app.session().results.queue],
                   check=True, capture_output=True, timeout=60)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="deleted"):
        pending.get(timeout=5)
    assert time.monotonic() - started < 1.5
    for i in range(3):      # every later send gets its result through a new reply queue
        assert app.send_task("ttasks.add", [i, i]).get(timeout=10) == 2 * i


def test_after_a_half_open_connection_sends_go_on_with_a_new_reply_queue(
        topo, workers, app_for):
    proxy = Proxy().start()
    try:
        workers(topo.config(concurrency=1)).ready()
        app = app_for(topo.config({"broker": {"url": proxy.url}}, name="client.yaml"))
        assert app.send_task("ttasks.add", [1, 1]).get(timeout=10) == 2
        old_queue = app.session().results.queue
        pending = app.send_task("ttasks.sleep", [0.5])
        proxy.half_cut()        # the broker still holds the old connection and its queue
        for i in range(3):
            assert app.send_task("ttasks.add", [i, i]).get(timeout=10) == 2 * i
        assert app.session().results.queue != old_queue
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="result cannot arrive"):
            pending.get(timeout=5)
        assert time.monotonic() - started < 1
    finally:
        proxy.stop()
        for s in proxy.frozen:
            s.close()


def test_results_are_not_kept_once_taken_nor_without_bound_when_unclaimed(
        topo, workers, app_for, monkeypatch):
    monkeypatch.setattr(taskd.result, "UNCLAIMED_MAX", 10)
    path = topo.config(concurrency=1)
    workers(path).ready()
    app = app_for(path)
    results = app.session().results
    for i in range(30):
        app.send_task("ttasks.add", [i, i])        # fire and forget; a result is wanted
    last = app.send_task("ttasks.add", [1, 2])
    assert last.get(timeout=20) == 3             # one worker child: the others came first
    assert len(results._unclaimed) == 10
    assert app.AsyncResult(next(reversed(results._unclaimed))).get(
        timeout=1) is not None                   # an unclaimed result can still be claimed
    del last
    assert len(results._slots) == 0 and len(results._unclaimed) == 9


def test_sends_on_a_borrowed_connection_leave_no_channel_open(topo, broker, app_for):
    app = app_for(topo.config())
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        for i in range(20):
            app.send_task("ttasks.add", [i, i], connection=conn, ignore_result=True)
        assert len(conn._impl._channels) == 0
        assert conn.is_open
    finally:
        conn.close()


def test_get_with_timeout_zero_raises_timeout_unless_ready(topo, broker, app_for):
    app = app_for(topo.config())            # no worker: the task stays pending
    pending = app.send_task("ttasks.add", [1, 1])
    with pytest.raises(TimeoutError, match="PENDING"):
        pending.get(timeout=0)
    queue = app.session().results.queue
    task_id = str(uuid.uuid4())
    retry = {"status": "RETRY", "task_id": task_id, "traceback": None,
             "result": {"exc_type": "KeyError", "exc_module": "builtins", "exc_message": ["k"]}}
    _publish_result(broker, queue, task_id, json.dumps(retry).encode(), "application/json")
    retrying = app.AsyncResult(task_id)
    wait_for(lambda: retrying.state == "RETRY", message="the RETRY state")
    with pytest.raises(TimeoutError, match="RETRY"):
        retrying.get(timeout=0)
    done = dict(retry, status="SUCCESS", result=5)
    _publish_result(broker, queue, task_id, json.dumps(done).encode(), "application/json")
    wait_for(retrying.ready, message="the result")
    assert retrying.get(timeout=0) == 5


def test_a_publish_without_confirm_says_its_outcome_is_unknown(topo, app_for, broker):
    proxy = Proxy().start()
    try:
        app = app_for(topo.config({"broker": {"url": proxy.url}}))
        publisher = app.get_publisher(window=0)
        publisher.CONFIRM_TIMEOUT = 0.5
        app.send_task("ttasks.add", [1, 1], publisher=publisher, ignore_result=True)
        proxy.freeze()
        with pytest.raises(ConfirmTimeout, match="unknown.*twice") as caught:
            app.send_task("ttasks.add", [2, 2], publisher=publisher, ignore_result=True)
        assert len(caught.value.task_ids) == 1
        assert not publisher.confirms.pending and not publisher.confirms.returned \
            and not publisher.confirms.failed
    finally:
        proxy.stop()
        for s in proxy.frozen:
            s.close()
