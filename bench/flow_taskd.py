"""The workflow benchmark's tasks for taskd (bench/workflows.py)."""
from taskd import current_app

app = current_app()


@app.task(name="bench.flow.one")
def one(*args):
    return 1


@app.task(name="bench.flow.inc")
def inc(x):
    return x + 1


@app.task(name="bench.flow.tsum")
def tsum(values):
    return sum(values)
