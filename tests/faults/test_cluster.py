"""A real three-node RabbitMQ cluster (tests/support/cluster.py) losing nodes under a worker
and a client: failover, quorum queues, a restarted node, a cut connection (issue 18).

The cluster is started once for this module (about 13 s here) and stopped by PID at the
end. Select these tests with ``-m cluster``, leave them out with ``-m "not cluster"``.
"""
import threading
import time

import pytest

import cluster as cluster_mod
from conftest import executions, wait_for
from tcpproxy import Proxy

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(not cluster_mod.available(),
                                 reason="needs rabbitmq-server installed and root "
                                        "(private cluster nodes)")]

QUORUM = [{"name": "celery", "queue_type": "quorum"}]


@pytest.fixture(scope="module")
def rabbit():
    c = cluster_mod.Cluster(3).start()
    yield c
    c.stop()


@pytest.fixture
def cluster(rabbit):
    """The cluster with every node up (a node an earlier test killed is booted again)."""
    for node in rabbit.nodes:
        if not node.alive:
            rabbit.restart(node)
    return rabbit


def config(topo, urls, **broker):
    return topo.config({"broker": {"url": urls, "connect_timeout": 2, "heartbeat": 5, **broker},
                        "queues": QUORUM})


def test_the_workers_node_killed_mid_stream_every_confirmed_task_runs_once(
        topo, workers, app_for, cluster, tmp_path):
    a, b, c = cluster.nodes
    w = workers(config(topo, [a.url, b.url, c.url])).ready()
    assert f"connected to 127.0.0.1:{a.port} (node 1 of 3)" in w.log
    app = app_for(config(topo, [c.url, b.url, a.url]))       # the client stays on node c
    out = tmp_path / "runs.txt"
    n = 300
    for i in range(n):         # each returns once the broker confirmed it
        app.send_task("ttasks.record", [str(out), f"t{i}", 0.01], ignore_result=True)
    wait_for(lambda: sum(executions(out).values()) >= n // 5, timeout=30, message="a fifth done")
    killed_at = time.monotonic()
    cluster.kill(a)
    w.wait_log(f"reconnected to 127.0.0.1:{b.port}", timeout=30)
    failover = time.monotonic() - killed_at
    wait_for(lambda: len(executions(out)) == n, timeout=60, message="every task done")
    time.sleep(1.0)            # a late duplicate would show by now
    counts = executions(out)
    assert set(counts) == {f"t{i}" for i in range(n)}
    assert {t: k for t, k in counts.items() if k > 1} == {}
    assert w.proc.poll() is None
    assert "guest:guest" not in w.log
    print(f"worker failover: reconnected to the next node {failover:.1f}s after the kill")
    assert failover < 15


def test_the_client_keeps_sending_through_the_failover(topo, workers, app_for, cluster,
                                                       tmp_path):
    a, b, c = cluster.nodes
    workers(config(topo, [c.url, a.url, b.url])).ready()
    app = app_for(config(topo, [b.url, c.url, a.url]))       # the client starts on node b
    out = tmp_path / "runs.txt"
    confirmed, raised = [], []
    killed = threading.Event()

    def kill_b():
        wait_for(lambda: len(confirmed) >= 50, timeout=30, message="50 sends")
        cluster.kill(b)
        killed.set()
    killer = threading.Thread(target=kill_b, daemon=True)
    killer.start()
    i = 0
    deadline = time.monotonic() + 40
    while (not killed.is_set() or len(confirmed) + len(raised) < i or i < 200) \
            and time.monotonic() < deadline:
        token = f"s{i}"
        i += 1
        try:
            app.send_task("ttasks.record", [str(out), token], ignore_result=True)
            confirmed.append(token)
        except Exception as exc:           # reported, never silent
            raised.append((token, repr(exc)))
        if killed.is_set() and i >= 200:
            break
    killer.join(5)
    assert killed.is_set()
    publisher = app.session().publisher
    assert publisher.connection.taskd_url != b.url        # it moved to another node
    print(f"client: {len(confirmed)} sends confirmed, {len(raised)} raised: {raised[:3]}")
    assert len(raised) <= 3, raised      # the retries absorb a node's loss
    wait_for(lambda: set(confirmed) <= set(executions(out)), timeout=30,
             message="every confirmed send run")
    time.sleep(1.0)
    counts = executions(out)
    assert {t: k for t, k in counts.items() if t in confirmed and k > 1} == {}


def test_a_restarted_node_rejoins_and_serves_the_clients_that_list_it_first(
        topo, workers, app_for, rabbit):
    a, b, c = rabbit.nodes
    for node in (a, c):
        if not node.alive:
            rabbit.restart(node)
    w = workers(config(topo, [c.url, a.url, b.url])).ready()
    if b.alive:
        rabbit.kill(b)
    started = time.monotonic()
    rabbit.restart(b)
    restart = time.monotonic() - started
    assert {n.name for n in rabbit.nodes} == rabbit.running()
    app = app_for(config(topo, [b.url, c.url]))
    assert app.send_task("ttasks.add", [2, 3]).get(timeout=15) == 5
    assert app.session().publisher.connection.taskd_url == b.url
    assert w.proc.poll() is None and "lost the broker connection" not in w.log
    print(f"node restart: up and rejoined in {restart:.1f}s")


def test_a_cut_connection_moves_the_worker_to_the_next_node(topo, workers, app_for, cluster):
    a, b, c = cluster.nodes
    proxy = Proxy(target=("127.0.0.1", a.port)).start()
    try:
        w = workers(config(topo, [proxy.url, b.url, c.url])).ready()
        app = app_for(config(topo, [c.url]))
        assert app.send_task("ttasks.add", [1, 2]).get(timeout=15) == 3
        cut_at = time.monotonic()
        assert proxy.cut() >= 2             # the consuming and the publishing connection
        w.wait_log(f"reconnected to 127.0.0.1:{b.port}", timeout=20)
        moved = time.monotonic() - cut_at
        assert app.send_task("ttasks.add", [2, 2]).get(timeout=15) == 4
        assert w.proc.poll() is None
        print(f"connection cut: the worker consumed from the next node {moved:.1f}s later")
    finally:
        proxy.stop()
