"""The worker's publishing AsyncChannel after a basic.nack: later publishes go on a new
channel; the old one settles what it owes, then closes (stub pika objects, no broker)."""
import asyncio

import pika
import pika.frame
import pika.spec

from taskd.worker.amqp import AsyncChannel


class StubPikaChannel:
    def __init__(self, number):
        self.channel_number, self.is_open = number, True
        self.published, self.close_callbacks = [], []

    def basic_publish(self, exchange, routing_key, body, properties, mandatory=False):
        self.published.append(routing_key)

    def confirm_delivery(self, ack_nack_callback, callback):
        callback(None)

    def add_on_close_callback(self, fn):
        self.close_callbacks.append(fn)

    def add_on_return_callback(self, fn):
        pass

    def close(self):
        self.is_open = False
        for fn in self.close_callbacks:
            fn(self, pika.exceptions.ChannelClosedByClient(200, "Normal shutdown"))


class StubConnection:
    is_open = True

    def __init__(self):
        self.channels = []

    def channel(self, on_open_callback):
        ch = StubPikaChannel(len(self.channels) + 2)
        self.channels.append(ch)
        on_open_callback(ch)

    def close(self):
        raise AssertionError("the connection must stay open")


def confirm(conn, channel, tag, ok=True, multiple=False):
    method = (pika.spec.Basic.Ack if ok else pika.spec.Basic.Nack)(delivery_tag=tag,
                                                                     multiple=multiple)
    conn._on_confirm(pika.frame.Method(channel.channel_number, method))


def test_after_a_nack_publishes_go_on_a_new_channel_and_the_old_one_settles_then_closes():
    loop = asyncio.new_event_loop()
    try:
        lost = []
        conn = AsyncChannel(loop, "amqp://h/", connect_timeout=1, heartbeat=0, name="pub",
                            on_lost=lost.append)
        first = StubPikaChannel(1)
        conn.connection, conn.channel = StubConnection(), first
        first.add_on_close_callback(conn._on_channel_closed)
        outcomes = {}
        props = pika.BasicProperties()
        for key in ("a", "b", "c"):
            conn.publish("", key, b"", props, lambda ok, key=key: outcomes.__setitem__(key, ok))
        confirm(conn, first, 1, ok=False)                  # a: nacked
        loop.run_until_complete(asyncio.sleep(0))          # the renewal runs
        loop.run_until_complete(asyncio.sleep(0))
        [second] = conn.connection.channels
        assert conn.channel is second and first.is_open    # b and c still owed on the old one
        conn.publish("", "d", b"", props, lambda ok: outcomes.__setitem__("d", ok))
        assert second.published == ["d"] and conn.unconfirmed == 3
        drained = conn.all_confirmed()
        confirm(conn, second, 1)                           # d: tag 1 of the new channel
        assert outcomes == {"a": False, "d": True} and not drained.done()
        confirm(conn, first, 3, multiple=True)             # b, c: tags 2, 3 of the old one
        assert outcomes == {"a": False, "b": True, "c": True, "d": True}
        assert not first.is_open and conn.unconfirmed == 0 and drained.done()
        assert conn.channel is second and second.is_open and lost == []
    finally:
        loop.close()
