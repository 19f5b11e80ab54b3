"""Hypothesis strategies for task messages as a sender can really send them.

Header values are what an AMQP field table can carry and pika or py-amqp can
write: strings (any Unicode but surrogates, up to 8 KB), bytes, booleans,
64-bit integers, decimals, timestamps, void, and nested arrays and tables.
Doubles are sent with py-amqp (pika cannot write them); pika reads them back as
integers, so a double of 1e300 reaches the worker as an integer far beyond 64
bits. NaN and infinities cannot reach a worker at all: RabbitMQ refuses such
a double and closes the sender's connection (541 INTERNAL_ERROR).

A message starts as a valid call of ``ttasks.note(path, token)`` and is then
bent: headers replaced or added, the body swapped for an odd one (deep nesting,
bytes that are no JSON, a workflow embed, numbers beyond 64 bits, NaN), another
content type, an ETA or expiry in the past or just ahead, the redelivered flag.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import strategies as st

INT64 = st.integers(-(2 ** 63), 2 ** 63 - 1)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
BIG_TEXT = st.integers(1000, 8000).map(lambda n: "\n\x1b[2J" + "A" * n)
DECIMALS = st.builds(lambda raw, places: Decimal(raw).scaleb(-places),
                     st.integers(-(2 ** 31), 2 ** 31 - 1), st.integers(0, 30))
TIMESTAMPS = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)) \
    .map(lambda d: d.replace(microsecond=0))
KEYS = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=30)
SCALARS = st.one_of(st.none(), st.booleans(), INT64, TEXT, st.binary(max_size=40), DECIMALS,
                    TIMESTAMPS, BIG_TEXT)


def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


# Only py-amqp writes these (as AMQP doubles); pika reads them back as integers.
DOUBLES = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from([1e19, -1e19, 9.3e18, 1e300, 0.5, 1e-9]))

VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=8) \
    | st.integers(1, 300).map(nested)

CELERY_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _when(seconds):
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


# ETA and expiry: past, or at most a second ahead (a message must settle quickly).
WHEN = st.one_of(st.floats(-1e6, 1.0).map(_when), st.just("yesterday"), st.just(""),
                 st.datetimes(max_value=datetime(2020, 1, 1), min_value=datetime(1970, 1, 2))
                 .map(lambda d: d.replace(microsecond=0)), VALUES)
HEADER_VALUES = {
    "task": st.sampled_from(["ttasks.note", "no.such.task", "", "ttasks.note\n\x1b[31m"])
    | VALUES,
    "id": st.sampled_from(["", "same-id"]) | VALUES,
    "retries": st.integers(-3, 10) | VALUES,
    "timelimit": st.lists(st.one_of(st.none(), st.integers(-2, 30), VALUES), min_size=0,
                          max_size=3) | VALUES,
    "eta": WHEN,
    "expires": WHEN,
    "root_id": VALUES, "parent_id": VALUES, "group": VALUES,
    "ignore_result": VALUES,
    "x-taskd-copy": TEXT | VALUES,
    "x-taskd-delivery-count": st.integers(-10, 10) | VALUES,
    "x-delivery-count": st.integers(-10, 10) | VALUES,
    "x-death": VALUES,
    "x-taskd-reason": VALUES,
}


def bodies(path, token):
    args = [path, token]
    good = st.builds(lambda extra, embed: json.dumps([args + extra, {}, embed]).encode(),
                     st.lists(st.one_of(st.none(), st.integers(), TEXT), max_size=3),
                     st.sampled_from([CELERY_EMBED, {}, None]))
    odd = st.one_of(
        st.binary(max_size=200),
        st.integers(1, 3000).map(lambda n: f'[["{path}", "{token}", {"[" * n + "]" * n}], '
                                 '{}, null]'.encode()),
        st.integers(1, 3000).map(lambda n: ("[" * n + "]" * n).encode()),
        st.just(f'[["{path}", "{token}", NaN, Infinity, -Infinity], {{}}, null]'.encode()),
        st.integers(4000, 6000).map(lambda n: f'[["{path}", "{token}", {"9" * n}], {{}}, null]'
                                    .encode()),
        st.just(json.dumps([args, {}, {"chain": [{"task": "ttasks.note"}]}]).encode()),
        st.just(json.dumps([args, {}, {"callbacks": [{"task": "x"}], "errbacks": None}])
                .encode()),
        st.just(json.dumps([args, {}, [1]]).encode()),
        st.just(json.dumps([args, []]).encode()),
        st.just(json.dumps({"args": args}).encode()),
        st.just(f"a: &a [x, x]\nb: [*a, *a]\nc: [{path}, {token}]\n".encode()),
        st.just(b'[["\xff\xfe"], {}, null]'),
        st.just(json.dumps([args, {}, {"__type__": "nope", "__value__": 1}]).encode()),
    )
    return st.one_of(good, good, odd)


CONTENT_TYPES = st.one_of(
    st.sampled_from(["application/json"] * 6 + ["application/x-yaml", None,
                                                 "application/x-python-serialize",
                                                 "text/plain", "application/x-msgpack"]),
    TEXT)


@dataclass
class Message:
    token: str
    headers: dict
    body: bytes
    content_type: str | None
    content_encoding: str | None
    redelivered: bool
    doubles: dict = field(default_factory=dict)   # headers only py-amqp can send

    @property
    def needs_py_amqp(self):
        return bool(self.doubles)


@st.composite
def messages(draw, path, token):
    headers = {"lang": "py", "task": "ttasks.note", "id": token, "retries": 0,
               "timelimit": [None, None], "root_id": token, "parent_id": None,
               "group": None, "ignore_result": False, "argsrepr": "()", "kwargsrepr": "{}"}
    for key in draw(st.lists(st.sampled_from(sorted(HEADER_VALUES)), max_size=4, unique=True)):
        headers[key] = draw(HEADER_VALUES[key])
    for key in draw(st.lists(KEYS, max_size=2)):
        headers[key] = draw(VALUES)
    doubles = {}
    if draw(st.integers(0, 5)) == 0:
        doubles = draw(st.dictionaries(st.sampled_from(["x-score", "retries", "timelimit",
                                                        "x-taskd-delivery-count", "id"]),
                                       DOUBLES, min_size=1, max_size=2))
    return Message(token=token, headers=headers, body=draw(bodies(path, token)),
                   content_type=draw(CONTENT_TYPES),
                   content_encoding=draw(st.sampled_from(["utf-8", "binary", None, "rot13"])),
                   redelivered=draw(st.booleans()), doubles=doubles)
