"""Floating-point header values survive pika in both directions (taskd.broker.pikashim)."""
import math
import struct

import pika
import pytest
import pika.data
import pika.spec

import taskd.broker  # noqa: F401  (installs the fix)
from taskd.broker import pikashim as fields


def _table(*items):
    """An AMQP field table built by hand: (name, type code, struct format, value)."""
    body = b""
    for name, code, fmt, value in items:
        body += struct.pack("B", len(name)) + name.encode() + code + struct.pack(fmt, value)
    return struct.pack(">I", len(body)) + body


def test_doubles_and_floats_in_a_table_decode_as_floats_not_truncated_ints():
    encoded = _table(("hard", b"d", ">d", 0.5), ("soft", b"f", ">f", 1.5), ("n", b"I", ">i", 7))
    table, offset = pika.data.decode_table(encoded, 0)
    assert table == {"hard": 0.5, "soft": 1.5, "n": 7}
    assert isinstance(table["soft"], float) and offset == len(encoded)


def test_float_headers_round_trip_through_message_properties_nested_too():
    headers = {"timelimit": [0.5, 1.5], "nested": {"x": -2.25, "big": 1e300},
               "beyond_int64": 1e19, "n": 3, "s": "text", "none": None}
    props = pika.spec.BasicProperties(headers=headers)
    decoded = pika.spec.BasicProperties()
    decoded.decode(b"".join(props.encode()))
    assert decoded.headers == headers
    assert decoded.headers["timelimit"] == [0.5, 1.5]
    assert type(decoded.headers["n"]) is int


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_nan_and_infinities_are_refused_before_rabbitmq_closes_the_connection_over_them(value):
    props = pika.spec.BasicProperties(headers={"limits": [1, {"x": value}]})
    with pytest.raises(pika.exceptions.UnsupportedAMQPFieldException,
                       match="RabbitMQ refuses NaN and infinite numbers"):
        props.encode()


def test_the_pika_internals_the_fix_relies_on_are_unchanged():
    """Fails when a pika upgrade moves what taskd.broker.pikashim wraps: read the message."""
    assert fields.check_pika() == [], f"pika {pika.__version__} changed: {fields.check_pika()}"
    assert pika.data.decode_value.__wrapped__ is not None, "the fix is not installed"
    truncated, _ = pika.data.decode_value.__wrapped__(struct.pack(">cd", b"d", 0.5), 0)
    assert truncated == 0, (f"pika {pika.__version__} decodes doubles itself now (got "
                            f"{truncated!r}): the float part of taskd/broker/pikashim.py can go")


def test_a_pika_that_no_longer_fits_the_wrappers_is_reported(monkeypatch):
    monkeypatch.setattr(pika.data, "decode_table", lambda encoded, offset: ({}, offset))
    monkeypatch.setattr(pika.data, "encode_value", lambda pieces, value, strict=True: 0)
    assert fields.check_pika() == [
        "pika.data.encode_value now takes (pieces, value, strict=True), not ['pieces', 'value']",
        "pika.data.decode_table no longer calls decode_value by name"]
