"""Events and metrics with real processes: a real worker publishing Celery events to the
real broker, read back from a queue bound to ``celeryev`` and by Flower itself; its
``/metrics`` read by prometheus_client's parser; ``/healthz`` while the broker link
is cut (through a TCP proxy)."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import BROKER_URL, PYTHONPATH, ROOT, wait_for
from tcpproxy import Proxy

CELERY_FIELDS = {"type", "hostname", "timestamp", "utcoffset", "pid", "clock"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    """(status, body) of a GET; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class EventTap:
    """A queue of this test's own bound to ``celeryev`` with ``#``: every event on the
    broker, kept when its hostname is this test's worker."""

    def __init__(self, hostname):
        self.hostname = hostname
        self.conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        self.ch = self.conn.channel()
        self.ch.exchange_declare("celeryev", "topic", durable=True)
        self.queue = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.ch.queue_bind(self.queue, "celeryev", "#")
        self.seen = []              # (routing key, event, message headers)

    def drain(self):
        while True:
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.seen
            assert props.content_type == "application/json"
            decoded = json.loads(body)
            for event in decoded if isinstance(decoded, list) else [decoded]:
                if event.get("hostname") == self.hostname:
                    self.seen.append((method.routing_key, event, props.headers))

    def of(self, uuid_):
        return [e for _, e, _ in self.drain() if e.get("uuid") == uuid_]

    def close(self):
        self.conn.close()


def test_celery_events_for_a_success_a_failure_and_a_retry(topo, workers, app_for):
    node = f"taskd-ev-{uuid.uuid4().hex[:8]}@test"
    tap = EventTap(node)
    try:
        path = topo.config()
        w = workers(path, "-E", "-n", node).ready()
        app = app_for(path)
        ok = app.send_task("ttasks.add", [2, 2])
        bad = app.send_task("ttasks.fail", ["boom"])
        retried = app.send_task("ttasks.flaky", [1])
        assert ok.get(timeout=20) == 4 and retried.get(timeout=20) == 1
        with pytest.raises(Exception):
            bad.get(timeout=20)
        types = lambda t: [e["type"] for e in tap.of(t.id)]     # noqa: E731
        wait_for(lambda: types(retried)[-1:] == ["task-succeeded"], timeout=10,
                 message="the retried task's events")
        wait_for(lambda: any(e["type"] == "worker-heartbeat" for _, e, _ in tap.drain()),
                 timeout=10, message="a heartbeat")
        assert w.stop() == 0
        seen = wait_for(lambda: (s := tap.drain()) and s[-1][1]["type"] == "worker-offline"
                        and s, timeout=5, message="worker-offline")
    finally:
        tap.close()
    by_id = lambda t: [e for _, e, _ in seen if e.get("uuid") == t.id]  # noqa: E731
    assert [e["type"] for e in by_id(ok)] == ["task-received", "task-started", "task-succeeded"]
    assert [e["type"] for e in by_id(bad)] == ["task-received", "task-started", "task-failed"]
    assert [e["type"] for e in by_id(retried)] == [
        "task-received", "task-started", "task-retried",      # the first run
        "task-received", "task-started", "task-succeeded"]    # its retry
    for key, event, headers in seen:
        assert CELERY_FIELDS <= set(event), event
        assert headers == {"hostname": node} and event["pid"] == w.pid
        assert key == ("task.multi" if event["type"].startswith("task-")
                       else event["type"].replace("-", "."))
    received, _, succeeded = by_id(ok)
    assert received["name"] == "ttasks.add" and received["args"] == "(2, 2)"
    assert received["kwargs"] == "{}" and received["retries"] == 0
    assert received["root_id"] == ok.id and received["eta"] is None
    assert succeeded["result"] == "4" and succeeded["runtime"] >= 0
    failed = by_id(bad)[-1]
    assert failed["exception"] == "ValueError('boom')"
    assert "Traceback" in failed["traceback"] and "ValueError: boom" in failed["traceback"]
    first_retry = by_id(retried)[2]
    assert first_retry["exception"] == "OSError('not yet')"
    assert by_id(retried)[3]["retries"] == 1
    clocks = [e["clock"] for _, e, _ in seen]
    assert clocks == sorted(clocks) and len(set(clocks)) == len(clocks)
    kinds = [e["type"] for _, e, _ in seen if e["type"].startswith("worker-")]
    assert kinds[0] == "worker-online" and kinds[-1] == "worker-offline"
    beat = next(e for _, e, _ in seen if e["type"] == "worker-heartbeat")
    assert beat["freq"] == 2.0 and beat["sw_ident"] == "taskd" and len(beat["loadavg"]) == 3
    assert beat["processed"] >= 2


def test_metrics_are_exact_after_n_tasks_and_healthz_follows_the_broker_link(topo, workers,
                                                                             app_for):
    proxy = Proxy().start()
    try:
        port = free_port()
        client = topo.config(name="client.yaml")
        path = topo.config({"broker": {"url": proxy.url, "heartbeat": 5},
                            "metrics": {"listen": f"127.0.0.1:{port}"}}, name="worker.yaml")
        w = workers(path).ready()
        base = f"http://127.0.0.1:{port}"
        app = app_for(client)
        n = 20
        results = [app.send_task("ttasks.add", [i, i]) for i in range(n)]
        failures = [app.send_task("ttasks.fail", ["x"]) for _ in range(3)]
        stranger = app.send_task("no.such.task", [])
        assert [r.get(timeout=30) for r in results] == [2 * i for i in range(n)]
        for r in [*failures, stranger]:
            with pytest.raises(Exception):
                r.get(timeout=30)
        queue = topo.name("celery")
        samples = wait_for(lambda: _scrape(base), message="/metrics")

        def value(name, **labels):
            return samples.get((name, tuple(sorted(labels.items()))))
        assert value("taskd_tasks_total", task="ttasks.add", queue=queue,
                     outcome="succeeded") == n
        assert value("taskd_tasks_total", task="ttasks.fail", queue=queue, outcome="failed") == 3
        assert value("taskd_tasks_total", task="unknown", queue=queue,
                     outcome="dead_lettered") == 1
        assert value("taskd_task_runtime_seconds_count", task="ttasks.add") == n
        assert value("taskd_task_queue_wait_seconds_count", task="ttasks.add") == n
        assert value("taskd_children") == 2 and value("taskd_broker_connected") == 1
        assert value("taskd_tasks_in_progress") == 0 and value("taskd_eta_held") == 0
        assert value("taskd_broker_reconnects_total") == 0
        assert not any(name == "taskd_tasks_total" and dict(labels).get("task") == "no.such.task"
                       for name, labels in samples)
        assert get(base + "/healthz") == (200, b"ok\n")

        proxy.stop()                                    # the broker goes away
        wait_for(lambda: get(base + "/healthz")[0] == 503, timeout=15,
                 message="/healthz 503 once the link is cut")
        assert _scrape(base)[("taskd_broker_connected", ())] == 0
        proxy.start()                                   # it comes back on the same port
        wait_for(lambda: get(base + "/healthz")[0] == 200, timeout=30,
                 message="/healthz 200 after the reconnect")
        assert _scrape(base)[("taskd_broker_reconnects_total", ())] == 1
        assert w.stop() == 0
    finally:
        proxy.stop()


def _scrape(base):
    status, body = get(base + "/metrics")
    if status != 200:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def test_flower_lists_the_worker_and_its_tasks(topo, workers, app_for, tmp_path):
    """Flower's task list comes from the worker's events, its worker list (stats,
    queues, registered tasks) from remote control: both reach a taskd worker."""
    node = f"taskd-fl-{uuid.uuid4().hex[:8]}@test"
    port = free_port()
    # celeryctl: a Celery app whose control name space is this test's (conftest's
    # Topology gives each test worker its own), so Flower's inspect reaches this worker.
    env = dict(os.environ, FLOWER_UNAUTHENTICATED_API="true", PYTHONPATH=PYTHONPATH,
               TASKD_BROKER_URL=BROKER_URL, CELERYCTL_EXCHANGE=topo.prefix + "ctl")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celeryctl", "--broker", BROKER_URL, "flower",
         f"--port={port}", "--address=127.0.0.1", f"--db={tmp_path / 'flower.db'}",
         "--persistent=False", "--inspect_timeout=500"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(base + "/healthcheck"), timeout=30, message="Flower up")
        path = topo.config()
        workers(path, "-E", "-n", node).ready()
        app = app_for(path)

        def flower_tasks():
            status, body = get(base + "/api/tasks")
            return json.loads(body) if status == 200 else {}
        # Flower reads events from the moment its own queue is bound: send until it sees one.
        probe = []

        def seen_one():
            probe.append(app.send_task("ttasks.add", [0, 0]))
            probe[-1].get(timeout=20)
            time.sleep(0.3)
            return any(r.id in flower_tasks() for r in probe)
        wait_for(seen_one, timeout=30, interval=0.2, message="Flower seeing a task")
        ok = app.send_task("ttasks.add", [20, 22])
        bad = app.send_task("ttasks.fail", ["for flower"])
        assert ok.get(timeout=20) == 42
        with pytest.raises(Exception):
            bad.get(timeout=20)
        tasks = wait_for(lambda: (t := flower_tasks()) and bad.id in t
                         and t[bad.id]["state"] == "FAILURE" and ok.id in t
                         and t[ok.id]["state"] == "SUCCESS" and t, timeout=15,
                         message="Flower listing both tasks with their final states")
        assert tasks[ok.id]["name"] == "ttasks.add" and tasks[ok.id]["worker"] == node
        assert tasks[ok.id]["result"] == "42" and tasks[ok.id]["args"] == "(20, 22)"
        assert "ValueError" in tasks[bad.id]["exception"]
        assert tasks[bad.id]["traceback"] and tasks[bad.id]["received"]
        # Its workers page (from heartbeats, not remote control) shows the worker online.
        status, body = get(base + "/workers?json=1")
        listed = {w["hostname"]: w for w in json.loads(body)["data"]}
        assert status == 200 and listed[node]["status"] is True
        # Its API's worker list asks the workers over remote control.
        status, body = get(base + "/api/workers?refresh=1")
        info = json.loads(body)[node]
        assert status == 200 and info["stats"]["pool"]["max-concurrency"] == 2
        assert info["stats"]["total"].get("ttasks.add", 0) >= 2
        assert [q["name"] for q in info["active_queues"]] == [topo.name("celery")]
        assert "ttasks.add" in info["registered"]
    finally:
        flower.terminate()
        try:
            flower.wait(10)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait()


def _up(url):
    try:
        return get(url, timeout=1)[0] == 200
    except OSError:
        return False
