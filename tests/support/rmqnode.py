"""A private RabbitMQ node for fault tests: own name, ports and data directory.

Started with ``rabbitmq-server -detached`` (as Debian's package runs it), stopped
with ``rabbitmqctl -n NODE stop``; a restart keeps the data directory, so durable
queues and persistent messages survive it as they would in production.

``RabbitNode(tls=TlsFiles(...))`` adds a TLS listener (``tls_port``, ``tls_url``)
beside the plain one, verifying client certificates against ``ca`` when a client
sends one; ``require_client_cert=True`` refuses clients that send none.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def amqp_answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(2)
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return s.recv(1) == b"\x01"
    except OSError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the node's TLS listener: the CA it trusts, its certificate and key."""
    ca: str
    cert: str
    key: str


class RabbitNode:
    def __init__(self, consumer_timeout_ms=None, max_message_size=None, tls=None,
                 require_client_cert=False):
        self.port = free_port()
        self.dist_port = free_port()
        self.tls_port = free_port() if tls else None
        self.name = f"taskdtest{os.getpid()}x{self.port}@localhost"
        self.dir = tempfile.mkdtemp(prefix="taskd-rmq-")
        os.makedirs(f"{self.dir}/mnesia")
        os.makedirs(f"{self.dir}/log")
        conf = [f"listeners.tcp.default = {self.port}", "loopback_users = none"]
        if consumer_timeout_ms:
            conf.append(f"consumer_timeout = {consumer_timeout_ms}")
        if max_message_size:
            conf.append(f"max_message_size = {max_message_size}")
        if tls:
            conf += self._tls_conf(tls, require_client_cert)
        with open(f"{self.dir}/rabbitmq.conf", "w") as fh:
            fh.write("\n".join(conf) + "\n")
        with open(f"{self.dir}/enabled_plugins", "w") as fh:
            fh.write("[].\n")
        # the server runs as the package's user: it must own its directory
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", self.dir], check=False)
        os.chmod(self.dir, 0o755)

    def _tls_conf(self, tls, require_client_cert):
        os.makedirs(f"{self.dir}/tls")
        for name, path in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)):
            shutil.copy(path, f"{self.dir}/tls/{name}.pem")
        return [f"listeners.ssl.default = {self.tls_port}",
                f"ssl_options.cacertfile = {self.dir}/tls/ca.pem",
                f"ssl_options.certfile = {self.dir}/tls/cert.pem",
                f"ssl_options.keyfile = {self.dir}/tls/key.pem",
                "ssl_options.verify = verify_peer",
                f"ssl_options.fail_if_no_peer_cert = {str(require_client_cert).lower()}"]

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def tls_url(self):
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/%2F"

    def _env(self):
        return dict(os.environ, RABBITMQ_NODENAME=self.name, RABBITMQ_NODE_PORT=str(self.port),
                    RABBITMQ_DIST_PORT=str(self.dist_port),
                    RABBITMQ_MNESIA_BASE=f"{self.dir}/mnesia",
                    RABBITMQ_LOG_BASE=f"{self.dir}/log",
                    RABBITMQ_CONFIG_FILE=f"{self.dir}/rabbitmq",
                    RABBITMQ_ENABLED_PLUGINS_FILE=f"{self.dir}/enabled_plugins")

    def start(self, timeout=60):
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True,
                       capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout
        while not (amqp_answers(self.port) and self._tls_listening()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.name} did not start; logs in {self.dir}/log")
            time.sleep(0.2)
        return self

    def _tls_listening(self):
        if self.tls_port is None:
            return True
        try:
            socket.create_connection(("127.0.0.1", self.tls_port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self, timeout=60):
        subprocess.run(["rabbitmqctl", "-n", self.name, "stop"], env=self._env(),
                       capture_output=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        while amqp_answers(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)

    def destroy(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def available():
    return shutil.which("rabbitmq-server") is not None and os.geteuid() == 0
