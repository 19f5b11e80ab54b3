"""The workflow benchmark's tasks for Celery 5 (bench/workflows.py), same names."""
import os

from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
app.conf.worker_prefetch_multiplier = 4
app.conf.worker_hijack_root_logger = False


@app.task(name="bench.flow.one")
def one(*args):
    return 1


@app.task(name="bench.flow.inc")
def inc(x):
    return x + 1


@app.task(name="bench.flow.tsum")
def tsum(values):
    return sum(values)
