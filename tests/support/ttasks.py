"""Tasks used by the test suite (imported by the workers the tests start).

``record`` appends ``<token> <supervisor pid> <child pid>`` to a file, so a
test counts executions by task token, not by sleeping.
"""
import os
import signal
import time

from taskd import current_app

app = current_app()


@app.task(name="ttasks.add")
def add(x, y):
    return x + y


@app.task(name="ttasks.echo")
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@app.task(name="ttasks.fail")
def fail(message="boom"):
    raise ValueError(message)


@app.task(name="ttasks.record")
def record(path, token, sleep=0.0):
    if sleep:
        time.sleep(sleep)
    with open(path, "a") as fh:
        fh.write(f"{token} {os.getppid()} {os.getpid()}\n")
    return token


@app.task(name="ttasks.note")
def note(path, token, *args, **kwargs):
    """Record a run before anything else can go wrong; any further arguments are ignored."""
    with open(path, "a") as fh:
        fh.write(f"{token} {os.getppid()} {os.getpid()}\n")
    return len(args)


@app.task(name="ttasks.sleep")
def sleep(seconds, path=None, token=None):
    if path:
        with open(path, "a") as fh:
            fh.write(f"start {token} {os.getpid()}\n")
    time.sleep(seconds)
    if path:
        with open(path, "a") as fh:
            fh.write(f"end {token} {os.getpid()}\n")
    return seconds


@app.task(name="ttasks.die")
def die():
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(name="ttasks.unencodable")
def unencodable():
    return object()


@app.task(name="ttasks.now")
def now():
    return time.time()


@app.task(name="ttasks.whoami", bind=True)
def whoami(self):
    r = self.request
    return {"id": r.id, "retries": r.retries, "custom": r.headers.get("x-custom"),
            "delivery_count": r.delivery_count}


@app.task(name="ttasks.typed")
def typed(value):
    return {"type": type(value).__name__, "value": value}


@app.task(name="ttasks.flaky", bind=True, max_retries=5)
def flaky(self, succeed_after, path=None):
    if path:
        with open(path, "a") as fh:
            fh.write(f"attempt {self.request.retries} {time.time()}\n")
    if self.request.retries < succeed_after:
        raise self.retry(exc=IOError("not yet"), countdown=0.3)
    return self.request.retries


@app.task(name="ttasks.always_keyerror", autoretry_for=(KeyError,), retry_backoff=0.1,
          retry_jitter=False, max_retries=2)
def always_keyerror(path):
    with open(path, "a") as fh:
        fh.write(f"attempt {time.time()}\n")
    raise KeyError("missing")


@app.task(name="ttasks.soft_limited", soft_time_limit=0.5)
def soft_limited():
    from taskd.exceptions import SoftTimeLimitExceeded
    try:
        time.sleep(5)
    except SoftTimeLimitExceeded:
        return "caught the soft limit"
    return "slept"


@app.task(name="ttasks.allocate")
def allocate(megabytes, token, path):
    global _ballast
    _ballast = bytearray(megabytes << 20)
    with open(path, "a") as fh:
        fh.write(f"{token} {os.getppid()} {os.getpid()}\n")
    return token


@app.task(name="ttasks.die_once")
def die_once(path, token):
    """Kill its own child the first time it runs for ``token``; succeed after."""
    marker = f"{path}.{token}.died"
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    with open(path, "a") as fh:
        fh.write(f"{token} {os.getppid()} {os.getpid()}\n")
    return token


@app.task(name="ttasks.big")
def big(size):
    """A result of ``size`` characters."""
    return "x" * size


@app.task(name="ttasks.big_after")
def big_after(seconds, size, path=None, token=None):
    """Sleep, then return ``size`` bytes of text (more than a pipe buffer holds)."""
    if path:
        with open(path, "a") as fh:
            fh.write(f"start {token} {os.getpid()}\n")
    time.sleep(seconds)
    return "x" * size


@app.task(name="ttasks.seconds_to_soft_limit")
def seconds_to_soft_limit():
    """Sleep until the soft time limit interrupts; return how long that took."""
    from taskd.exceptions import SoftTimeLimitExceeded
    start = time.monotonic()
    try:
        time.sleep(30)
    except SoftTimeLimitExceeded:
        return time.monotonic() - start
    return None


@app.task(name="ttasks.periodic_record", bind=True)
def periodic_record(self, path):
    """Record a periodic firing: ``<slot> <task id> <entry> <supervisor pid>``."""
    headers = self.request.headers or {}
    with open(path, "a") as fh:
        fh.write(f"{headers.get('x-taskd-slot')} {self.request.id} "
                 f"{headers.get('x-taskd-periodic')} {os.getppid()}\n")
    return self.request.id


def _wait_file(path, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


@app.task(name="ttasks.progress", bind=True, track_started=True)
def progress(self, go_path, done_path):
    """STARTED (tracked), then PROGRESS once ``go_path`` exists, then SUCCESS once
    ``done_path`` exists (result stores)."""
    _wait_file(go_path)
    self.update_state(state="PROGRESS", meta={"done": 1, "of": 2})
    _wait_file(done_path)
    return "finished"
