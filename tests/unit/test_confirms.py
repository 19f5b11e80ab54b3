"""The publisher's confirm ledger (taskd.broker.confirms.Confirms), fed pika frames by hand."""
import types

import pika.spec

from taskd.broker.confirms import Confirms


def frame(method_cls, tag, multiple=False):
    return types.SimpleNamespace(method=method_cls(delivery_tag=tag, multiple=multiple))


def returned(confirms, task_id, key="nowhere"):
    confirms.on_return(None, types.SimpleNamespace(exchange="tasks", routing_key=key),
                       types.SimpleNamespace(correlation_id=task_id), b"")


def test_an_ack_settles_one_publish_and_a_multiple_ack_all_up_to_its_tag():
    c = Confirms()
    seqs = [c.add(t) for t in ("a", "b", "c")]
    assert seqs == [1, 2, 3] and len(c) == 3
    c.on_confirm(frame(pika.spec.Basic.Ack, 2))
    assert list(c.pending.values()) == ["a", "c"]
    c.on_confirm(frame(pika.spec.Basic.Ack, 3, multiple=True))
    assert not c and c.take_failures() == []


def test_a_nack_and_a_return_are_failures_named_by_task():
    c = Confirms()
    c.add("a"), c.add("b"), c.add("c")
    c.on_confirm(frame(pika.spec.Basic.Nack, 1))
    returned(c, "b")
    c.on_confirm(frame(pika.spec.Basic.Ack, 2))
    assert c.take_failures("b") == [
        ("b", "reached no queue: exchange 'tasks' has no binding for routing key 'nowhere'")]
    assert c.take_failures() == [("a", "the broker refused it (basic.nack)")]
    assert list(c.pending.values()) == ["c"]


def test_what_is_pending_when_the_channel_goes_fails_and_numbering_restarts():
    c = Confirms()
    c.add("a")
    returned(c, "a")
    c.lost("its channel closed", channel_closed=True)
    assert not c and not c.returned
    assert c.take_failures() == [("a", "no confirm: its channel closed")]
    assert c.add("b") == 1


def test_given_up_publishes_are_forgotten_so_a_late_confirm_or_return_settles_nothing():
    c = Confirms()
    c.add("a"), c.add("b")
    assert c.give_up() == ["a", "b"] and not c
    returned(c, "a")
    c.on_confirm(frame(pika.spec.Basic.Nack, 2, multiple=True))
    assert c.take_failures() == [] and not c.returned
