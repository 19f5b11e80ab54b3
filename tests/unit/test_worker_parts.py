"""The worker's parts, each on its own against stub channels (no broker, no children):
the consumer's QoS, the intake's verdicts, the dispatcher's checks, how outcomes end a
delivery, and the records on the child pipes."""
import asyncio
import collections
import re
import types
from datetime import datetime, timedelta, timezone

import pika

from taskd import config as config_mod, protocol
from taskd.worker import framing
from taskd.worker.acker import Acker
from taskd.worker.consumer import Consumer
from taskd.worker.dispatch import Dispatcher
from taskd.worker.recovery import Duplicates
from taskd.worker.intake import Intake
from taskd.worker.outcomes import Outcomes
from taskd.worker.replies import Replies

CONFIG = config_mod.loads("worker:\n  dead_letter_queue: dlq\n")


class StubChannel:
    """A pika channel that records what it is asked to send."""

    def __init__(self):
        self.sent, self.consumer_tags = [], set()

    def __getattr__(self, name):      # basic_qos, basic_ack, basic_nack, basic_reject ...
        return lambda *args, **kwargs: self.sent.append((name, args, kwargs))


class StubConn:
    """An AsyncChannel: its pika channel, and publishes whose confirms the test gives."""
    is_open, frame_max, unconfirmed = True, 0, 0

    def __init__(self):
        self.channel, self.published = StubChannel(), []

    def publish(self, exchange, routing_key, body, properties, on_confirm=None, mandatory=False):
        self.published.append((routing_key, properties, on_confirm))


class StubCopies:
    def publish(self, conn, exchange, routing_key, body, properties, on_confirm):
        conn.publish(exchange, routing_key, body, properties, on_confirm, mandatory=True)


class StubPool:
    def __init__(self):
        self.sent = []

    def busy(self):
        return []

    def room(self, depth):
        return {"child": depth}

    def send(self, child, batch, data):
        self.sent.extend(batch)
        return []               # none started now (no hard time limit to arm)


def parts(loop):
    counters = collections.Counter()
    conn = StubConn()
    acker = Acker(loop, lambda: False)
    acker.attach(conn)
    replies = Replies(loop, acker.complete, counters, re.compile(config_mod.REPLY_TO_PATTERN))
    replies.publisher = conn
    duplicates = Duplicates(counters)
    outcomes = Outcomes(loop, acker, replies, StubCopies(), duplicates, counters, CONFIG)
    consumer = Consumer(loop, None, None, CONFIG)
    consumer.conn = conn
    consumer.consumers = types.SimpleNamespace(tags={"ctag": "q"})
    pool = StubPool()
    dispatcher = Dispatcher(loop, pool, outcomes, consumer.hold, CONFIG)
    intake = Intake(consumer, acker, dispatcher, outcomes, duplicates, pool, counters, CONFIG)
    return types.SimpleNamespace(conn=conn, acker=acker, outcomes=outcomes, pool=pool,
                                 dispatcher=dispatcher, intake=intake, counters=counters,
                                 consumer=consumer)


def deliver(p, tag, message, reply_to=None):
    method = types.SimpleNamespace(delivery_tag=tag, consumer_tag="ctag", exchange="",
                                   routing_key="q", redelivered=False)
    props = pika.BasicProperties(headers=message.headers, content_type=message.content_type,
                                 content_encoding=message.content_encoding,
                                 correlation_id=message.headers.get("id"), reply_to=reply_to)
    p.intake.on_delivery(p.conn.channel, method, props, message.body)


def test_the_consumer_raises_its_prefetch_for_held_jobs_and_lowers_it_with_hysteresis():
    c = Consumer(None, None, None, CONFIG)
    c.conn, c.base = StubConn(), 4
    c.hold(10)
    assert c.prefetch == 4 + 10 + 4
    c.hold(9)                       # within the band: no new basic.qos
    c.hold(5)
    c.hold(0)
    assert c.prefetch == 4
    assert [kw["prefetch_count"] for _, _, kw in c.conn.channel.sent] == [18, 13, 4]
    c.resize(8)
    assert c.conn.channel.sent[-1][2] == {"prefetch_count": 8}


def test_a_task_message_goes_to_the_dispatcher_and_bad_input_to_the_dead_letter_queue():
    async def main():
        p = parts(asyncio.get_running_loop())
        deliver(p, 1, protocol.encode_task("id-1", "t.add", [2, 2], {}))
        assert [j.request.name for j in p.pool.sent] == ["t.add"]      # dispatched
        bad = protocol.encode_task("id-2", "t.add", [], {})
        bad.headers["id"] = 5                                            # not a task id
        deliver(p, 2, bad, reply_to="taskd.reply.x")
        [(queue, props, confirmed)] = p.conn.published
        assert queue == "dlq" and "InvalidTaskMessage" in props.headers["x-taskd-reason"]
        assert p.conn.channel.sent == []        # nothing acked before the confirm
        confirmed(True)                         # the copy is stored: the caller is told
        (reply_queue, reply_props, reply_confirmed) = p.conn.published[1]
        assert reply_queue == "taskd.reply.x"
        reply_confirmed(True)                   # and then it is acked
        assert p.conn.channel.sent == [("basic_ack", (2,), {"multiple": False})]
    asyncio.run(main())


def test_an_unknown_task_is_dead_lettered_by_the_dispatcher_not_sent_to_a_child():
    async def main():
        p = parts(asyncio.get_running_loop())
        p.dispatcher.tasks({"t.known": (None, None)})
        deliver(p, 1, protocol.encode_task("id-1", "t.unknown", [], {}))
        assert p.pool.sent == [] and p.counters["dead_lettered"] == 1
        assert "NotRegistered" in p.conn.published[0][1].headers["x-taskd-reason"]
    asyncio.run(main())


def test_a_task_with_an_eta_is_held_and_the_prefetch_follows():
    async def main():
        p = parts(asyncio.get_running_loop())
        p.consumer.base = 2
        soon = datetime.now(timezone.utc) + timedelta(seconds=30)
        deliver(p, 1, protocol.encode_task("id-1", "t.add", [], {}, eta=soon))
        assert p.pool.sent == [] and len(p.dispatcher.schedule) == 1
        assert p.consumer.prefetch == 2 + 1 + 2
        assert p.dispatcher.drop() == 1
    asyncio.run(main())


def test_a_redelivered_copy_is_published_and_a_delivery_given_back_is_nacked():
    async def main():
        p = parts(asyncio.get_running_loop())
        deliver(p, 1, protocol.encode_task("id-1", "t.add", [], {}))
        [job] = p.pool.sent
        p.outcomes.redeliver(job, "was killed by SIGKILL")
        [(queue, props, confirmed)] = p.conn.published
        assert queue == "q" and props.headers["x-taskd-delivery-count"] == 1    # 2nd delivery
        assert p.conn.channel.sent == []
        p.outcomes.give_back(job, delay=0)      # what confirmed(False) does, without pause
        assert p.conn.channel.sent == [("basic_nack", (1,), {"requeue": True})]
        assert p.acker.settled(1)
    asyncio.run(main())


def test_frames_are_records_at_both_ends_and_tuples_on_the_wire():
    outcome = framing.Outcome(7, "SUCCESS", b"{}", "application/json", "utf-8", 0.1, 0, None,
                             None)
    [wire] = framing.FrameReader().feed(framing.encode_record(outcome))
    assert type(wire) is tuple and wire[0] == "done"
    assert framing.up(wire) == outcome and framing.up(wire).seq == 7
    assert framing.up(("no-such-kind", 1)) is None and framing.up(("done", 1)) is None
    job = framing.Job(1, "id", "t.add", [2, 2], {}, {})
    [wire] = framing.FrameReader().feed(framing.encode_job(job))
    assert framing.job(wire).name == "t.add"
