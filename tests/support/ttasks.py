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
