"""The benchmark's tasks for Celery 5 (prefork), on the same broker."""
import os
import time

from celery import Celery

app = Celery("bench", broker=os.environ.get("BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
             backend=os.environ.get("BENCH_BACKEND", "rpc://"))
app.conf.task_acks_late = os.environ.get("BENCH_ACKS_LATE") == "1"
app.conf.worker_prefetch_multiplier = 4
app.conf.worker_hijack_root_logger = False
_out = None


@app.task(name="bench.noop")
def noop():
    global _out
    if _out is None:
        _out = os.open(os.environ["BENCH_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_out, b".")


@app.task(name="bench.late")
def late(due):
    with open(os.environ["BENCH_OUT"], "a") as fh:
        fh.write(f"{time.time() - due:.6f}\n")
