"""CPU time per task of each process while one system drains a pre-filled queue.

    .venv/bin/python bench/cpu_split.py taskd 40000
    .venv/bin/python bench/cpu_split.py taskd-tuned 40000
    .venv/bin/python bench/cpu_split.py celery 20000
    .venv/bin/python bench/cpu_split.py taskd 40000 --set prefetch_multiplier=16
    .venv/bin/python bench/cpu_split.py taskd 40000 --before ../taskd-old   # that checkout's worker

Prints the drain rate and, per task, the CPU microseconds (user + system) of the
worker's main process (taskd's supervisor, Celery's MainProcess), of its children
together, and of the RabbitMQ server (beam.smp), measured between the first and
the last completion. The system that is the bottleneck is the one whose main
process approaches 1e6 / rate microseconds per task.
"""
import argparse
import time

import psutil

import run as B

SYSTEMS = {"taskd": lambda s, r: B.Taskd(settings=s, root=r),
           "taskd-tuned": lambda s, r: B.Taskd(True, s, root=r),
           "celery": lambda s, r: B.Celery(), "dramatiq8": lambda s, r: B.Dramatiq(8)}


def cpu(proc):
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("n", type=int, nargs="?", default=40000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a worker.* setting for taskd (repeatable)")
    parser.add_argument("--before", metavar="PATH",
                        help="run the worker of another taskd checkout (as bench/run.py --before)")
    args = parser.parse_args()
    root = B.before_checkout(args.before) if args.before else None
    settings = dict(item.split("=", 1) for item in args.set)
    beams = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]
    system = SYSTEMS[args.system](settings, root)
    run = B.Run(system)
    try:
        system.send_noop(run, args.n)
        run.start()
        B.wait(lambda: run.count() >= 1, 60, "the first completion")
        procs = B.tree(run.proc.pid)
        before = {p.pid: cpu(p) for p in procs}
        broker_before = sum(cpu(b) for b in beams)
        start = time.perf_counter()
        B.wait(lambda: run.count() >= args.n, 600, "the drain")
        elapsed = time.perf_counter() - start
        procs = B.tree(run.proc.pid)
        per_task = [1e6 * (cpu(p) - before.get(p.pid, 0.0)) / args.n for p in procs]
        broker = 1e6 * (sum(cpu(b) for b in beams) - broker_before) / args.n
        print(f"{system.name}: {args.n / elapsed:,.0f} tasks/s; CPU per task: main "
              f"{per_task[0]:.0f} us, children {sum(per_task[1:]):.0f} us, broker {broker:.0f} us")
    finally:
        run.close()


if __name__ == "__main__":
    main()
