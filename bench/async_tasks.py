"""async def tasks: taskd's coroutines per child against Dramatiq's AsyncIO middleware.

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/async_tasks.py [--tasks 10000] [--rounds 3]

N tasks that each ``await asyncio.sleep(0.01)`` (then append one byte to a file,
to count completions), pre-filled in a fresh queue, then drained by 2 worker
processes with 100 coroutines each:

* taskd: ``worker.concurrency: 2``, ``worker.async_concurrency: 100`` (one event loop
  per child, 100 coroutines at once; the prefetch follows: 2 x 100 x 4);
* Dramatiq: ``--processes 2 --threads 100`` with the ``AsyncIO`` middleware (one
  event loop per process; each worker thread waits on one coroutine).

The rate is N over the time from the first completion to the last (the workers'
start-up is not counted). The ideal is 2 x 100 / 0.01 s = 20,000 tasks/s. Rounds
alternate between the two; the medians and the ratio are printed.
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as bench  # noqa: E402  (bench/run.py: Run, wait, the systems' plumbing)


class TaskdAsync(bench.Taskd):
    def __init__(self):
        super().__init__(settings={"async_concurrency": 100})
        self.key, self.name = "taskd_async", "taskd async_concurrency=100"

    def send_noop(self, run, n):
        with self.app.get_publisher() as p:
            for _ in range(n):
                self.app.send_task("bench.anap", queue=run.queue, ignore_result=True,
                                   publisher=p)


class DramatiqAsync(bench.Dramatiq):
    def __init__(self):
        super().__init__(100)
        self.key, self.name = "dramatiq_async", "dramatiq AsyncIO 100 threads"

    def command(self, run):
        return [bench.PY, "-m", "dramatiq", "tasks_dramatiq_async", "--processes", "2",
                "--threads", "100", "--queues", run.queue]

    def _actors(self, run):
        os.environ["BENCH_QUEUE"] = run.queue
        import importlib
        import tasks_dramatiq_async
        return importlib.reload(tasks_dramatiq_async)

    def send_noop(self, run, n):
        mod = self._actors(run)
        for _ in range(n):
            mod.anap.send()


def drain(system, n):
    """Fill a fresh queue with n tasks, start the worker, time first to last completion."""
    r = bench.Run(system)
    try:
        system.send_noop(r, n)
        r.start()
        bench.wait(lambda: r.count() >= 1, 120, f"{system.name}: first completion")
        first = time.monotonic()
        bench.wait(lambda: r.count() >= n, 300, f"{system.name}: {n} completions")
        return n / (time.monotonic() - first)
    finally:
        r.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    systems = [TaskdAsync(), DramatiqAsync()]
    rates = {s.key: [] for s in systems}
    for i in range(args.rounds):
        for s in systems:
            rate = drain(s, args.tasks)
            rates[s.key].append(rate)
            print(f"round {i + 1}: {s.name}: {rate:,.0f} tasks/s", flush=True)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{args.tasks} tasks awaiting 10 ms, 2 processes x 100, median of {args.rounds}:")
    for s in systems:
        print(f"  {s.name:32} {medians[s.key]:>9,.0f} tasks/s")
    print(f"  taskd / dramatiq: {medians['taskd_async'] / medians['dramatiq_async']:.2f}x")


if __name__ == "__main__":
    main()
