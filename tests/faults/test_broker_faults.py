"""Broker faults: cut connections and a broker that is not there yet.

The worker talks to RabbitMQ through a TCP proxy the test controls; the client
talks to RabbitMQ directly. Executions are counted by token in a file."""

import pytest

from conftest import executions, wait_for
from tcpproxy import Proxy


@pytest.fixture
def proxy():
    p = Proxy().start()
    yield p
    p.stop()



def test_cutting_the_workers_connection_mid_stream_loses_nothing(topo, workers, app_for,
                                                                  proxy, tmp_path):
    direct = topo.config(name="client.yaml")
    via_proxy = topo.config({"broker": {"url": proxy.url, "heartbeat": 5}}, name="worker.yaml",
                            concurrency=2)
    w = workers(via_proxy).ready()
    app = app_for(direct)
    out = tmp_path / "runs.txt"
    n, cuts = 1000, 3
    results = [app.send_task("ttasks.record", [str(out), f"t{i}", 0.002]) for i in range(n)]
    for cut in range(cuts):
        milestone = (cut + 1) * n // (cuts + 1)      # cut at 250, 500, 750 executions
        try:
            wait_for(lambda: sum(executions(out).values()) >= milestone,
                     timeout=30, message="progress before a cut")
        except AssertionError:
            raise AssertionError(f"no progress after cut {cut}; worker log:\n{w.log[-5000:]}")
        assert proxy.cut() >= 1
        w.wait_log("reconnected", timeout=30)
        w.lines[:] = [line for line in w.lines if "reconnected" not in line]
    assert [r.get(timeout=60) for r in results] == [f"t{i}" for i in range(n)]
    runs = executions(out)
    assert set(runs) == {f"t{i}" for i in range(n)}           # every task ran
    twice = {t: c for t, c in runs.items() if c > 1}
    assert twice == {}, f"ran more than once: {twice}"
    assert w.proc.poll() is None


def test_worker_started_before_the_broker_waits_then_serves(topo, workers, app_for, tmp_path):
    proxy = Proxy()
    proxy.start()
    port = proxy.port
    proxy.stop()                                  # nothing listens on that port now
    try:
        path = topo.config({"broker": {"url": f"amqp://guest:guest@127.0.0.1:{port}/%2F",
                                       "connect_timeout": 1}})
        w = workers(path)
        w.wait_log("waiting for the broker", timeout=20)
        assert w.proc.poll() is None
        late = Proxy(port=port).start()           # the broker "comes up"
        try:
            w.ready(timeout=30)
            client = app_for(topo.config(name="client.yaml"))
            assert client.send_task("ttasks.add", [40, 2]).get(timeout=10) == 42
        finally:
            w.stop()
            late.stop()
    finally:
        proxy.stop()


def test_client_reconnects_its_pooled_connection(topo, workers, app_for, proxy):
    workers(topo.config(name="worker.yaml")).ready()
    app = app_for(topo.config({"broker": {"url": proxy.url}}, name="client.yaml"))
    assert app.send_task("ttasks.add", [1, 1]).get(timeout=10) == 2
    proxy.cut()          # the next send finds a dead socket and reconnects
    assert app.send_task("ttasks.add", [2, 2]).get(timeout=10) == 4
    assert proxy.accepted == 2


def test_client_raises_when_the_broker_stays_away(topo, app_for, proxy):
    from taskd.exceptions import ConnectionError
    app = app_for(topo.config({"broker": {"url": proxy.url, "connect_timeout": 1}},
                              name="client.yaml"))
    app.send_task("ttasks.add", [1, 1], ignore_result=True)
    proxy.stop()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{proxy.port}"):
        app.send_task("ttasks.add", [1, 1], ignore_result=True)


def test_a_queue_deleted_under_the_worker_is_consumed_again_and_sigterm_still_ends_it(
        topo, workers, app_for, broker):
    import signal
    import pika
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    app = app_for(path)
    assert app.send_task("ttasks.add", [1, 1]).get(timeout=10) == 2
    queue = topo.name("celery")
    broker.delete(queues=[queue])           # the broker cancels the worker's consumer
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    conn.channel().queue_declare(queue, durable=True)      # and someone declares it again
    conn.close()
    wait_for(lambda: (broker.queue_state(queue) or (0, 0))[1] == 1, timeout=10,
             message="the worker to consume the queue again")
    assert app.send_task("ttasks.add", [2, 2]).get(timeout=10) == 4
    assert "the broker cancelled the consumer of queue" in w.log
    w.signal(signal.SIGTERM)
    assert w.proc.wait(10) == 0
