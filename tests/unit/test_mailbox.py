"""Remote control and revokes, part by part against stub channels (no broker): the
mailbox's decoding, routing and replies, the commands' answers in Celery's field names,
the revoked set, and how a revoked task ends (REVOKED, acked, never redelivered)."""
import asyncio
import collections
import json
import logging
import signal
import time
import types
from datetime import datetime, timedelta, timezone

import pika
import pytest

from taskd import config as config_mod, protocol
from taskd.worker import mailbox as mailbox_mod, panel, revokes
from taskd.worker.consumer import Consumer
from taskd.worker.mailbox import Mailbox

from test_worker_parts import deliver, parts

CONFIG = config_mod.loads("worker:\n  dead_letter_queue: dlq\n  hostname: n1@test\n"
                          "  control_exchange: ns\n  revoke_stream: rs\n  revoke_ttl: 60\n")


class StubConn:
    """The control connection: what it publishes, with the confirms the test gives."""
    is_open = True

    def __init__(self):
        self.published = []
        self.channel = types.SimpleNamespace(basic_ack=lambda tag: None)

    def publish(self, exchange, routing_key, body, properties, on_confirm=None, mandatory=False):
        self.published.append((exchange, routing_key, json.loads(body), properties))


class StubPool:
    def __init__(self, children=()):
        self.children, self.killed = list(children), []

    def busy(self):
        return [c for c in self.children if c.job is not None]

    def serving(self):
        return self.children

    def kill(self, child, sig=signal.SIGKILL):
        self.killed.append((child.pid, sig))


def make_mailbox(pool=None, dispatcher=None):
    host = types.SimpleNamespace(config=CONFIG, concurrency=2, queues=("q",),
                                 started_at=time.time() - 5, grown=0,
                                 shutdown=types.SimpleNamespace(stopping=False))
    host.handle_ttin = lambda: setattr(host, "concurrency", host.concurrency + 1)
    host.handle_ttou = lambda: setattr(host, "concurrency", host.concurrency - 1)
    consumer = Consumer(None, None, None, CONFIG)
    consumer.queues = ("q",)
    dispatcher = dispatcher or types.SimpleNamespace(
        ready=[], total=collections.Counter({"t.add": 3}), task_names=frozenset({"t.add"}),
        scheduled=lambda: [])
    mb = Mailbox(None, host, pool or StubPool(), dispatcher, consumer, collections.Counter(),
                 "n1@test", lambda: True)
    mb.conn = StubConn()
    return mb


def command(mb, body, content_type="application/json", clock=None):
    props = pika.BasicProperties(content_type=content_type, headers={"clock": clock or 1})
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    mb._on_command(None, None, props, raw)


def call(method, arguments=None, **extra):
    return dict({"method": method, "arguments": arguments or {}, "destination": None,
                 "ticket": "t-1", "reply_to": {"exchange": "reply.ns.pidbox",
                                               "routing_key": "oid-1"}}, **extra)


def replies(mb):
    """The answers published to the reply exchange: [(routing key, ticket, answer)]."""
    return [(key, props.headers["ticket"], body["n1@test"])
            for exchange, key, body, props in mb.conn.published if exchange == "reply.ns.pidbox"]


def test_ping_is_answered_to_the_reply_exchange_with_the_ticket_and_the_node_name():
    mb = make_mailbox()
    command(mb, call("ping"))
    assert replies(mb) == [("oid-1", "t-1", {"ok": "pong"})]
    [(_, _, _, props)] = mb.conn.published
    assert props.content_type == "application/json" and props.headers["clock"] > 1


def test_a_command_for_other_nodes_is_not_answered_and_a_pattern_can_select_this_one():
    mb = make_mailbox()
    command(mb, call("ping", destination=["other@test"]))
    command(mb, call("ping", pattern="n2@*", matcher="glob"))
    assert replies(mb) == []
    command(mb, call("ping", destination=["other@test", "n1@test"]))
    command(mb, call("ping", pattern="n1@.*", matcher="pcre"))
    assert len(replies(mb)) == 2


def test_an_unknown_command_gets_an_error_reply_as_celery_gives():
    mb = make_mailbox()
    command(mb, call("no_such_thing"))
    [(_, _, answer)] = replies(mb)
    assert set(answer) == {"error"} and "No such command: 'no_such_thing'" in answer["error"]


def test_malformed_and_pickled_messages_are_logged_once_and_dropped_and_the_worker_goes_on(
        caplog):
    mb = make_mailbox()
    caplog.set_level(logging.WARNING, "taskd.supervisor")
    command(mb, b"\x80\x04K\x01.", content_type="application/x-python-serialize")
    command(mb, b"{not json")
    command(mb, [1, 2])
    command(mb, {"arguments": {}})                               # no method
    command(mb, call("ping", arguments={"not a name": 1}))
    command(mb, call("ping", reply_to="nowhere"))
    assert replies(mb) == [] and mb.counters["control_refused"] == 6
    records = [r.getMessage() for r in caplog.records]
    assert len(records) == 6 and all("message dropped" in r for r in records)
    assert "pickle" in records[0] and "JSON only" in records[0]
    assert "not valid JSON" in records[1] and "'method'" in records[3]
    command(mb, call("ping"))                                    # still answering
    assert replies(mb) == [("oid-1", "t-1", {"ok": "pong"})]


def test_a_reply_to_another_exchange_is_not_sent():
    mb = make_mailbox()
    command(mb, call("ping", reply_to={"exchange": "amq.topic", "routing_key": "x"}))
    assert mb.conn.published == []


def test_stats_answers_with_the_fields_flower_reads():
    child = types.SimpleNamespace(pid=4242, job=None, queued=[])
    mb = make_mailbox(StubPool([child]))
    command(mb, call("stats"))
    [(_, _, stats)] = replies(mb)
    assert {"total", "pid", "clock", "uptime", "pool", "broker", "prefetch_count",
            "rusage"} <= set(stats)
    assert stats["total"] == {"t.add": 3} and stats["uptime"] >= 5
    assert stats["pool"]["max-concurrency"] == 2 and stats["pool"]["processes"] == [4242]
    assert stats["broker"]["hostname"] == "127.0.0.1" and "password" not in stats["broker"]
    assert stats["prefetch_count"] == 1 and "maxrss" in stats["rusage"]


def test_registered_active_queues_and_conf_answer_as_celery_does():
    mb = make_mailbox()
    for name in ("registered", "active_queues", "conf"):
        command(mb, call(name))
    registered, queues, conf = [answer for _, _, answer in replies(mb)]
    assert registered == ["t.add"]
    [q] = queues
    assert q["name"] == "q" and q["exchange"] == {
        "name": "q", "type": "direct", "arguments": None, "durable": True, "passive": False,
        "auto_delete": False, "delivery_mode": None, "no_declare": False}
    assert conf["worker.hostname"] == "n1@test" and "broker.url" not in conf  # a default
    command(mb, call("conf", {"with_defaults": True}))
    assert replies(mb)[-1][2]["broker.url"].startswith("amqp://guest:")
    assert "guest@" not in replies(mb)[-1][2]["broker.url"]           # password masked


def test_a_revoke_is_kept_appended_to_the_stream_and_terminates_the_child_running_it():
    p = parts(asyncio.new_event_loop())
    deliver(p, 1, protocol.encode_task("id-1", "t.sleep", [], {}))
    [job] = p.pool.sent
    child = types.SimpleNamespace(pid=99, index=1, job=job, queued=[])
    mb = make_mailbox(StubPool([child]))
    command(mb, call("revoke", {"task_id": "id-1", "terminate": True, "signal": "TERM"}))
    assert replies(mb) == [("oid-1", "t-1", {"ok": "terminate: id-1"})]
    assert mb.pool.killed == [(99, signal.SIGTERM)] and job.terminated == "SIGTERM"
    assert "id-1" in mb.revokes.revoked
    [record] = [body for exchange, key, body, _ in mb.conn.published if key == "rs"]
    assert record["task_id"] == ["id-1"] and record["terminate"] is True
    command(mb, call("revoke", {"task_id": ["id-1"], "terminate": True}))
    assert len(mb.pool.killed) == 1                     # signalled once
    command(mb, call("revoked"))
    assert replies(mb)[-1][2] == ["id-1"]


def test_a_revoke_from_a_taskd_client_is_not_appended_again():
    mb = make_mailbox()
    command(mb, call("revoke", {"task_id": ["a", "b"], "persisted": True}))
    assert [k for _, k, _, _ in mb.conn.published] == ["oid-1"]
    assert replies(mb)[0][2] == {"ok": "tasks a, b flagged as revoked"}


def test_bad_revoke_arguments_get_an_error_reply():
    mb = make_mailbox()
    command(mb, call("revoke", {"task_id": 5}))
    command(mb, call("revoke", {"task_id": "x", "terminate": True, "signal": "SIGNOPE"}))
    command(mb, call("pool_shrink", {"n": 5}))
    errors = [answer["error"] for _, _, answer in replies(mb)]
    assert "task_id must be" in errors[0] and "unknown signal" in errors[1]
    assert "cannot shrink below one child" in errors[2] and len(mb.revokes.revoked) == 0


def test_queue_commands_are_refused_while_not_consuming():
    mb = make_mailbox()
    command(mb, call("add_consumer", {"queue": "x"}))
    command(mb, call("cancel_consumer", {"queue": "q"}))
    command(mb, call("add_consumer", {}))
    errors = [answer["error"] for _, _, answer in replies(mb)]
    assert errors[:2] == ["not consuming now (connecting to the broker, or stopping)"] * 2
    assert errors[2] == "add_consumer needs a queue name"


def test_pool_grow_and_shrink_change_the_concurrency():
    mb = make_mailbox()
    command(mb, call("pool_grow", {"n": 2}))
    command(mb, call("pool_shrink"))
    assert mb.host.concurrency == 3
    assert [a["ok"] for _, _, a in replies(mb)] == ["pool will grow (concurrency 4)",
                                                     "pool will shrink (concurrency 3)"]


def test_the_stream_replay_ends_at_the_marker_and_honours_only_this_nodes_records(caplog):
    async def main():
        mb = make_mailbox()
        mb.revokes._marker, mb.revokes._synced = "m-1", asyncio.get_running_loop().create_future()
        acked = []
        channel = types.SimpleNamespace(basic_ack=acked.append)

        def record(body, tag, content_type="application/json"):
            method = types.SimpleNamespace(delivery_tag=tag)
            mb.revokes.on_record(channel, method, pika.BasicProperties(content_type=content_type),
                          json.dumps(body).encode())
        now = time.time()
        record(revokes.record(["old"], at=now - 120), 1)          # past the 60 s ttl
        record(revokes.record(["mine"], at=now - 30, destination=["n1@test"]), 2)
        record(revokes.record(["theirs"], destination=["n2@test"]), 3)
        record({"task_id": 7}, 4)                                   # malformed: dropped
        record({"sync": "other worker's"}, 5)
        assert not mb.revokes._synced.done()
        record({"sync": "m-1"}, 6)
        assert mb.revokes._synced.done() and acked == [1, 2, 3, 4, 5, 6]
        assert mb.revokes.revoked.ids() == ["mine"]
        assert mb.conn.published == []              # replayed records are not appended again
    caplog.set_level(logging.WARNING, "taskd.supervisor")
    asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if "record dropped" in r.getMessage()]


def test_the_revoked_set_is_bounded_by_age_counted_from_the_revoke_and_by_count():
    s = revokes.RevokedSet(ttl=100, maxlen=3)
    assert s.add("a", at=0, now=50) and not s.add("a", at=10, now=50)
    assert s.revoked("a", now=99) and not s.revoked("a", now=101)
    assert not s.add("too-old", at=0, now=200)
    for i in range(5):
        s.add(f"n{i}", now=300)
    assert s.ids(now=300) == ["n2", "n3", "n4"]          # the oldest forgotten first


def test_a_revoked_task_is_settled_revoked_on_receipt_and_when_its_eta_falls_due():
    async def main():
        p = parts(asyncio.get_running_loop())
        bodies = []
        publish = p.conn.publish
        p.conn.publish = lambda ex, key, body, *a, **k: (bodies.append(body),
                                                          publish(ex, key, body, *a, **k))
        p.outcomes.revoked = revokes.RevokedSet(60, 100)
        p.outcomes.revoked.add("id-1")
        deliver(p, 1, protocol.encode_task("id-1", "t.add", [], {}), reply_to="taskd.reply.x")
        soon = datetime.now(timezone.utc) + timedelta(seconds=0.05)
        deliver(p, 2, protocol.encode_task("id-2", "t.add", [], {}, eta=soon))
        assert len(p.dispatcher.schedule) == 1
        p.outcomes.revoked.add("id-2")                  # revoked while it is held
        await asyncio.sleep(0.1)
        assert p.pool.sent == [] and p.counters["revoked"] == 2
        [(queue, props, confirmed)] = p.conn.published
        meta = protocol.decode_result(bodies[0], props.content_type, props.content_encoding)
        assert queue == "taskd.reply.x" and meta["status"] == protocol.REVOKED
        confirmed(True)
        acks = [args for name, args, _ in p.conn.channel.sent if name == "basic_ack"]
        assert sorted(acks) == [(1,), (2,)]                 # both acked, 1 after its reply
    asyncio.run(main())


def test_a_child_terminated_by_a_revoke_is_not_a_crash_its_task_ends_revoked():
    async def main():
        p = parts(asyncio.get_running_loop())
        deliver(p, 1, protocol.encode_task("id-1", "t.sleep", [], {}), reply_to="taskd.reply.x")
        [job] = p.pool.sent
        job.terminated = "SIGTERM"
        p.outcomes.lost(job, "killed by SIGTERM")
        [(queue, props, confirmed)] = p.conn.published
        assert queue == "taskd.reply.x"                 # the caller's REVOKED, no copy
        assert p.counters["redelivered"] == 0 and p.counters["revoked"] == 1
        confirmed(True)
        assert [name for name, args, _ in p.conn.channel.sent] == ["basic_ack"]
    asyncio.run(main())


def test_signal_names_and_task_ids_are_checked():
    assert revokes.signal_number("TERM") == revokes.signal_number("SIGTERM") == 15
    assert revokes.signal_number("9") == 9 == revokes.signal_number(9)
    for bad in ("SIGNOPE", "", True, None):
        with pytest.raises(ValueError):
            revokes.signal_number(bad)
    assert revokes.task_ids("x") == ["x"]
    for bad in ([], [3], None, ""):
        with pytest.raises(ValueError):
            revokes.task_ids(bad)


def test_every_command_celery_and_flower_use_is_there():
    wanted = {"ping", "stats", "active", "scheduled", "reserved", "revoked", "registered",
              "conf", "active_queues", "query_task", "revoke", "add_consumer",
              "cancel_consumer", "pool_grow", "pool_shrink", "shutdown"}
    assert wanted <= set(panel.COMMANDS)
    assert mailbox_mod.QUEUE_ARGUMENTS == {"x-message-ttl": 300000, "x-expires": 10000}


def test_a_node_name_in_use_is_logged_once_and_taken_when_it_is_free(caplog):
    from taskd.worker.amqp import ChannelLost

    class Conn:
        taken = True

        def __init__(self):
            self.channel = types.SimpleNamespace(exchange_declare="exchange_declare",
                                                 queue_declare="queue_declare",
                                                 queue_bind="queue_bind")

        async def call(self, method, *args, **kwargs):
            if method == "queue_declare" and Conn.taken:
                raise ChannelLost("closed", types.SimpleNamespace(reply_code=405,
                                                                  reply_text="RESOURCE_LOCKED"))

    async def main():
        mb = make_mailbox()
        mb.loop = asyncio.get_running_loop()
        caplog.set_level(logging.DEBUG, "taskd.supervisor")
        assert await mb._declare_pidbox(Conn()) is False
        assert await mb._declare_pidbox(Conn()) is False
        Conn.taken = False
        assert await mb._declare_pidbox(Conn()) is True
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "another worker uses the node name 'n1@test'" in \
            errors[0].getMessage()
        assert "answering commands as n1@test" in caplog.records[-1].getMessage()
    asyncio.run(main())


def test_the_stream_is_declared_with_the_ttl_and_replayed_until_the_marker_comes_back():
    from taskd.worker.amqp import ChannelLost
    from taskd.worker.revoking import Revokes

    class Conn:
        is_open = True

        def __init__(self, refuse=None):
            self.refuse, self.calls, self.published, self.consumers = refuse, [], [], []
            self.channel = types.SimpleNamespace(
                queue_declare="queue_declare", basic_ack=lambda tag: None,
                basic_consume=lambda queue, cb, arguments: self.consumers.append(
                    (queue, cb, arguments)))

        async def call(self, method, *args, **kwargs):
            self.calls.append((method, args, kwargs))
            if self.refuse:
                raise ChannelLost("closed", types.SimpleNamespace(reply_code=self.refuse,
                                                                  reply_text="no"))

        def publish(self, exchange, key, body, properties, on_confirm=None):
            self.published.append((key, json.loads(body)))

    async def main():
        conn = Conn()
        r = Revokes(StubPool(), CONFIG, "n1@test", lambda: conn)
        opening = asyncio.create_task(r.open(conn, None))
        await asyncio.sleep(0.01)
        [(_, args, kwargs)] = conn.calls
        assert args == ("rs",) and kwargs["arguments"]["x-max-age"] == "60s"
        assert kwargs["arguments"]["x-queue-type"] == "stream"
        [(queue, on_record, arguments)] = conn.consumers
        assert queue == "rs" and arguments["x-stream-offset"] < datetime.now(timezone.utc)
        [(key, marker)] = conn.published
        assert key == "rs" and not opening.done()           # waits for its marker
        on_record(conn.channel, types.SimpleNamespace(delivery_tag=1),
                  pika.BasicProperties(content_type="application/json"),
                  json.dumps(marker).encode())
        await asyncio.wait_for(opening, 1)
        # A stream this user may not declare: logged, and the worker goes on without it.
        refused, fresh = Conn(refuse=403), Conn()

        async def reconnect():
            return fresh
        await Revokes(StubPool(), CONFIG, "n1@test", lambda: fresh).open(refused, reconnect)
        assert fresh.consumers == []
    asyncio.run(main())


def test_after_a_reconnect_the_mailbox_opens_beside_the_task_consumer():
    """The first open replays the revokes before any task is consumed; after a reconnect
    the revokes read so far stay known and the mailbox opens beside the consumer, so a
    revoke stream slowed by a failover never holds up the tasks."""
    mb = make_mailbox()
    mb.loop = loop = asyncio.new_event_loop()
    opened = []

    async def open_():
        opened.append("open")
    mb.open = open_
    try:
        mb.replayed, mb.conn = True, StubConn()
        mb.open_beside()                    # still connected: nothing to do
        loop.run_until_complete(asyncio.sleep(0))
        assert opened == []
        mb.conn = None                      # the link reconnected without it
        mb.open_beside()
        loop.run_until_complete(asyncio.sleep(0))
        assert opened == ["open"]
    finally:
        loop.close()
