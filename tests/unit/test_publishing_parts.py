"""Pure parts of the worker's publishing path: header values and sizes, broker limits,
the pause between short-lived connections."""
import collections
import decimal
import re
import types
from datetime import datetime

import pika
from pika import data as amqp_data

from taskd import config, protocol
from taskd.worker import headers, jobs
from taskd.worker.replies import RESULT_ATTEMPTS, Replies
from taskd.worker.amqp import max_message_size
from taskd.worker.recovery import ReconnectPacer


def test_header_values_pika_cannot_encode_are_made_encodable():
    given = {
        "beyond-64-bits": 10 ** 19,          # a py-amqp double, decoded by pika as an int
        "negative-beyond": -2 ** 70,
        "integral-float": 30.0,
        "fraction": 0.5,
        "tiny": 1e-300,
        "nan": float("nan"),
        "tuple": (1, 2.0),
        "nested": {"list": [1.5, {"deep": 2.0 ** 80}]},
        "before-1970": datetime(1900, 1, 1),
        "k" * 300: "a key AMQP cannot name",
        "fine": ["text", b"bytes", True, None, 7],
    }
    clean = headers.sanitise(given)
    amqp_data.encode_table([], clean)       # raises if pika still cannot encode one
    assert clean["beyond-64-bits"] == str(10 ** 19)
    # finite floats go out as doubles (taskd.broker.pikashim), unchanged
    assert clean["integral-float"] == 30.0 and isinstance(clean["integral-float"], float)
    assert clean["fraction"] == 0.5 and clean["tiny"] == 1e-300
    assert clean["nan"] == "nan"
    assert clean["tuple"] == [1, 2.0]
    assert clean["nested"]["list"][0] == 1.5
    assert clean["fine"] == ["text", b"bytes", True, None, 7]
    assert "k" * 300 not in clean


def test_time_limits_decode_to_values_a_retry_can_carry():
    hdrs = {"task": "t", "id": "1", "timelimit": [30.0, decimal.Decimal("1.5")]}
    request = protocol.decode_task(hdrs, b"[[], {}, {}]", "application/json", "utf-8")
    assert (request.time_limit, request.soft_time_limit) == (30, 1.5)
    assert isinstance(request.time_limit, int)
    again = protocol.encode_task("1", "t", [], {}, time_limit=request.time_limit,
                                 soft_time_limit=request.soft_time_limit)
    amqp_data.encode_table([], headers.sanitise(again.headers))


def test_a_reason_is_capped_to_a_kilobyte_of_utf8():
    reason = headers.bounded("unsupported __type__ " + "é" * 100_000)
    assert len(reason.encode()) <= headers.MAX_REASON
    assert reason.startswith("unsupported __type__ é") and "more bytes cut" in reason
    assert headers.bounded("short") == "short"


def test_properties_larger_than_a_frame_are_cut_largest_value_first():
    props = pika.BasicProperties(headers={"task": "t", "id": "1", "x-big": "b" * 200_000,
                                          "x-medium": "m" * 50_000})
    cut = headers.fit(props, 131072)
    assert cut == ["x-big"]
    assert headers.properties_size(props) <= 131072 - headers.FRAME_OVERHEAD
    assert props.headers["x-taskd-truncated"] == "x-big"
    assert props.headers["x-medium"] == "m" * 50_000 and props.headers["task"] == "t"
    small = pika.BasicProperties(headers={"task": "t"})
    assert headers.fit(small, 131072) == [] and small.headers == {"task": "t"}


def test_the_brokers_max_message_size_is_read_from_its_refusal():
    refused = pika.exceptions.ChannelClosedByBroker(
        406, "PRECONDITION_FAILED - message size 2000159 is larger than configured max "
             "size 1048576")
    assert max_message_size(refused) == 1048576
    assert max_message_size(pika.exceptions.ChannelClosedByBroker(
        406, "PRECONDITION_FAILED - unknown delivery tag 5")) is None
    assert max_message_size(pika.exceptions.ConnectionClosedByBroker(320, "forced")) is None


def test_connections_that_die_young_are_paced_and_a_lasting_one_resets_the_pace():
    now = [0.0]
    pacer = ReconnectPacer(young=5.0, clock=lambda: now[0], rng=lambda: 1.0)
    pacer.connected()
    now[0] += 60
    assert pacer.lost() == 0.0                   # it lived: reconnect at once
    pauses = []
    for _ in range(8):
        pacer.connected()
        now[0] += 1
        pauses.append(pacer.lost())
    assert pauses == sorted(pauses) and pauses[0] > 0 and pauses[-1] == 10.0
    pacer.connected()
    now[0] += 6
    assert pacer.lost() == 0.0


class _Publisher:
    is_open = True

    def __init__(self):
        self.confirms, self.bodies = [], []

    def publish(self, exchange, routing_key, body, properties, on_confirm):
        self.confirms.append(on_confirm)
        self.bodies.append((routing_key, body, properties))


class _Replies(Replies):
    """The reply path, over a stub publisher whose confirms the test gives; its
    ``call_later`` is run by the test too, and acks are recorded."""

    def __init__(self, max_result_size=0):
        self.completed, self.later = [], []
        loop = types.SimpleNamespace(
            call_later=lambda delay, fn, *args: self.later.append((fn, args)))
        super().__init__(loop, self.completed.append, collections.Counter(),
                         re.compile(config.REPLY_TO_PATTERN), max_result_size)
        self.publisher = _Publisher()


def _job(reply_to="taskd.reply.1"):
    props = pika.BasicProperties(reply_to=reply_to, correlation_id="t1",
                                 headers={"task": "t", "id": "t1"})
    return jobs.Job(1, 1, None, "q", "", "q", props, b"")


def test_a_refused_result_is_tried_again_then_given_up_and_its_delivery_acked():
    sup, job = _Replies(), _job()
    sup.publish_result(job, b"result", pika.BasicProperties())
    for attempt in range(1, RESULT_ATTEMPTS):
        sup.publisher.confirms[-1](False)                 # nack
        assert sup.completed == [] and sup.unsent == []
        fn, args = sup.later.pop()
        fn(*args)
    sup.publisher.confirms[-1](False)
    assert sup.completed == [job] and sup.counters["results_lost"] == 1
    assert len(sup.publisher.confirms) == RESULT_ATTEMPTS


def test_a_result_lost_with_the_connection_waits_for_the_reconnect_a_bounded_number_of_times():
    sup, job = _Replies(), _job()
    sup.publish_result(job, b"result", pika.BasicProperties())
    for attempt in range(1, RESULT_ATTEMPTS):
        sup.publisher.confirms[-1](None)                  # connection lost
        [(_, _, _, again)] = sup.unsent
        assert again == attempt + 1 and sup.completed == []
        sup.unsent.clear()
        sup.publish_result(job, b"result", pika.BasicProperties(), again)    # reconnected
    sup.publisher.confirms[-1](None)
    assert sup.unsent == [] and sup.completed == [job]


def test_a_result_too_large_becomes_a_failure_and_other_reply_queues_get_nothing():
    sup = _Replies(max_result_size=10)
    sup.publish_result(_job(), b"x" * 11, pika.BasicProperties())
    [confirm] = sup.publisher.confirms
    [(routing_key, body, props)] = sup.publisher.bodies
    meta = protocol.decode_result(body, props.content_type, props.content_encoding)
    assert routing_key == "taskd.reply.1" and meta["status"] == "FAILURE"
    assert "result too large: 11 bytes, broker limit 10" in str(meta["result"])
    foreign = _job(reply_to="someone-elses-queue")
    sup.publish_result(foreign, b"result", pika.BasicProperties())
    assert sup.publisher.confirms == [confirm] and sup.completed == [foreign]
