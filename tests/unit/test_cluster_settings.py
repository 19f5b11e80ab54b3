"""broker.url naming several nodes, broker.failover, worker.system_queue_type (issue 18)."""
import pytest

from taskd.broker import topology
from taskd.broker.nodes import Nodes, split_urls
from taskd.config import validate
from taskd.exceptions import ConfigError
from taskd.masking import mask_value
from taskd.worker import parking

A, B, C = ("amqp://u:pw@a:5672/%2F", "amqp://u:pw@b:5672/%2F", "amqp://u:pw@c:5672/%2F")


def cfg(**broker):
    return validate({"broker": broker}, environ={})


def test_broker_url_takes_a_list_or_a_semicolon_separated_string():
    assert cfg(url=[A, B, C]).broker_urls == (A, B, C)
    assert cfg(url=f"{A}; {B};{C};").broker_urls == (A, B, C)
    assert cfg(url=A).broker_urls == (A,) and cfg(url=A).broker_url == A
    env = validate({}, environ={"TASKD_BROKER_URL": f"{A};{B}"})
    assert env.broker_urls == (A, B)


@pytest.mark.parametrize("bad", [[], [A, 3], ";", ""])
def test_a_broker_url_that_names_no_node_is_refused_without_printing_passwords(bad):
    with pytest.raises(ConfigError) as info:
        cfg(url=bad)
    assert "broker.url" in str(info.value) and "pw" not in str(info.value)


def test_round_robin_starts_after_the_node_that_failed():
    nodes = Nodes([A, B, C])
    assert nodes.order() == [A, B, C]
    nodes.failed(A)
    assert nodes.order() == [B, C, A]
    nodes.connected(B)
    nodes.failed(A)             # not the first in line: changes nothing
    assert nodes.order() == [B, C, A]
    nodes.failed(B)
    assert nodes.order() == [C, A, B]
    assert nodes.position(C) == "node 3 of 3" and Nodes([A]).position(A) == ""


def test_shuffle_draws_one_order_per_owner_and_still_moves_a_failed_node_back():
    nodes = Nodes([A, B, C], "shuffle", shuffle=lambda urls: urls.reverse())
    assert nodes.order() == [C, B, A]
    nodes.failed(C)
    assert nodes.order() == [B, A, C]
    assert cfg(url=[A, B], failover="shuffle").nodes().strategy == "shuffle"
    with pytest.raises(ConfigError, match="broker.failover"):
        cfg(url=[A, B], failover="random")


def test_system_queues_are_quorum_for_a_cluster_and_classic_for_one_node_unless_set():
    assert cfg(url=[A, B]).system_queue_type == "quorum"
    assert cfg(url=A).system_queue_type == "classic"
    assert validate({"broker": {"url": A}, "worker": {"system_queue_type": "quorum"}},
                    environ={}).system_queue_type == "quorum"
    assert validate({"broker": {"url": [A, B]}, "worker": {"system_queue_type": "classic"}},
                    environ={}).system_queue_type == "classic"


def test_quorum_system_queues_declare_their_type_and_dead_letter_at_least_once():
    [dead] = topology.dead_letter_plan("taskd.dead", "quorum")
    assert dead.argument_dict == {"x-queue-type": "quorum"}
    assert topology.dead_letter_plan("taskd.dead")[0].argument_dict is None
    queues = [op for op in parking.plan("taskd.delay", "quorum")
              if isinstance(op, topology.DeclareQueue)]
    assert len(queues) == len(parking.BUCKETS)
    assert queues[3].argument_dict == {
        "x-queue-type": "quorum", "x-message-ttl": 8000, "x-dead-letter-exchange": "",
        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    classic = [op for op in parking.plan("taskd.delay") if isinstance(op, topology.DeclareQueue)]
    assert "x-queue-type" not in classic[0].argument_dict


def test_tls_needs_amqps_on_every_node():
    with pytest.raises(ConfigError, match="broker.tls: is set but broker.url uses amqp://"):
        cfg(url=["amqps://u:pw@a/", "amqp://u:pw@b/"], tls={"verify": False})


def test_only_a_semicolon_that_starts_a_new_url_separates_two():
    tricky = "amqp://u:pa;ss@a:5672/%2F"               # an unencoded ";" in the password
    assert split_urls(f"{tricky};{B}") == (tricky, B)
    assert mask_value("broker.url", f"{tricky};{B}") == \
        "amqp://u:***@a:5672/%2F;amqp://u:***@b:5672/%2F"


def test_a_list_of_urls_is_masked_when_printed():
    assert mask_value("broker.url", [A, B]) == ["amqp://u:***@a:5672/%2F",
                                                "amqp://u:***@b:5672/%2F"]
    assert "pw" not in mask_value("broker.url", f"{A};{B}")
    assert split_urls(None) == ()
