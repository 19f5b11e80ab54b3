"""``async def`` tasks and signal receivers for tests/integration/test_asyncio.py.

Receivers write ``<signal> <pid> <detail>`` lines to ``$AIOTASKS_SIGNALS`` (if
set), so a test sees which process each signal ran in.
"""
import asyncio
import os
import time

from taskd import current_app, signals

app = current_app()
LOOPS = set()       # ids of the event loops this child's coroutines ran on


def _note(line):
    path = os.environ.get("AIOTASKS_SIGNALS")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{line}\n")


INIT_LOOP = []      # the loop current when worker_process_init ran


@signals.worker_process_init.connect
def _child_ready(sender=None, **kwargs):
    INIT_LOOP.append(id(asyncio.get_event_loop()))
    _note(f"worker_process_init {os.getpid()} -")


@signals.worker_process_init.connect
def _broken_receiver(**kwargs):
    raise RuntimeError("a receiver that raises (logged, ignored)")


@signals.task_prerun.connect
def _prerun(sender=None, task_id=None, **kwargs):
    _note(f"task_prerun {os.getpid()} {sender.name}")


@signals.task_postrun.connect
def _postrun(sender=None, state=None, **kwargs):
    _note(f"task_postrun {os.getpid()} {sender.name}:{state}")


@signals.task_success.connect
def _success(sender=None, result=None, **kwargs):
    _note(f"task_success {os.getpid()} {sender.name}:{result!r}")


@signals.task_failure.connect
def _failure(sender=None, exception=None, **kwargs):
    _note(f"task_failure {os.getpid()} {sender.name}:{type(exception).__name__}")


@signals.task_retry.connect
def _retry(sender=None, reason=None, request=None, **kwargs):
    _note(f"task_retry {os.getpid()} {sender.name}:{request.retries}")


@signals.task_success.connect
def _raises_on_success(**kwargs):
    raise RuntimeError("a task receiver that raises never fails the task")


@app.task(name="aiotasks.nap")
async def nap(seconds, token=None):
    LOOPS.add(id(asyncio.get_running_loop()))
    started = time.time()
    await asyncio.sleep(seconds)
    return {"pid": os.getpid(), "loops": len(LOOPS), "started": started, "token": token,
            "init_loop": INIT_LOOP == [id(asyncio.get_running_loop())]}


@app.task(name="aiotasks.soft")
async def soft(seconds):
    try:
        await asyncio.sleep(seconds)
    except Exception as exc:            # SoftTimeLimitExceeded, raised at the await
        return f"caught {type(exc).__name__}"
    return "slept"


@app.task(name="aiotasks.hog")
async def hog(seconds):
    time.sleep(seconds)                 # blocks the loop: logged by the block warning
    await asyncio.sleep(0)
    return "hogged"


@app.task(name="aiotasks.hang")
async def hang(path, token, seconds):
    with open(path, "a") as fh:
        fh.write(f"{token} {os.getpid()}\n")
    await asyncio.sleep(seconds)
    return token


@app.task(name="aiotasks.flaky", bind=True)
async def flaky(self):
    await asyncio.sleep(0)
    if self.request.retries < 1:
        raise self.retry(countdown=0.1)
    return f"retried {self.request.retries}"


@app.task(name="aiotasks.boom")
async def boom(message):
    await asyncio.sleep(0)
    raise ValueError(message)


@signals.worker_process_shutdown.connect
def _child_leaving(sender=None, pid=None, exitcode=None, **kwargs):
    _note(f"worker_process_shutdown {os.getpid()} {pid}:{exitcode}")
