"""A broker that refuses what the worker publishes: no reconnect loop, the caller is told."""
import pytest

import rmqnode
from conftest import wait_for

pytestmark = pytest.mark.skipif(not rmqnode.available(),
                                reason="needs rabbitmq-server on this machine and root "
                                       "(to run a private node as the rabbitmq user)")

LIMIT = 1024 * 1024


@pytest.fixture
def small_node():
    n = rmqnode.RabbitNode(max_message_size=LIMIT).start()
    yield n
    n.destroy()


def test_a_result_larger_than_the_broker_takes_becomes_a_failure_not_a_reconnect_loop(
        topo, workers, app_for, small_node):
    path = topo.config({"broker": {"url": small_node.url}}, concurrency=1)
    w = workers(path).ready()
    app = app_for(path)
    with pytest.raises(Exception, match=rf"result too large: \d+ bytes, broker limit {LIMIT}"):
        app.send_task("ttasks.big", [2_000_000]).get(timeout=20)
    assert app.send_task("ttasks.add", [1, 1]).get(timeout=10) == 2
    wait_for(lambda: "reconnected" in w.log, message="the reconnect")
    lost = [line for line in w.lines if "lost the broker connection" in line]
    assert len(lost) == 1, lost
    assert "larger than configured max size" in lost[0]
