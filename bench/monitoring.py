"""What events and metrics cost the worker: drain rates side by side, in one run.

    .venv/bin/python bench/monitoring.py                    # 20,000 tasks, 5 rounds
    .venv/bin/python bench/monitoring.py --n 5000 --rounds 3
    .venv/bin/python bench/monitoring.py --main ../main     # also the worker of another
                                                            # checkout, no observers

Systems (all with 2 children, defaults unless named; ``tuned`` is bench/run.py's
``child_prefetch: 2, prefetch_multiplier: 16``, where the supervisor's own cost
shows most):

  taskd          no observer: the default path, through the lifecycle seam's no-op
  taskd -E       worker.send_events: true (events published, nobody consuming them)
  taskd metrics  metrics.listen on a free port (not scraped meanwhile)
  taskd-main     the worker of ``--main`` (before the seam), same client

Each round runs every system once, in turn, on a fresh pre-filled queue
(bench/run.py's drain: the rate between the first and the last completion), and
also reads the supervisor's CPU time (user + system) over the same window: CPU
microseconds per task depend much less on what else the machine runs than the
rate does. The tables give medians and the ratio to ``taskd``.
"""
import argparse
import os
import socket
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import time  # noqa: E402

import psutil  # noqa: E402

from run import Run, Taskd, before_checkout, wait  # noqa: E402


def drain(system, n):
    """bench/run.py's drain, plus the supervisor's CPU seconds per task meanwhile."""
    run = Run(system)
    try:
        system.send_noop(run, n)
        run.start()
        supervisor = psutil.Process(run.proc.pid)
        wait(lambda: run.count() >= 1, 60, "first completion")
        first, cpu = time.perf_counter(), supervisor.cpu_times()
        wait(lambda: run.count() >= n, 600, "the drain")
        elapsed, after = time.perf_counter() - first, supervisor.cpu_times()
        used = (after.user - cpu.user) + (after.system - cpu.system)
        return (n - 1) / elapsed, used / (n - 1) * 1e6
    finally:
        run.close()


class Monitored(Taskd):
    """taskd with events on (``events``) or metrics served (``metrics``)."""

    def __init__(self, what, tuned=False):
        super().__init__(tuned=tuned, settings={"send_events": "true"} if what == "events"
                         else None)
        self.what = what
        self.key += "_" + what
        self.name = ("taskd tuned" if tuned else "taskd") + (" -E" if what == "events"
                                                             else " metrics")

    def command(self, run):
        cmd = super().command(run)
        if self.what == "metrics":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with open(run.cfg, "a") as fh:
                fh.write(f"metrics: {{listen: '127.0.0.1:{port}'}}\n")
        return cmd


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="tasks per drain")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--main", metavar="PATH", help="a checkout whose worker runs as "
                        "taskd-main")
    parser.add_argument("--tuned", action="store_true", help="the tuned settings for all")
    args = parser.parse_args()
    tuned = args.tuned
    systems = [Taskd(tuned=tuned), Monitored("events", tuned), Monitored("metrics", tuned)]
    if args.main:
        main_system = Taskd(tuned=tuned, root=before_checkout(args.main))
        main_system.name = main_system.name.replace("taskd-before", "taskd-main")
        systems.append(main_system)
    rates = {s.name: [] for s in systems}
    cpus = {s.name: [] for s in systems}
    for r in range(args.rounds):
        for s in systems:
            rate, cpu = drain(s, args.n)
            rates[s.name].append(rate)
            cpus[s.name].append(cpu)
            print(f"round {r + 1} {s.name:22} {rate:8.0f}/s {cpu:6.1f} us CPU/task",
                  file=sys.stderr)
    print(f"\ndrain of {args.n:,} tasks, {args.rounds} rounds, medians:\n")
    table("tasks/s", rates, systems, "{:,.0f}")
    print()
    table("supervisor CPU µs/task", cpus, systems, "{:.1f}")


def table(what, values, systems, form):
    base = statistics.median(values[systems[0].name])
    print(f"| system | {what} (median) | all rounds | vs taskd |")
    print("|---|---|---|---|")
    for s in systems:
        med = statistics.median(values[s.name])
        print(f"| {s.name} | {form.format(med)} | "
              f"{', '.join(form.format(x) for x in values[s.name])} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
