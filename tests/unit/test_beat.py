"""The beat part (taskd/worker/beat.py) against a stub channel, the clocks passed in:
what one transaction holds, when a worker leads, and the cursors it keeps or drops."""
import asyncio
import collections
import json
import types
from datetime import datetime, timezone

import pytest

from taskd import config as config_mod, periodic
from taskd.worker import beat as beat_mod
from taskd.worker.beat import Beat, CURSOR, MARKER, TICK_TYPE

CONFIG = config_mod.loads("""
schedule:
  hb: {task: t.hb, every: 10, args: [1]}
  nightly: {task: t.n, cron: "0 3 * * *", options: {queue: low, priority: 0}}
""")
T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()


class StubChannel:
    """Records publishes and acks; each tx_commit closes one transaction."""

    def __init__(self):
        self.open, self.transactions = [], []

    def basic_publish(self, exchange, routing_key, body, properties, mandatory=False):
        self.open.append(("publish", exchange, routing_key, body, properties))

    def basic_ack(self, tag):
        self.open.append(("ack", tag))

    def tx_commit(self, callback):
        self.transactions.append(self.open)
        self.open = []
        callback(None)

    def queue_declare(self, *args, callback, **kwargs):
        callback(None)

    exchange_declare = queue_bind = queue_declare


class StubConn:
    is_open = True

    def __init__(self):
        self.channel = StubChannel()

    def call(self, method, *args, **kwargs):
        future = asyncio.get_running_loop().create_future()
        method(*args, callback=lambda frame: future.set_result(frame), **kwargs)
        return future


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def make(loop, config=CONFIG):
    wall, mono = Clock(T0), Clock(100.0)
    shutdown = types.SimpleNamespace(stopping=False, requested=asyncio.Event())
    b = Beat(loop, config, collections.Counter(), shutdown, clock=wall, monotonic=mono)
    b.link.conn = StubConn()
    return b, wall, mono


def deliver(b, tag, kind, body):
    method = types.SimpleNamespace(delivery_tag=tag)
    b.on_message(b.link.conn.channel, method, types.SimpleNamespace(type=kind), body)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


def lead(b):
    """Standby -> a delivery -> our marker back: leading."""
    b.role = beat_mod.STANDBY
    deliver(b, 1, TICK_TYPE, b"someone-else")
    assert b.role == beat_mod.SETTLING
    deliver(b, 2, MARKER, b.marker.encode())
    assert b.role == beat_mod.LEADING


def test_a_worker_leads_only_once_its_own_marker_came_back():
    async def main():
        b, _, _ = make(asyncio.get_running_loop())
        b.role = beat_mod.STANDBY
        deliver(b, 1, TICK_TYPE, b"other-node")
        assert b.role == beat_mod.SETTLING
        await settle()
        (marker_tx,) = b.link.conn.channel.transactions
        assert marker_tx[0][4].type == MARKER and marker_tx[0][3] == b.marker.encode()
        deliver(b, 2, MARKER, b"a-stale-marker-of-another-worker")
        assert b.role == beat_mod.SETTLING
        deliver(b, 3, MARKER, b.marker.encode())
        assert b.role == beat_mod.LEADING
        await settle()
        # leading: a cursor for each entry that has none, persistent, in the beat queue
        created = b.link.conn.channel.transactions[-1]
        cursors = [periodic.decode_cursor(op[3]) for op in created if op[0] == "publish"]
        assert sorted(n for n, _ in cursors) == ["hb", "nightly"]
        assert all(op[4].delivery_mode == 2 for op in created if op[0] == "publish")
        acked = [op for tx in b.link.conn.channel.transactions for op in tx if op[0] == "ack"]
        assert sorted(acked) == [("ack", 1), ("ack", 2), ("ack", 3)]  # ticks, markers acked
    run(main())


def test_a_due_slot_is_fired_in_one_transaction_with_its_next_cursor_and_the_old_ack():
    async def main():
        b, wall, mono = make(asyncio.get_running_loop())
        lead(b)
        await settle()
        b.link.conn.channel.transactions.clear()
        deliver(b, 7, CURSOR, periodic.encode_cursor("hb", datetime.fromtimestamp(
            T0, timezone.utc)))
        wall.t = T0 + 10.2
        await b.fire_due()
        (tx,) = b.link.conn.channel.transactions
        publish_task, publish_cursor, ack = tx[0], tx[1], tx[-1]
        slot = datetime.fromtimestamp(T0 + 10, timezone.utc)
        props = publish_task[4]
        assert props.headers["id"] == periodic.task_id("hb", slot) == props.correlation_id
        assert props.headers["x-taskd-slot"] == periodic.iso(slot)
        assert props.delivery_mode == 2 and props.reply_to is None
        assert json.loads(publish_task[3])[0] == [1]
        assert periodic.decode_cursor(publish_cursor[3]) == ("hb", slot)
        assert ack == ("ack", 7)
        assert "hb" not in b.cursors and "hb" in b.coming     # no second fire before it is back
        await b.fire_due()
        assert len(b.link.conn.channel.transactions) == 1
        assert b.fired["hb"]["slot"] == periodic.iso(slot)
    run(main())


def test_the_entry_options_route_the_task():
    async def main():
        b, _, _ = make(asyncio.get_running_loop())
        slot = datetime(2026, 5, 2, 3, tzinfo=timezone.utc)
        message, route = b.message(b.entries["nightly"], slot, slot)
        assert (route.exchange, route.routing_key) == ("", "low")
        assert message.priority == 9 and message.task_id == periodic.task_id("nightly", slot)
    run(main())


def test_a_leader_whose_own_ticks_stopped_coming_back_does_not_fire():
    async def main():
        b, wall, mono = make(asyncio.get_running_loop())
        lead(b)
        await settle()
        b.link.conn.channel.transactions.clear()
        deliver(b, 7, CURSOR, periodic.encode_cursor("hb", datetime.fromtimestamp(
            T0, timezone.utc)))
        wall.t, mono.t = T0 + 30, mono.t + beat_mod.LEASE + 0.1
        await b.fire_due()
        assert b.link.conn.channel.transactions == []
        deliver(b, 8, TICK_TYPE, b.node.encode())       # our tick is back: the lease too
        await b.fire_due()
        assert len(b.link.conn.channel.transactions) == 1
    run(main())


def test_two_cursors_of_one_entry_keep_the_one_further_on():
    async def main():
        b, _, _ = make(asyncio.get_running_loop())
        lead(b)
        early = datetime.fromtimestamp(T0 - 100, timezone.utc)
        late = datetime.fromtimestamp(T0 - 10, timezone.utc)
        deliver(b, 5, CURSOR, periodic.encode_cursor("hb", late))
        deliver(b, 6, CURSOR, periodic.encode_cursor("hb", early))
        assert b.cursors["hb"].tag == 5 and b.cursors["hb"].last == late
        assert 6 in b.to_ack
    run(main())


def test_cursors_of_entries_no_longer_configured_are_dropped_and_bad_ones_acked():
    async def main():
        b, _, _ = make(asyncio.get_running_loop())
        deliver(b, 9, CURSOR, periodic.encode_cursor("gone", datetime.fromtimestamp(
            T0, timezone.utc)))
        assert "gone" in b.cursors      # not leading yet: kept until the marker is back
        lead(b)
        await settle()
        assert "gone" not in b.cursors
        assert any(("ack", 9) in tx for tx in b.link.conn.channel.transactions)
        deliver(b, 10, CURSOR, b"not json")
        assert 10 in b.to_ack
    run(main())


def test_cursors_held_past_refresh_are_published_again():
    async def main():
        b, wall, mono = make(asyncio.get_running_loop())
        lead(b)
        await settle()
        b.link.conn.channel.transactions.clear()
        last = datetime.fromtimestamp(T0, timezone.utc)
        deliver(b, 11, CURSOR, periodic.encode_cursor("nightly", last))
        mono.t += beat_mod.REFRESH + 1
        await b._commit(lambda ch: b._refresh(ch, wall.t))
        (tx,) = b.link.conn.channel.transactions
        assert periodic.decode_cursor(tx[0][3]) == ("nightly", last)
        assert ("ack", 11) in tx and "nightly" in b.coming
    run(main())


@pytest.mark.parametrize("kind", [TICK_TYPE, MARKER])
def test_deliveries_of_another_channel_are_ignored(kind):
    async def main():
        b, _, _ = make(asyncio.get_running_loop())
        b.role = beat_mod.STANDBY
        b.on_message(object(), types.SimpleNamespace(delivery_tag=1),
                      types.SimpleNamespace(type=kind), b"x")
        assert b.role == beat_mod.STANDBY and b.to_ack == []
    run(main())


def test_a_delivery_before_standing_by_still_starts_the_take_over():
    async def main():
        b, _, _ = make(asyncio.get_running_loop())
        b.role = beat_mod.CONNECTING                # consuming, standing_by() not run yet
        deliver(b, 1, TICK_TYPE, b"other-node")
        assert b.role == beat_mod.SETTLING
        b.link.conn = None                          # the tick loop ends at once
        await b.standing_by()
        assert b.role == beat_mod.SETTLING
    run(main())


def test_a_started_beat_takes_its_first_delivery_as_the_sign_it_is_active():
    async def main():
        b, _, _ = make(asyncio.get_running_loop())
        b.link.start = lambda: None                 # no connection in a unit test
        b.start()
        assert b.role == beat_mod.CONNECTING
        b.link.conn = None
        await b.standing_by()
        assert b.role == beat_mod.STANDBY
        b.link.conn = StubConn()
        deliver(b, 1, TICK_TYPE, b"other-node")
        assert b.role == beat_mod.SETTLING
    run(main())
