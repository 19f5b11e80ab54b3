"""Tasks of the workflow tests (imported by the workers they start)."""
import os
import time

from taskd import current_app

app = current_app()


@app.task(name="flowtasks.add")
def add(x, y):
    return x + y


@app.task(name="flowtasks.tsum")
def tsum(values, path=None):
    if path:
        _append(path, f"sum {sorted(values)}")
    return sum(values)


@app.task(name="flowtasks.fail")
def fail(*args):
    raise ValueError(f"failed on purpose: {args!r}")


@app.task(name="flowtasks.ids", bind=True)
def ids(self, *args):
    return [self.request.id, self.request.parent_id, self.request.root_id]


@app.task(name="flowtasks.on_error")
def on_error(task_id, path):
    """An error callback: records the id of the task that failed."""
    _append(path, f"error {task_id}")


@app.task(name="flowtasks.step")
def step(value, path, token, sleep=0.0):
    """A chain step: marks that it started (and in which process), sleeps, records that it
    completed (value + 1)."""
    _append(path + ".started", f"{token} {os.getpid()}")
    time.sleep(sleep)
    _append(path, f"done {token}")
    return value + 1


def _append(path, line):
    with open(path, "a") as f:
        f.write(f"{line}\n")
        f.flush()
        os.fsync(f.fileno())


@app.task(name="flowtasks.retry_once", bind=True)
def retry_once(self, value, path):
    """Retries once (the first time it sees no ``path``), then returns value + 1."""
    if not os.path.exists(path):
        _append(path, "retried")
        raise self.retry(countdown=0.1)
    return value + 1
