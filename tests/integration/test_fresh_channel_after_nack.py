"""After a basic.nack, publishers go on with a new channel (issue 18).

Right after a cluster node's loss, a channel that published to a quorum queue
before its new leader was elected can stay nacked for 40 s and more, while a new
channel on the same connection is taken at once. The nack is made here on the
shared broker by a full queue with ``x-overflow: reject-publish``.
"""
import json
import uuid

import pika
import pytest

from conftest import wait_for
from taskd.exceptions import PublishError


def full_queue(topo, broker):
    name = f"taskd.reply.{uuid.uuid4()}"      # a name the worker accepts as reply_to
    topo.queues.add(name)
    conn, ch = broker._channel()
    try:
        ch.queue_declare(name, durable=True, arguments={"x-max-length": 1,
                                                         "x-overflow": "reject-publish"})
        ch.basic_publish("", name, b"filler")
    finally:
        conn.close()
    return name


def test_the_client_sends_on_a_new_channel_after_a_nack(topo, broker, app_for):
    name = full_queue(topo, broker)
    app = app_for(topo.config({"broker": {"url": broker.url, "publish_retries": 0}}))
    with pytest.raises(PublishError, match=r"basic\.nack"):
        app.send_task("ttasks.add", [1, 2], exchange="", routing_key=name, ignore_result=True)
    publisher = app.session().publisher
    nacked_channel = publisher.channel
    assert broker.get_all(name, limit=1)[0][1] == b"filler"        # room again
    app.send_task("ttasks.add", [1, 2], exchange="", routing_key=name, ignore_result=True)
    assert publisher.channel is not nacked_channel and publisher.channel.is_open
    assert not nacked_channel.is_open
    assert broker.queue_state(name)[0] == 1


def test_a_nacked_send_is_sent_again_on_a_new_channel(topo, broker, app_for, caplog):
    name = full_queue(topo, broker)
    app = app_for(topo.config({"broker": {"url": broker.url, "publish_retries": 2}}))
    with pytest.raises(PublishError, match=r"basic\.nack"):
        app.send_task("ttasks.add", [1, 2], exchange="", routing_key=name, ignore_result=True)
    # 3 attempts, each on a channel of its own: the first and two new ones
    renewals = [r for r in caplog.records if "publishing on a new channel" in r.getMessage()]
    assert len(renewals) == 2


def test_the_worker_publishes_on_a_new_channel_after_a_nack(topo, workers, broker):
    rq = full_queue(topo, broker)
    w = workers(topo.config(concurrency=1)).ready()
    task_id = "nack-" + topo.prefix
    body = json.dumps([[2, 3], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                    "chord": None}]).encode()
    broker.publish(topo.name("celery"), body, pika.BasicProperties(
        content_type="application/json", content_encoding="utf-8", correlation_id=task_id,
        reply_to=rq, headers={"lang": "py", "task": "ttasks.add", "id": task_id,
                              "root_id": task_id, "retries": 0}))
    w.wait_log("publishing on a new channel")
    assert broker.get_all(rq, limit=1)[0][1] == b"filler"      # the retry finds room
    wait_for(lambda: broker.queue_state(rq)[0] == 1, timeout=10, message="the result")
    [(props, body)] = broker.get_all(rq)
    assert props.correlation_id == task_id and json.loads(body)["result"] == 5
    assert "lost the broker connection" not in w.log


def test_a_pipelining_publisher_reports_the_nacked_sends_and_goes_on_on_a_new_channel(
        topo, broker, app_for):
    name = full_queue(topo, broker)
    app = app_for(topo.config({"broker": {"url": broker.url}}))
    publisher = app.get_publisher(window=10)
    ids = [app.send_task("ttasks.add", [i, i], exchange="", routing_key=name,
                         ignore_result=True, publisher=publisher).id for i in range(3)]
    with pytest.raises(PublishError, match=r"3 task\(s\) were not taken") as info:
        publisher.flush()
    assert info.value.task_ids == ids
    nacked_channel = publisher.channel
    broker.get_all(name)                                        # room again
    app.send_task("ttasks.add", [1, 1], exchange="", routing_key=name, ignore_result=True,
                  publisher=publisher)
    publisher.close()
    assert not nacked_channel.is_open
    assert broker.queue_state(name)[0] == 1
