"""The dashboard tests' stack: a real Celery worker (-E), ``taskd dashboard``, headless chromium.

Everything is named uniquely per session (queue, event queue, worker node name,
dead-letter queue, database file) and deleted at the end, so the stack runs in
parallel with the rest of the suite on the shared broker.
"""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import uuid

import httpx
import pika
import yaml

import conftest
from conftest import BROKER_URL, ROOT
from rmqnode import free_port
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "tok-" + uuid.uuid4().hex


def wait_for(predicate, timeout=30.0, interval=0.1, message="condition"):
    """conftest's wait_for, with the longer defaults that a browser and a Celery worker
    starting on a busy machine need."""
    return conftest.wait_for(predicate, timeout, interval, message)


class Stack:
    def __init__(self, tmp: pathlib.Path):
        tag = uuid.uuid4().hex[:10]
        self.tmp = tmp
        self.queue = f"dash-{tag}"
        self.event_queue = f"taskd.dashboard.test-{tag}"
        self.dead = f"dash-{tag}.dead"
        self.replay_to = f"dash-{tag}.replayed"
        self.node = f"dash-{tag}@{socket.gethostname()}"
        self.db = tmp / "history.sqlite3"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "dashboard.yaml"
        self.config.write_text(yaml.safe_dump({
            "broker": {"url": BROKER_URL},
            "queues": [{"name": self.queue}],
            "worker": {"dead_letter_queue": self.dead},
            "dashboard": {"database": f"sqlite:///{self.db}", "event_queue": self.event_queue,
                          "admin_token": TOKEN, "event_queue_max_length": 100000},
        }))
        self.env = dict(os.environ, DASH_QUEUE=self.queue, TASKD_BROKER_URL=BROKER_URL,
                        PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "support"), str(ROOT)]))
        self.env.pop("TASKD_DASHBOARD_TOKEN", None)
        self.dashboard = self.celery = None
        self._app = None

    # --- processes -----------------------------------------------------------

    def start_dashboard(self):
        log = open(self.tmp / "dashboard.log", "ab")
        self.dashboard = subprocess.Popen(
            [sys.executable, "-m", "taskd", "dashboard", "--config", str(self.config),
             "--listen", f"127.0.0.1:{self.port}"], env=self.env, stdout=log, stderr=log)
        wait_for(self._answers, 20, message=f"the dashboard on {self.url} (log: {self.tmp}/dashboard.log)")
        wait_for(lambda: self.channel_call(lambda ch: ch.queue_declare(self.event_queue, passive=True)),
                 20, message="the dashboard's event queue")

    def _answers(self):
        if self.dashboard.poll() is not None:
            raise AssertionError(f"the dashboard exited with {self.dashboard.returncode}: "
                                 + (self.tmp / "dashboard.log").read_text()[-2000:])
        try:
            return httpx.get(self.url + "/login", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop_dashboard(self):
        self.dashboard.send_signal(signal.SIGTERM)
        self.dashboard.wait(15)

    def start_celery(self):
        log = open(self.tmp / "celery.log", "ab")
        self.celery = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "dashcelery", "worker", "-E", "-P", "prefork",
             "-c", "1", "-n", self.node, "-Q", self.queue, "--without-gossip", "--without-mingle",
             "-l", "warning"], env=self.env, stdout=log, stderr=log, cwd=self.tmp)

    def stop(self):
        # QUIT: Celery's cold shutdown (its pool is stopped at once; TERM waits for it)
        for proc, sig in ((self.celery, signal.SIGQUIT), (self.dashboard, signal.SIGTERM)):
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.channel_call(lambda ch: [ch.queue_delete(q) for q in
                                      (self.queue, self.event_queue, self.dead, self.replay_to)])

    # --- broker and client -----------------------------------------------------

    def channel_call(self, fn):
        """``fn(channel)``'s value, or None when the broker closed the channel (no such queue)."""
        conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        try:
            return fn(conn.channel())
        except pika.exceptions.ChannelClosedByBroker:
            return None
        finally:
            if conn.is_open:
                conn.close()

    @property
    def app(self):
        if self._app is None:
            os.environ["DASH_QUEUE"] = self.queue
            sys.modules.pop("dashcelery", None)
            import dashcelery
            self._app = dashcelery
        return self._app

    def send(self, name, *args):
        return self.app.app.send_task(name, args=list(args), queue=self.queue).id

    def recorded(self, task_id, state=None):
        """The task as the dashboard's database holds it (sqlite3 directly), or None."""
        import sqlite3
        if not self.db.exists():
            return None
        with sqlite3.connect(self.db, timeout=10) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("select * from taskd_tasks where id = ?", (task_id,)).fetchone()
        if row is None or (state and row["state"] != state):
            return None
        return dict(row)
