"""Property (hypothesis), in process: the intake's decode and validation are total.

Whatever headers, body and content type a sender writes, the pure functions the
intake runs on a delivery either accept it or raise a :class:`TaskdError` naming the
fault (which dead-letters it); nothing else escapes them. A fast companion of
``tests/faults/test_intake_property.py``, which sends such messages to a real worker.
"""
import os

import pika
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import Phase, given, settings, strategies as st  # noqa: E402

from fuzzmessages import VALUES, messages  # noqa: E402
from taskd import protocol, serialization  # noqa: E402
from taskd.exceptions import TaskdError  # noqa: E402
from taskd.worker import jobs, recovery  # noqa: E402

EXAMPLES = int(os.environ.get("TASKD_FUZZ_EXAMPLES", "300"))
ACCEPT = serialization.accept_set(["json", "yaml", "msgpack"])
# What pika makes of an AMQP double: an integer, beyond 64 bits when the double is.
READ_DOUBLES = st.floats(allow_nan=False, allow_infinity=False).map(int)


@settings(max_examples=EXAMPLES, deadline=None, database=None, phases=(Phase.explicit, Phase.generate))
@given(msg=messages("/nonexistent", "tok"), doubles=st.dictionaries(
    st.sampled_from(["id", "retries", "timelimit", "x-taskd-delivery-count", "x"]),
    READ_DOUBLES | VALUES, max_size=2))
def test_decoding_a_delivery_accepts_it_or_names_its_fault(msg, doubles):
    headers = {**msg.headers, **doubles}
    props = pika.BasicProperties(headers=headers, correlation_id=msg.token, reply_to="r",
                                 content_type=msg.content_type,
                                 content_encoding=msg.content_encoding)
    job = jobs.Job(1, 1, None, "q", "", "q", props, msg.body, msg.redelivered)
    assert isinstance(job.describe(), str) and job.delivery_count >= 1
    try:
        job.request = protocol.decode_task(headers, msg.body, msg.content_type,
                                           msg.content_encoding, correlation_id=msg.token,
                                           accept=ACCEPT)
        jobs.check_headers(headers)
    except TaskdError as exc:
        assert str(exc)
        jobs.dead_letter(job, f"{type(exc).__name__}: {exc}")
        return
    request = job.request
    assert isinstance(request.id, str) and isinstance(request.name, str)
    assert isinstance(request.retries, int) and request.retries >= 0
    assert all(v is None or isinstance(v, str)
               for v in (request.root_id, request.parent_id, request.group))
    assert isinstance(recovery.delivery_key(request, msg.body), bytes)
    job.job_frame(None)
