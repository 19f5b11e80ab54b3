"""Workflows, taskd against Celery 5 on the same broker and the same Redis store.

    .venv/bin/python bench/workflows.py                 # 3 rounds
    .venv/bin/python bench/workflows.py --rounds 1 --chord 200 --chain 50

Measures (each: from the client's send to the final result in the client):
  chord   a chord of N no-op header tasks and a sum body (default 1,000)
  chain   a chain of N steps, each adding one to its predecessor's result (default 200)

Each system runs a worker of 2 processes (taskd: supervisor + 2 children, its
defaults; Celery: prefork -c 2, prefetch multiplier 4) on its own fresh queue, and
its own client sends. Rounds are interleaved; the table gives medians and the
taskd/Celery ratio of completion times (< 1: taskd is faster). Every wait is bounded.
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
BROKER = os.environ.get("TASKD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
BACKEND = os.environ.get("TASKD_TEST_REDIS", "redis://127.0.0.1:6379/0")
PY = sys.executable


def env():
    return dict(os.environ, BENCH_BROKER=BROKER, BENCH_BACKEND=BACKEND,
                PYTHONPATH=f"{HERE}:{ROOT}")


class Taskd:
    name = "taskd"

    def __init__(self):
        self.queue = f"bench.flow.taskd.{uuid.uuid4().hex[:6]}"
        fd, self.cfg = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"broker: {{url: '{BROKER}'}}\nimports: [flow_taskd]\n"
                     f"result_backend: '{BACKEND}'\nresult_expires: 600\n"
                     f"queues: [{{name: {self.queue}}}]\ndefault_queue: {self.queue}\n"
                     f"worker: {{concurrency: 2, control_socket: {self.cfg}.sock}}\n"
                     "logging: {level: warning}\n")
        os.environ["TASKD_CONFIG"] = self.cfg
        self.proc = subprocess.Popen([PY, "-m", "taskd", "worker", "--config", self.cfg],
                                     env=env(), cwd=HERE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        from taskd import App
        import flow_taskd
        self.app = App("bench", config=self.cfg)
        self.tasks = flow_taskd
        self.tasks.one.delay().get(timeout=60)          # the worker is up

    def chord(self, n):
        from taskd import chord
        t = self.tasks
        return chord([t.one.s() for _ in range(n)], t.tsum.s())().get(timeout=600)

    def chain(self, n):
        from taskd import chain
        t = self.tasks
        return chain(t.inc.s(0), *[t.inc.s() for _ in range(n - 1)])().get(timeout=600)

    def close(self):
        stop(self.proc)
        self.app.close()
        delete([self.queue])
        os.unlink(self.cfg)


class Celery:
    name = "celery"

    def __init__(self):
        self.queue = f"bench.flow.celery.{uuid.uuid4().hex[:6]}"
        os.environ.update(BENCH_BROKER=BROKER, BENCH_BACKEND=BACKEND)
        self.proc = subprocess.Popen(
            [PY, "-m", "celery", "-A", "flow_celery", "worker", "-P", "prefork", "-c", "2",
             "-Q", self.queue, "--loglevel=WARNING", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-n", f"{self.queue}@%h"],
            env=env(), cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import flow_celery
        self.tasks = flow_celery
        self.tasks.one.apply_async(queue=self.queue).get(timeout=60)

    def chord(self, n):
        from celery import chord
        t = self.tasks
        header = [t.one.s().set(queue=self.queue) for _ in range(n)]
        return chord(header, t.tsum.s().set(queue=self.queue))().get(timeout=600)

    def chain(self, n):
        from celery import chain
        t = self.tasks
        steps = [t.inc.s(0).set(queue=self.queue)] + \
            [t.inc.s().set(queue=self.queue) for _ in range(n - 1)]
        return chain(*steps)().get(timeout=600)

    def close(self):
        stop(self.proc)
        delete([self.queue])


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def delete(queues):
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(BROKER))
    ch = conn.channel()
    for q in queues:
        ch.queue_delete(q)
        try:
            ch.exchange_delete(q)
        except Exception:
            ch = conn.channel()
    conn.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chord", type=int, default=1000, help="header tasks (1000)")
    parser.add_argument("--chain", type=int, default=200, help="chain steps (200)")
    args = parser.parse_args()
    systems = [Taskd(), Celery()]
    times = {(s.name, m): [] for s in systems for m in ("chord", "chain")}
    try:
        for r in range(args.rounds):
            for measure, n, expect in (("chord", args.chord, args.chord),
                                       ("chain", args.chain, args.chain)):
                for system in systems:
                    start = time.perf_counter()
                    got = getattr(system, measure)(n)
                    took = time.perf_counter() - start
                    assert got == expect, (system.name, measure, got)
                    times[(system.name, measure)].append(took)
                    print(f"round {r + 1} {measure:5} {system.name:6} {took:7.3f}s", flush=True)
    finally:
        for system in systems:
            system.close()
    print(f"\n| measure | taskd (s) | Celery (s) | taskd/Celery |\n|---|---|---|---|")
    for measure, n in (("chord", args.chord), ("chain", args.chain)):
        t = statistics.median(times[("taskd", measure)])
        c = statistics.median(times[("celery", measure)])
        label = f"chord of {n} + sum body" if measure == "chord" else f"chain of {n} steps"
        print(f"| {label} | {t:.3f} | {c:.3f} | {t / c:.2f}x |")


if __name__ == "__main__":
    main()
