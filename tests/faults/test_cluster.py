"""A real three-node RabbitMQ cluster (tests/support/cluster.py) losing nodes under a worker
and a client: failover, quorum queues, a restarted node, cut connections, TLS (issue 18).

The cluster is started once for this module (13 s on a quiet machine, 25 s on a loaded
one) and stopped by PID at the end. Select these tests with ``-m cluster``, leave them
out with ``-m "not cluster"``.

Quorum queues need a majority of their nodes: two nodes may never be down at once. The
tests run in file order so that one restart serves them all: node a is killed by the
first test and restarted (and checked) by the second; node b is killed by the third and
stays down; the last two cut connections through a proxy. Run alone, a test finds every
node up.
"""
import os
import subprocess
import threading
import time

import pytest

import certs
import cluster as cluster_mod
import rmqnode
from conftest import PYTHONPATH, ROOT, TASKD, executions, wait_for
from tcpproxy import Proxy

pytestmark = [pytest.mark.cluster,
              pytest.mark.timeout(300),               # the first one also starts the cluster
              pytest.mark.skipif(not cluster_mod.available(),
                                 reason="needs rabbitmq-server installed and root "
                                        "(private cluster nodes)")]

QUORUM = [{"name": "celery", "queue_type": "quorum"}]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return certs.make(tmp_path_factory.mktemp("pki")) if certs.available() else None


@pytest.fixture(scope="module")
def cluster(pki):
    tls = pki and rmqnode.TlsFiles(str(pki.ca), str(pki.server_cert), str(pki.server_key))
    c = cluster_mod.Cluster(3, tls=tls).start()
    yield c
    c.stop()


def up(cluster, *nodes):
    """Make sure ``nodes`` run (booted again if an earlier test killed them)."""
    for node in nodes:
        if not node.alive:
            cluster.restart(node)


def config(topo, urls, name="taskd.yaml", **broker):
    """A config file for these node URLs (``name``: a client's file beside the worker's)."""
    return topo.config({"broker": {"url": urls, "connect_timeout": 2, "heartbeat": 5, **broker},
                        "queues": QUORUM}, name=name)


def test_the_workers_node_killed_mid_stream_every_confirmed_task_runs_once(
        topo, workers, app_for, cluster, tmp_path):
    a, b, c = cluster.nodes
    up(cluster, a, b, c)
    w = workers(config(topo, [a.url, b.url, c.url])).ready()    # declares the queue on a
    assert f"connected to 127.0.0.1:{a.port} (node 1 of 3)" in w.log
    app = app_for(config(topo, [c.url, b.url, a.url], "client.yaml"))   # the client: on c
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


def test_a_restarted_node_rejoins_and_serves_the_clients_that_list_it_first(
        topo, workers, app_for, cluster):
    a, b, c = cluster.nodes
    up(cluster, b, c)
    w = workers(config(topo, [c.url, b.url])).ready()
    if a.alive:                 # run alone: make the restart a restart
        cluster.kill(a)
    started = time.monotonic()
    cluster.restart(a)
    restart = time.monotonic() - started
    assert {n.name for n in cluster.nodes} == cluster.running()
    app = app_for(config(topo, [a.url, c.url], "client.yaml"))
    assert app.send_task("ttasks.add", [2, 3]).get(timeout=15) == 5
    assert app.session().publisher.connection.taskd_url == a.url
    assert w.proc.poll() is None and "lost the broker connection" not in w.log
    print(f"node restart: up and rejoined in {restart:.1f}s")


def test_the_client_keeps_sending_through_the_failover(topo, workers, app_for, cluster,
                                                       tmp_path, caplog):
    """Every confirmed send runs; a send that raises is reported. A send whose connection
    died after the message was written is sent again (broker.publish_retries) and may run
    twice, if the broker had taken the first copy: the client says so in its log, and only
    such a send may run twice."""
    a, b, c = cluster.nodes
    up(cluster, a, b, c)
    # The worker declares the queue on node b, so b holds its leader: the kill of b makes
    # the client publish to a queue whose new leader may not be elected yet.
    workers(config(topo, [b.url, a.url, c.url])).ready()
    app = app_for(config(topo, [b.url, c.url, a.url], "client.yaml"))   # the client: on b
    out = tmp_path / "runs.txt"
    confirmed, raised, slowest = [], [], 0.0
    killed = threading.Event()

    def kill_b():
        wait_for(lambda: len(confirmed) >= 50, timeout=30, message="50 sends")
        cluster.kill(b)
        killed.set()
    threading.Thread(target=kill_b, daemon=True).start()
    deadline = time.monotonic() + 40
    i = 0
    while (i < 200 or not killed.is_set()) and time.monotonic() < deadline:
        token, sent_at = f"s{i}", time.monotonic()
        i += 1
        try:
            app.send_task("ttasks.record", [str(out), token], ignore_result=True,
                          task_id=f"id-{token}")
            confirmed.append(token)
            slowest = max(slowest, time.monotonic() - sent_at)
        except Exception as exc:           # reported, never silent
            raised.append((token, repr(exc)))
    assert killed.is_set()
    assert app.session().publisher.connection.taskd_url != b.url    # it moved to another node
    renewed = sum("publishing on a new channel" in r.getMessage() for r in caplog.records)
    print(f"client: {len(confirmed)} sends confirmed, {len(raised)} raised: {raised[:3]}; "
          f"slowest confirmed send {slowest:.2f}s; {renewed} channel(s) renewed after a nack")
    assert len(raised) <= 3, raised      # the retries absorb a node's loss
    wait_for(lambda: set(confirmed) <= set(executions(out)), timeout=30,
             message="every confirmed send run")
    time.sleep(1.0)
    twice = {t for t, k in executions(out).items() if k > 1}
    resent = {r.args[0].removeprefix("id-") for r in caplog.records
              if "it was written before the connection failed" in r.getMessage()}
    assert twice <= resent, (twice, resent)


# ``freeze`` (nothing more forwarded, nothing closed: a partition) costs about 13 s with
# heartbeat 2, pika checking for received frames every heartbeat + 5 s: it runs only with
# TASKD_TEST_FREEZE=1.
FAULTS = ["cut"] + (["freeze"] if os.environ.get("TASKD_TEST_FREEZE") else [])


@pytest.mark.parametrize("fault", FAULTS)
def test_a_cut_connection_moves_the_worker_to_the_next_node(topo, workers, app_for, cluster,
                                                           fault):
    """``cut``: both directions closed (a reset); ``freeze``: silent, noticed by the
    heartbeat."""
    a, b, c = cluster.nodes
    up(cluster, a, c)
    proxy = Proxy(target=("127.0.0.1", a.port)).start()
    try:
        w = workers(config(topo, [proxy.url, c.url, a.url], heartbeat=2)).ready()
        app = app_for(config(topo, [c.url], "client.yaml"))
        assert app.send_task("ttasks.add", [1, 2]).get(timeout=15) == 3
        cut_at = time.monotonic()
        if fault == "cut":      # the consuming and the publishing connection
            assert proxy.cut() >= 2
        else:
            assert len(proxy.freeze()) >= 2
        w.wait_log(f"reconnected to 127.0.0.1:{c.port}", timeout=20)
        moved = time.monotonic() - cut_at
        assert app.send_task("ttasks.add", [2, 2]).get(timeout=15) == 4
        assert w.proc.poll() is None
        print(f"connection {fault}: the worker consumed from the next node {moved:.1f}s later")
    finally:
        proxy.stop()


def test_a_worker_fails_over_between_verified_tls_nodes_and_check_config_reports_each(
        topo, workers, app_for, cluster, pki):
    if pki is None:
        pytest.skip("needs openssl")
    a, b, c = cluster.nodes
    up(cluster, a, c)
    ca = {"ca_file": str(pki.ca)}
    proxy = Proxy(target=("127.0.0.1", a.tls_port)).start()    # TLS passes through it
    try:
        tls_via_proxy = f"amqps://guest:guest@127.0.0.1:{proxy.port}/%2F"
        path = config(topo, [tls_via_proxy, c.tls_url, b.tls_url], tls=ca)
        w = workers(path).ready()
        app = app_for(config(topo, [c.tls_url], "client.yaml", tls=ca))
        assert app.send_task("ttasks.add", [1, 2]).get(timeout=15) == 3
        assert proxy.cut() >= 2
        w.wait_log(f"reconnected to 127.0.0.1:{c.tls_port}", timeout=20)
        assert app.send_task("ttasks.add", [2, 2]).get(timeout=15) == 4
        assert "verification is off" not in w.log and "guest:guest" not in w.log
        env = dict(os.environ, PYTHONPATH=PYTHONPATH)
        out = subprocess.run([*TASKD, "check-config", "--config", str(path)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    finally:
        proxy.stop()
    assert out.returncode == 0, out.stderr
    for port in (proxy.port, c.tls_port):
        assert (f"127.0.0.1:{port}  ok: RabbitMQ 3." in out.stdout
                and "TLS, certificate and host name verified" in out.stdout), out.stdout
    if not b.alive:             # killed by the client test
        assert f"127.0.0.1:{b.tls_port}  FAILED: cannot connect" in out.stdout
