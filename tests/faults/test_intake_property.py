"""Property (hypothesis), against a real worker and the real broker: every message a
sender can send ends in exactly one of three ways,

* run (``ttasks.note`` recorded its token) and acked,
* dead-lettered with a reason, its caller answered with a FAILURE,
* refused with a FAILURE or REVOKED answer to its caller (expired),

and the worker never loops on a message nor reconnects because of one.

Messages come from :mod:`fuzzmessages`. CI runs a few dozen examples; set
``TASKD_FUZZ_EXAMPLES`` to run more (docs/worker.md, "Fuzzing the intake").
"""
import os
import subprocess
import time
import uuid

import amqp
import pika
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, assume, given, settings, strategies as st  # noqa: E402

from conftest import executions, wait_for  # noqa: E402
from fuzzmessages import messages  # noqa: E402
from taskd import protocol  # noqa: E402

EXAMPLES = int(os.environ.get("TASKD_FUZZ_EXAMPLES", "40"))
SETTLE = 10.0           # seconds a message may take to settle
LOST, LOOP = "lost the broker connection", "internal error handling"


class Sender:
    """Sends each message as it is drawn, redelivered if it says so, and watches its fate."""

    def __init__(self, broker, queue, replies, dead, out):
        self.queue, self.replies, self.dead, self.out = queue, replies, dead, out
        self.conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        self.channel = self.conn.channel()
        self.channel.queue_declare(replies, exclusive=True)
        self.outcomes = {}          # token -> list of what was seen

    def send(self, msg):
        props = pika.BasicProperties(
            content_type=msg.content_type, content_encoding=msg.content_encoding,
            correlation_id=msg.token, reply_to=self.replies, headers=msg.headers,
            delivery_mode=2)
        if msg.redelivered:
            self._redelivered(lambda: self._publish(msg, props))
        else:
            self._publish(msg, props)

    def _publish(self, msg, props):
        if not msg.needs_py_amqp:
            self.channel.basic_publish("", self.queue, msg.body, props)
            return
        conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        conn.connect()
        try:
            conn.channel().basic_publish(amqp.Message(
                msg.body, content_type=msg.content_type, content_encoding=msg.content_encoding,
                correlation_id=msg.token, reply_to=self.replies, delivery_mode=2,
                application_headers={**msg.headers, **msg.doubles}),
                exchange="", routing_key=self.queue)
        finally:
            conn.close()

    def _redelivered(self, publish):
        """A consumer of higher priority than the worker's takes the message and closes its
        channel without acking: the broker gives it to the worker, flagged redelivered."""
        channel = self.conn.channel()
        channel.basic_qos(prefetch_count=1)
        taken = []
        channel.basic_consume(self.queue, lambda *a: taken.append(a), arguments={"x-priority": 10})
        publish()
        deadline = time.monotonic() + 5
        while not taken and time.monotonic() < deadline:
            self.conn.process_data_events(0.01)
        assert taken, "the high-priority consumer got nothing"
        channel.close()

    def collect(self):
        for queue, kind in ((self.replies, "reply"), (self.dead, "dead")):
            while True:
                method, props, body = self.channel.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                if kind == "reply":
                    meta = protocol.decode_result(body, props.content_type,
                                                  props.content_encoding)
                    what = ("reply", meta["status"])
                else:
                    what = ("dead", props.headers.get("x-taskd-reason"))
                self.outcomes.setdefault(props.correlation_id, []).append(what)
        for token, count in executions(self.out).items():
            seen = self.outcomes.setdefault(token, [])
            ran = [o for o in seen if o[0] == "ran"]
            seen.extend([("ran", None)] * (count - len(ran)))

    def settled(self, token):
        self.collect()
        seen = self.outcomes.get(token, [])
        kinds = {o[0] for o in seen}
        return "dead" in kinds or "ran" in kinds or \
            any(o in (("reply", "FAILURE"), ("reply", "REVOKED")) for o in seen)


def check_one_fate(token, seen):
    """Exactly one of: ran; dead-lettered (with a reason) and answered FAILURE;
    answered FAILURE/REVOKED without running."""
    ran = [o for o in seen if o[0] == "ran"]
    dead = [o for o in seen if o[0] == "dead"]
    replies = [o[1] for o in seen if o[0] == "reply"]
    assert len(replies) <= 1, f"{token}: {len(replies)} replies: {seen}"
    if dead:
        assert not ran and len(dead) == 1, f"{token}: dead-lettered, and also {seen}"
        assert dead[0][1], f"{token}: dead-lettered without a reason"
        assert replies == ["FAILURE"], f"{token}: dead-lettered, answered {replies}"
    elif ran:
        assert len(ran) == 1, f"{token}: ran {len(ran)} times"
    else:
        assert replies in (["FAILURE"], ["REVOKED"]), f"{token}: no fate: {seen}"


@pytest.fixture
def sender(topo, workers, broker, tmp_path):
    path = topo.config({"accept_content": ["json", "yaml", "msgpack"]}, concurrency=2)
    worker = workers(path).ready()
    s = Sender(broker, topo.name("celery"), f"taskd.reply.{uuid.uuid4()}", topo.dead,
               tmp_path / "runs.txt")
    s.worker = worker
    yield s
    s.conn.close()


def test_every_message_ends_in_exactly_one_way(sender, topo, tmp_path):
    out = str(tmp_path / "runs.txt")
    sent = []

    # No shrinking: each failing attempt waits SETTLE seconds; the first failing
    # message is reported as drawn.
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one_message(data):
        token = f"m{uuid.uuid4().hex[:12]}"
        msg = data.draw(messages(out, token))
        assume(len(pika.BasicProperties(headers=msg.headers).encode()[0]) < 64 * 1024)
        sender.send(msg)
        sent.append(token)
        wait_for(lambda: sender.settled(token), timeout=SETTLE,
                 message=f"message {token} to settle: {msg!r:.2000}\n{sender.worker.log[-3000:]}")
        assert sender.worker.proc.poll() is None, sender.worker.log[-3000:]

    one_message()
    time.sleep(0.5)                 # a second fate, if any, shows up by now
    sender.collect()
    for token in sent:
        check_one_fate(token, sender.outcomes.get(token, []))
    log = sender.worker.log
    assert LOST not in log and LOOP not in log, log[-5000:]
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages_ready",
                          "messages_unacknowledged"], capture_output=True, text=True).stdout
    row = [line.split() for line in out.splitlines() if line.startswith(topo.name("celery"))]
    assert row == [[topo.name("celery"), "0", "0"]], row
