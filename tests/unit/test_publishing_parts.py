"""Pure parts of the worker's publishing path: header values and sizes, broker limits,
the pause between short-lived connections."""
import decimal
from datetime import datetime

import pika
from pika import data as amqp_data

from taskd import protocol
from taskd.worker import headers
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
    assert clean["integral-float"] == 30 and isinstance(clean["integral-float"], int)
    assert clean["fraction"] == decimal.Decimal("0.5")
    assert clean["tuple"] == [1, 2]
    assert clean["nested"]["list"][0] == decimal.Decimal("1.5")
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
