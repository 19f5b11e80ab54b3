"""The benchmark's no-op task for taskd: append one byte to $BENCH_OUT."""
import os

from taskd import current_app

app = current_app()
_out = None


@app.task(name="bench.noop", ignore_result=False)
def noop():
    global _out
    if _out is None:
        _out = os.open(os.environ["BENCH_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_out, b".")


@app.task(name="bench.late")
def late(due):
    import time
    with open(os.environ["BENCH_OUT"], "a") as fh:
        fh.write(f"{time.time() - due:.6f}\n")


@app.task(name="bench.anap")
async def anap(seconds=0.01):
    """bench/async_tasks.py: await, then append one byte."""
    import asyncio
    global _out
    await asyncio.sleep(seconds)
    if _out is None:
        _out = os.open(os.environ["BENCH_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_out, b".")
