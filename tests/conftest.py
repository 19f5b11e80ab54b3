"""Shared fixtures: the real broker, uniquely named topology, real worker processes."""
import collections
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import uuid

import pika
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
BROKER_URL = os.environ.get("TASKD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PYTHONPATH = os.pathsep.join([str(ROOT / "examples"), str(ROOT / "tests" / "support"), str(ROOT)])
TASKD = [sys.executable, "-m", "taskd"]


def wait_for(predicate, timeout=20.0, interval=0.02, message="condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def executions(path):
    """How many times each token was recorded in ``path`` (by ``ttasks.record``)."""
    if not path.exists():
        return collections.Counter()
    return collections.Counter(line.split()[0] for line in path.read_text().splitlines())


class Broker:
    """Direct access to the real broker for set-up, inspection and clean-up."""

    def __init__(self, url=BROKER_URL):
        self.url = url

    def _channel(self):
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        return conn, conn.channel()

    def queue_state(self, name):
        """(messages ready, consumers) or None when the queue does not exist."""
        conn, ch = self._channel()
        try:
            frame = ch.queue_declare(name, passive=True)
            return frame.method.message_count, frame.method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return None
        finally:
            if conn.is_open:
                conn.close()

    def get_all(self, name, limit=10000):
        """Take every message off queue ``name``: list of (properties, body)."""
        conn, ch = self._channel()
        out = []
        try:
            for _ in range(limit):
                method, props, body = ch.basic_get(name, auto_ack=True)
                if method is None:
                    break
                out.append((props, body))
        finally:
            conn.close()
        return out

    def publish(self, routing_key, body, properties=None, exchange=""):
        conn, ch = self._channel()
        try:
            ch.basic_publish(exchange, routing_key, body, properties or pika.BasicProperties())
        finally:
            conn.close()

    def delete(self, queues=(), exchanges=()):
        conn, ch = self._channel()
        try:
            for q in queues:
                ch.queue_delete(q)
            for e in exchanges:
                ch.exchange_delete(e)
        finally:
            if conn.is_open:
                conn.close()


@pytest.fixture(scope="session")
def broker():
    b = Broker()
    try:
        conn, _ = b._channel()
        conn.close()
    except Exception as exc:  # the suite's command starts one; say so if it is missing
        pytest.fail(f"RabbitMQ is not reachable at {BROKER_URL}: {exc} (run scripts/broker.sh)")
    return b


class Topology:
    """Unique names for one test, and the config file that uses them."""

    def __init__(self, tmp_path, broker):
        self.prefix = f"t{uuid.uuid4().hex[:10]}."
        self.tmp_path = tmp_path
        self.broker = broker
        self.queues, self.exchanges = set(), set()
        self.dead = self.name("dead")
        self.queues.add(self.dead)
        self.delay_prefix = self.name("delay")
        self.node = f"taskd-{self.prefix.rstrip('.')}@test"     # the worker's node name

    def name(self, base):
        return self.prefix + base

    def config(self, data=None, name="taskd.yaml", **worker):
        """Write a config whose queues/exchanges get this test's prefix; return its path."""
        data = dict(data or {})
        data.setdefault("broker", {"url": BROKER_URL})
        data.setdefault("imports", ["ttasks", "tasks"])
        exchanges = [dict(e, name=self.name(e["name"])) for e in data.get("exchanges", [])]
        queues = []
        for q in data.get("queues", [{"name": "celery"}]):
            q = dict(q, name=self.name(q["name"]))
            if "exchange" in q:
                q["exchange"] = self.name(q["exchange"])
            queues.append(q)
        data["exchanges"], data["queues"] = exchanges, queues
        self.exchanges.update(e["name"] for e in exchanges)
        self.exchanges.update(q.get("exchange", q["name"]) for q in queues)
        self.queues.update(q["name"] for q in queues)
        data["default_queue"] = self.name(data.get("default_queue", "celery"))
        if "default_exchange" in data:
            data["default_exchange"] = self.name(data["default_exchange"])
        w = dict(data.get("worker", {}))
        w.update(worker)
        w.setdefault("concurrency", 2)
        # Remote control: this test's own node name, control exchanges and revoke stream.
        w.setdefault("hostname", self.node)
        w.setdefault("control_exchange", self.prefix + "ctl")
        w.setdefault("revoke_stream", self.name("revoked"))
        self.queues.add(w["revoke_stream"])
        self.exchanges.update((f"{w['control_exchange']}.pidbox",
                               f"reply.{w['control_exchange']}.pidbox"))
        w["dead_letter_queue"] = self.dead
        w["delay_queue_prefix"] = self.delay_prefix
        if "queues" in w:
            w["queues"] = [self.name(q) for q in w["queues"]]
        data["worker"] = w
        if "routes" in data:
            data["routes"] = {k: {kk: (self.name(vv) if kk in ("exchange", "queue") else vv)
                                  for kk, vv in v.items()} for k, v in data["routes"].items()}
        path = self.tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    def delay_queue(self, seconds):
        return f"{self.delay_prefix}.{seconds}s"

    def cleanup(self):
        from taskd.worker.parking import BUCKETS
        delays = [self.delay_queue(b) for b in BUCKETS]
        self.broker.delete(sorted(self.queues) + delays, sorted(self.exchanges) + delays)


@pytest.fixture
def topo(tmp_path, broker):
    t = Topology(tmp_path, broker)
    yield t
    t.cleanup()


class Worker:
    """A real ``taskd worker`` process; its log is collected as it runs."""

    def __init__(self, config_path, *args, env=None):
        full_env = dict(os.environ, PYTHONPATH=PYTHONPATH, PYTHONUNBUFFERED="1")
        full_env.pop("TASKD_CONFIG", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [*TASKD, "worker", "--config", str(config_path), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
            cwd=ROOT)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def pid(self):
        return self.proc.pid

    @property
    def log(self):
        return "".join(self.lines)

    def wait_log(self, text, timeout=20.0):
        wait_for(lambda: text in self.log or self.proc.poll() is not None, timeout,
                 message=f"{text!r} in the worker log")
        assert text in self.log, f"worker exited ({self.proc.returncode}) before {text!r}:\n{self.log}"

    def ready(self, timeout=20.0):
        self.wait_log("consuming", timeout)
        return self

    def children(self):
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=30.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


@pytest.fixture
def workers():
    started = []

    def start(config_path, *args, **kw):
        w = Worker(config_path, *args, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
        if w.proc.returncode is None:
            w.proc.kill()


@pytest.fixture
def app_for():
    """Build a client App for a config path; closes its connection afterwards."""
    apps = []

    def make(path):
        from taskd import App
        a = App("tests", config=str(path))
        apps.append(a)
        return a

    yield make
    for a in apps:
        a.close()
