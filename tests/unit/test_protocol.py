import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from taskd import exceptions, protocol, serialization
from taskd.exceptions import ContentDisallowed, DecodeError, InvalidTaskMessage, RemoteError


def _msg(**kw):
    return protocol.encode_task("id-1", "tasks.add", [2, 2], {"z": 1}, **kw)


def test_encode_decode_round_trip():
    eta = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    m = _msg(eta=eta, reply_to="r", priority=7, time_limit=10, soft_time_limit=5)
    assert m.headers["task"] == "tasks.add" and m.headers["id"] == "id-1"
    assert m.headers["eta"] == "2030-01-02T03:04:05+00:00"
    assert m.headers["timelimit"] == [10, 5]
    assert m.headers["root_id"] == "id-1" and m.headers["lang"] == "py"
    r = protocol.decode_task(m.headers, m.body, m.content_type, m.content_encoding,
                             reply_to="r", correlation_id="id-1", accept={"application/json"})
    assert (r.id, r.name, r.args, r.kwargs) == ("id-1", "tasks.add", (2, 2), {"z": 1})
    assert r.eta == eta and r.time_limit == 10 and r.soft_time_limit == 5
    assert r.reply_to == "r"


def test_naive_eta_is_local_time():
    local = datetime(2030, 6, 1, 12, 0, 0)
    m = _msg(eta=local)
    assert datetime.fromisoformat(m.headers["eta"]) == local.astimezone()


def test_body_matches_celery_protocol_v2():
    celery_amqp = pytest.importorskip("celery.app.amqp")
    from celery import Celery
    c = Celery(set_as_current=False)
    theirs = c.amqp.as_task_v2("id-1", "tasks.add", args=(2, 2), kwargs={"z": 1})
    ours = _msg()
    assert set(theirs.headers) - {"stamped_headers", "stamps", "replaced_task_nesting"} \
        <= set(ours.headers)
    assert serialization.json_loads(ours.body) == [[2, 2], {"z": 1}, {
        "callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    assert celery_amqp  # imported


@pytest.mark.parametrize("headers,body,ctype,error", [
    ({}, b"[[],{},{}]", "application/json", "no 'task' header"),
    ({"task": "t", "id": "1"}, b"{not json", "application/json", "not valid json"),
    ({"task": "t", "id": "1"}, b"[1, 2]", "application/json", "body must be"),
    ({"task": "t", "id": "1"}, b'[{}, {}, {}]', "application/json", "args must be a list"),
    ({"task": "t", "id": "1", "eta": "tomorrow"}, b"[[],{},{}]", "application/json", "ISO 8601"),
    ({"task": "t", "id": "1", "expires": 5}, b"[[],{},{}]", "application/json", "ISO 8601"),
    ({"task": "t", "id": "1", "retries": -1}, b"[[],{},{}]", "application/json", "retries"),
    ({"task": "t", "id": "1", "timelimit": [0, None]}, b"[[],{},{}]", "application/json", "timelimit"),
])
def test_bad_messages_are_rejected_with_a_reason(headers, body, ctype, error):
    with pytest.raises((InvalidTaskMessage, DecodeError)) as info:
        protocol.decode_task(headers, body, ctype, accept={"application/json"})
    assert error in str(info.value)


def test_content_type_outside_accept_is_refused():
    with pytest.raises(ContentDisallowed, match="application/x-python-serialize"):
        protocol.decode_task({"task": "t", "id": "1"}, b"x", "application/x-python-serialize",
                             accept={"application/json"})


def test_result_encoding_success_and_failure():
    status, body, ctype, _ = protocol.encode_result("id", protocol.SUCCESS, {"a": 1})
    meta = protocol.decode_result(body, ctype)
    assert status == "SUCCESS"
    assert meta["task_id"] == "id" and meta["result"] == {"a": 1} and meta["date_done"]
    status, body, ctype, _ = protocol.encode_result("id", protocol.FAILURE, KeyError("k"), "tb")
    meta = protocol.decode_result(body, ctype)
    assert meta["result"] == {"exc_type": "KeyError", "exc_message": ["k"], "exc_module": "builtins"}
    exc = exceptions.dict_to_exception(meta["result"])
    assert isinstance(exc, KeyError) and exc.args == ("k",)


def test_unencodable_result_becomes_a_failure():
    status, body, ctype, _ = protocol.encode_result("id", protocol.SUCCESS, object())
    assert status == "FAILURE"
    assert protocol.decode_result(body, ctype)["result"]["exc_type"] == "EncodeError"


def test_exception_rebuilding_never_calls_non_exceptions():
    # CVE-2021-23727: a result naming os.system must not run it.
    exc = exceptions.dict_to_exception({"exc_type": "system", "exc_module": "os",
                                      "exc_message": ["touch /tmp/pwned"]})
    assert isinstance(exc, RemoteError) and type(exc).__name__ == "system"
    unknown = exceptions.dict_to_exception({"exc_type": "Weird", "exc_module": "not.imported",
                                          "exc_message": ["x"]})
    assert isinstance(unknown, RemoteError) and str(unknown) == "x"


def test_json_extra_types_round_trip_like_kombu():
    value = {"when": datetime(2020, 1, 1, tzinfo=timezone.utc), "d": Decimal("1.5"),
             "u": uuid.UUID(int=5), "b": b"\xff\x00", "s": {1, 2}, "day": datetime(2020, 1, 1).date()}
    assert serialization.json_loads(serialization.json_dumps(value)) == value
    kombu_json = pytest.importorskip("kombu.utils.json")
    theirs = kombu_json.loads(serialization.json_dumps({k: v for k, v in value.items() if k != "s"}))
    assert theirs["d"] == Decimal("1.5") and theirs["u"] == uuid.UUID(int=5)


def test_custom_serializer_registration():
    serialization.register("rev", lambda o: str(o)[::-1], lambda b: b.decode()[::-1],
                           "application/x-rev", "utf-8")
    try:
        body, ctype, enc = serialization.dumps("abc", "rev")
        assert body == b"cba" and ctype == "application/x-rev"
        assert serialization.loads(body, ctype, accept={"application/x-rev"}) == "abc"
    finally:
        serialization.unregister("rev")


def test_countdown_like_eta_is_in_utc():
    eta = datetime.now(timezone.utc) + timedelta(seconds=3)
    assert protocol.to_utc_iso(eta).endswith("+00:00")
