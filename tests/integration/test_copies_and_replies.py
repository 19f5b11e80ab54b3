"""What the supervisor publishes: copies that replace a delivery, and replies to callers.

A copy (park, retry, redeliver, dead letter) is taken for delivered only when a
queue took it; its headers are re-encodable and fit a frame whatever the sender
wrote. A reply is confirmed before its delivery is acked, a refused one does
not hold the delivery for ever, and no reply goes to a queue outside
``worker.reply_to_pattern``.
"""
import json
import signal
import subprocess
import uuid

import pika

from conftest import executions, wait_for


def counts(queue):
    """(ready, unacked) of ``queue``, from rabbitmqctl; None when it does not exist."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages_ready",
                          "messages_unacknowledged"], capture_output=True, text=True,
                         timeout=60).stdout
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[0] == queue:
            return int(parts[1]), int(parts[2])
    return None


def publish_task(broker, queue, name, args, *, body=None, reply_to=None, **headers):
    """Publish a task message as any client could; returns its id."""
    task_id = str(uuid.uuid4())
    h = {"task": name, "id": task_id, "retries": 0, "timelimit": [None, None], **headers}
    broker.publish(queue, body if body is not None else json.dumps([args, {}, {}]).encode(),
                   pika.BasicProperties(content_type="application/json",
                                        content_encoding="utf-8", correlation_id=task_id,
                                        reply_to=reply_to, headers=h, delivery_mode=2))
    return task_id


def declare(broker, queue, **arguments):
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        conn.channel().queue_declare(queue, arguments=arguments or None)
    finally:
        conn.close()


def reply_queue(topo, broker, **arguments):
    """A queue whose name a worker accepts as ``reply_to`` (deleted after the test)."""
    name = f"taskd.reply.{uuid.uuid4()}"
    topo.queues.add(name)
    declare(broker, name, **arguments)
    return name


# -- copies ------------------------------------------------------------------------------

def test_a_park_copy_to_a_deleted_delay_queue_is_not_taken_for_delivered(topo, workers, broker,
                                                                         app_for):
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    broker.delete(queues=[topo.delay_queue(4096)])      # an operator removes one
    app_for(path).send_task("ttasks.add", [1, 2], countdown=5000, ignore_result=True)
    w.wait_log("reached no queue")
    # the original was not acked but given back; parked again once the queue is declared
    wait_for(lambda: (broker.queue_state(topo.delay_queue(4096)) or (0,))[0] == 1,
             timeout=15, message="the task parked in the delay queue declared again")
    assert counts(topo.name("celery")) == (0, 0)


def test_a_dead_letter_to_a_deleted_dead_letter_queue_arrives_once_it_is_declared_again(
        topo, workers, broker):
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    broker.delete(queues=[topo.dead])
    publish_task(broker, topo.name("celery"), "ttasks.add", [], body=b"not json")
    w.wait_log("reached no queue")
    wait_for(lambda: (broker.queue_state(topo.dead) or (0,))[0] == 1, timeout=15,
             message="the message in the dead-letter queue declared again")
    assert counts(topo.name("celery")) == (0, 0)


def test_the_log_names_the_brokers_reason_for_closing_the_publishing_channel(topo, workers,
                                                                            broker, app_for):
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    delay = topo.delay_queue(4096)
    broker.delete(exchanges=[delay])     # the park publish gets 404 and its channel closes
    app_for(path).send_task("ttasks.add", [1, 2], countdown=5000, ignore_result=True)
    w.wait_log("reconnected")
    lost = next(line for line in w.lines if "lost the broker connection" in line)
    assert "404" in lost and "NOT_FOUND" in lost and delay in lost, lost
    assert "Normal shutdown" not in lost


def test_a_retried_task_sent_with_a_time_limit_reaches_its_result(topo, workers, app_for):
    path = topo.config(concurrency=1)
    workers(path).ready()
    app = app_for(path)
    assert app.send_task("ttasks.flaky", [1], time_limit=30, soft_time_limit=20).get(
        timeout=10) == 1


def test_a_header_pika_cannot_encode_again_does_not_stop_the_dead_letter(topo, workers, broker):
    """py-amqp (Celery) sends doubles; unpatched pika decoded 1e19 as an int beyond 64 bits."""
    import amqp
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    params = pika.URLParameters(broker.url)
    conn = amqp.Connection(f"{params.host}:{params.port}", userid="guest", password="guest")
    conn.connect()
    try:
        conn.channel().basic_publish(amqp.Message(
            "not json", content_type="application/json", content_encoding="utf-8",
            correlation_id="py-amqp-1", application_headers={
                "task": "ttasks.add", "id": "py-amqp-1", "x-score": 1e19, "x-ratio": 0.25}),
            exchange="", routing_key=topo.name("celery"))
    finally:
        conn.close()
    wait_for(lambda: broker.queue_state(topo.dead)[0] == 1, timeout=10,
             message="the message dead-lettered")
    [(props, _)] = broker.get_all(topo.dead)
    assert props.headers["x-score"] == 1e19        # a double, carried as a double
    assert "internal error" not in w.log


def test_a_dead_letter_reason_echoing_a_huge_body_is_cut_not_a_reconnect_loop(topo, workers,
                                                                             broker):
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    body = json.dumps([[{"__type__": "A" * 150_000, "__value__": 1}], {}, {}]).encode()
    publish_task(broker, topo.name("celery"), "ttasks.add", [], body=body)
    wait_for(lambda: broker.queue_state(topo.dead)[0] == 1, timeout=10,
             message="the message dead-lettered")
    [(props, got)] = broker.get_all(topo.dead)
    assert got == body
    assert 100 < len(props.headers["x-taskd-reason"].encode()) <= 1024
    assert "lost the broker connection" not in w.log


def test_a_copy_whose_headers_outgrow_a_frame_is_cut_to_fit(topo, workers, broker):
    """The original fits frame_max (131072 here); its dead-letter copy adds headers."""
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    task_id = str(uuid.uuid4())
    props = pika.BasicProperties(content_type="application/json", correlation_id=task_id,
                                 headers={"task": "ttasks.add", "id": task_id, "x-big": ""})
    size = sum(len(piece) for piece in props.encode())
    props.headers["x-big"] = "b" * (131_072 - 8 - 14 - 20 - size)    # 20 bytes to spare
    broker.publish(topo.name("celery"), b"not json", props)
    wait_for(lambda: broker.queue_state(topo.dead)[0] == 1, timeout=10,
             message="the message dead-lettered")
    [(props, _)] = broker.get_all(topo.dead)
    assert props.headers["x-taskd-truncated"] == "x-big"
    assert props.headers["x-big"].startswith("bbbb") and len(props.headers["x-big"]) < 1024
    assert props.headers["x-taskd-reason"].startswith("DecodeError")
    assert "lost the broker connection" not in w.log


def test_a_task_cut_by_a_shutdown_goes_back_without_counting_a_delivery(topo, workers, broker,
                                                                       app_for, tmp_path):
    path = topo.config(concurrency=1, max_deliveries=1)
    w = workers(path).ready()
    out = tmp_path / "runs.txt"
    app_for(path).send_task("ttasks.sleep", [30, str(out), "t1"], ignore_result=True)
    wait_for(lambda: out.exists() and "start t1" in out.read_text(), message="the task started")
    w.signal(signal.SIGQUIT)
    assert w.proc.wait(30) == 1
    assert broker.queue_state(topo.dead)[0] == 0, w.log
    [(props, _)] = broker.get_all(topo.name("celery"))
    assert props.headers.get("x-taskd-delivery-count", 0) == 0


def test_a_new_delay_queue_prefix_is_declared_by_the_reload(topo, workers, broker, app_for,
                                                            tmp_path):
    from taskd.worker.parking import BUCKETS
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    new_prefix = topo.name("delay2")
    path.write_text(path.read_text().replace(topo.delay_prefix, new_prefix))
    new_delays = [f"{new_prefix}.{b}s" for b in BUCKETS]
    try:
        w.signal(signal.SIGHUP)
        w.wait_log("configuration reloaded")
        assert broker.queue_state(f"{new_prefix}.4096s") is not None
        app_for(path).send_task("ttasks.add", [1, 2], countdown=5000, ignore_result=True)
        wait_for(lambda: broker.queue_state(f"{new_prefix}.4096s")[0] == 1, timeout=10,
                 message="the task parked under the new prefix")
        assert "lost the broker connection" not in w.log
    finally:
        broker.delete(new_delays, new_delays)


# -- replies -------------------------------------------------------------------------------

def test_a_reply_queue_that_refuses_every_result_does_not_hold_the_delivery(topo, workers,
                                                                           broker, tmp_path):
    rq = reply_queue(topo, broker, **{"x-max-length": 0, "x-overflow": "reject-publish"})
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    out = tmp_path / "runs.txt"
    publish_task(broker, topo.name("celery"), "ttasks.record", [str(out), "n1"], reply_to=rq)
    wait_for(lambda: counts(topo.name("celery")) == (0, 0), timeout=15,
             message="the delivery acked")
    assert executions(out) == {"n1": 1}
    assert "the result is lost" in w.log


def test_a_refused_revoked_reply_is_published_again_before_the_ack(topo, workers, broker):
    rq = reply_queue(topo, broker, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    broker.publish(rq, b"filler")                        # full: the next publish is refused
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    task_id = publish_task(broker, topo.name("celery"), "ttasks.add", [1, 2], reply_to=rq,
                           expires="2000-01-01T00:00:00+00:00")
    w.wait_log("refused its result")
    assert broker.get_all(rq, limit=1)[0][1] == b"filler"    # room for the next attempt
    wait_for(lambda: broker.queue_state(rq)[0] == 1, timeout=10, message="the reply")
    [(props, body)] = broker.get_all(rq)
    assert props.correlation_id == task_id and json.loads(body)["status"] == "REVOKED"
    assert counts(topo.name("celery")) == (0, 0)


def test_results_go_only_to_reply_queues_matching_the_pattern(topo, workers, broker, tmp_path):
    victim = topo.name("someone-elses-queue")
    topo.queues.add(victim)
    declare(broker, victim)
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    out = tmp_path / "runs.txt"
    publish_task(broker, topo.name("celery"), "ttasks.record", [str(out), "r1"], reply_to=victim)
    wait_for(lambda: executions(out) == {"r1": 1}, message="the task ran")
    wait_for(lambda: counts(topo.name("celery")) == (0, 0), message="the task acked")
    assert broker.queue_state(victim)[0] == 0
    assert "does not match worker.reply_to_pattern" in w.log
