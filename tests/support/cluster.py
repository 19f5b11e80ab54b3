"""A real RabbitMQ cluster on this machine, for fault tests: private nodes joined in one.

``Cluster(3).start()`` boots three nodes in parallel (own names, AMQP and
distribution ports, data directories, and an Erlang cookie of their own in a
private ``HOME``), then joins the second and third to the first with
``rabbitmqctl join_cluster``. Each node is started with
``/usr/lib/rabbitmq/bin/rabbitmq-server`` and ``RUNNING_UNDER_SYSTEMD=true``, so
the process started *is* the node's Erlang VM (beam.smp): :meth:`Cluster.kill`
is a crash (SIGKILL), :meth:`Cluster.restart` boots it again on the same data,
and it rejoins the cluster by itself. ``/usr/sbin/rabbitmq-server`` is not used:
that wrapper switches to the rabbitmq user and its home, and so to the cookie of
the machine's own broker.

Every node is started with PR_SET_PDEATHSIG: if the test process dies, its nodes
die with it (the signal follows the *thread* that started the node: boot nodes from
the test's main thread, never from a helper thread that ends). :meth:`Cluster.stop`
kills them by the PIDs started here, nothing else. A directory left by a test process
that no longer runs is removed by the next ``Cluster``.
"""
import ctypes
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from rmqnode import amqp_answers, free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
PREFIX = "taskd-cluster-"


def available():
    return os.path.exists(SERVER) and os.path.exists(CTL) and os.geteuid() == 0


def _die_with_parent():
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def _remove_stale_dirs():
    for path in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")):
        try:
            owner = int(open(os.path.join(path, "owner")).read())
            os.kill(owner, 0)
        except (OSError, ValueError):
            shutil.rmtree(path, ignore_errors=True)


class Node:
    def __init__(self, cluster, letter):
        self.cluster = cluster
        self.port = free_port()
        self.dist_port = free_port()
        self.tls_port = free_port() if cluster.tls else None
        self.name = f"taskdtest-{cluster.id}-{letter}@localhost"
        self.dir = os.path.join(cluster.dir, letter)
        for sub in ("mnesia", "log"):
            os.makedirs(os.path.join(self.dir, sub))
        conf = [f"listeners.tcp.default = {self.port}", "loopback_users = none",
                "cluster_partition_handling = ignore"]
        if cluster.tls:     # a TLS listener beside the plain one; client certificates optional
            conf += [f"listeners.ssl.default = {self.tls_port}",
                     f"ssl_options.cacertfile = {cluster.tls.ca}",
                     f"ssl_options.certfile = {cluster.tls.cert}",
                     f"ssl_options.keyfile = {cluster.tls.key}",
                     "ssl_options.verify = verify_peer",
                     "ssl_options.fail_if_no_peer_cert = false"]
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as fh:
            fh.write("\n".join(conf) + "\n")
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as fh:
            fh.write("[].\n")
        open(os.path.join(self.dir, "rabbitmq-env.conf"), "w").close()
        self.proc = None

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def tls_url(self):
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/%2F"

    def env(self):
        d = self.dir
        return dict(os.environ, HOME=self.cluster.home, RABBITMQ_NODENAME=self.name,
                    RABBITMQ_NODE_PORT=str(self.port), RABBITMQ_DIST_PORT=str(self.dist_port),
                    RABBITMQ_MNESIA_BASE=f"{d}/mnesia", RABBITMQ_LOG_BASE=f"{d}/log",
                    RABBITMQ_PID_FILE=f"{d}/pid", RABBITMQ_CONFIG_FILE=f"{d}/rabbitmq",
                    RABBITMQ_ENABLED_PLUGINS_FILE=f"{d}/enabled_plugins",
                    RABBITMQ_CONF_ENV_FILE=f"{d}/rabbitmq-env.conf",
                    RUNNING_UNDER_SYSTEMD="true")

    def boot(self):
        log = open(os.path.join(self.dir, "log", "console.log"), "ab")
        self.proc = subprocess.Popen([SERVER], env=self.env(), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        log.close()
        return self

    def wait_up(self, timeout=60):
        deadline = time.monotonic() + timeout
        while not (amqp_answers(self.port) and self._tls_listening()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.name} did not start (exit "
                                   f"{self.proc.poll()}); logs in {self.dir}/log")
            time.sleep(0.1)

    def _tls_listening(self):
        if self.tls_port is None:
            return True
        try:
            socket.create_connection(("127.0.0.1", self.tls_port), timeout=1).close()
            return True
        except OSError:
            return False

    def ctl(self, *args, timeout=60):
        out = subprocess.run([CTL, "-n", self.name, *args], env=self.env(), capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.name} {' '.join(args)}: "
                               f"{out.stderr or out.stdout}")
        return out.stdout

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        if self.alive:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Cluster:
    """``tls``: a :class:`rmqnode.TlsFiles`; each node then also listens for TLS
    (``tls_port``, ``tls_url``) with that certificate."""

    def __init__(self, size=3, tls=None):
        _remove_stale_dirs()
        self.tls = tls
        self.id = secrets.token_hex(3)
        self.dir = tempfile.mkdtemp(prefix=PREFIX)
        with open(os.path.join(self.dir, "owner"), "w") as fh:
            fh.write(str(os.getpid()))
        self.home = os.path.join(self.dir, "home")
        os.makedirs(self.home)
        cookie = os.path.join(self.home, ".erlang.cookie")
        with open(cookie, "w") as fh:
            fh.write(secrets.token_hex(16).upper())
        os.chmod(cookie, 0o400)
        self.nodes = [Node(self, chr(ord("a") + i)) for i in range(size)]
        self.started_in = None

    @property
    def urls(self):
        return [n.url for n in self.nodes]

    def start(self):
        t0 = time.monotonic()
        try:
            for node in self.nodes:
                node.boot()
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(lambda n: n.wait_up(), self.nodes))
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.name)
                node.ctl("start_app")
            self.wait_running(len(self.nodes))
        except Exception:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        return self

    def running(self, via=None):
        """Names of the running nodes, as a live node sees them."""
        node = via or next(n for n in self.nodes if n.alive)
        status = json.loads(node.ctl("cluster_status", "--formatter", "json"))
        return set(status.get("running_nodes", []))

    def wait_running(self, count, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if len(self.running()) >= count:
                    return
            except (RuntimeError, StopIteration, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach {count} running nodes")
            time.sleep(0.3)

    def kill(self, node):
        """Crash ``node`` (SIGKILL of its VM)."""
        node.kill(signal.SIGKILL)

    def restart(self, node):
        """Boot a stopped or killed node again; it rejoins the cluster."""
        node.kill(signal.SIGKILL)
        node.boot().wait_up()
        self.wait_running(sum(n.alive for n in self.nodes))

    def node_at(self, port):
        return next(n for n in self.nodes if n.port == port)

    def stop(self):
        for node in self.nodes:
            node.kill(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)
