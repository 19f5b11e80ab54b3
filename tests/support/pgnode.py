"""A private PostgreSQL server on its own port, for fault tests: initdb in the test's
directory, run as the ``postgres`` user (the server refuses root), stopped by pid."""
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redisnode


def _bin(name):
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def available():
    try:
        import pwd
        pwd.getpwnam("postgres")
    except (ImportError, KeyError):
        return False
    return os.geteuid() == 0 and _bin("initdb") is not None and _bin("postgres") is not None


def _as_postgres(args, **kw):
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                          capture_output=True, **kw)


class PgNode:
    """Its data directory is a fresh one under the system's temporary directory (the
    test's own is not readable by the postgres user), removed by :meth:`destroy`."""

    def __init__(self):
        self.top = tempfile.mkdtemp(prefix="taskd-pg-")
        os.chmod(self.top, 0o755)
        self.dir = os.path.join(self.top, "data")
        self.port = redisnode.free_port()
        self.proc = None

    @property
    def url(self):
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self):
        os.makedirs(self.dir)
        shutil.chown(self.dir, "postgres", "postgres")
        _as_postgres([_bin("initdb"), "-D", self.dir, "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8"])
        return self

    def start(self, timeout=20.0):
        self.proc = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", _bin("postgres"), "-D", self.dir,
             "-p", str(self.port), "-k", self.dir, "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "max_connections=40"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if subprocess.run([_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                               str(self.port)]).returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"postgres on port {self.port} did not start")

    def crash(self):
        """SIGQUIT to the postmaster: immediate shutdown (what was committed stays)."""
        if self.proc is not None and self.proc.poll() is None:
            pid = int(open(os.path.join(self.dir, "postmaster.pid")).readline())
            os.kill(pid, signal.SIGQUIT)
            self.proc.wait(30)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:        # its port free again
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", self.port)) != 0:
                        break
                time.sleep(0.05)

    def destroy(self):
        self.crash()
        shutil.rmtree(self.top, ignore_errors=True)
