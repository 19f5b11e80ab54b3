"""taskd side by side with Celery 5 and Dramatiq 2 on the same broker, in one run.

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/run.py                       # full sizes, 3 rounds
    .venv/bin/python bench/run.py --quick               # small sizes, 1 round
    .venv/bin/python bench/run.py --write docs/benchmarks.md
    .venv/bin/python bench/run.py --before ../taskd-main  # also "taskd-before": the worker
                                                          # of another checkout, same client

Every system runs the same task body (append one byte to a file, so completions
are counted the same way) with 2 worker processes, on its own fresh queue. Rounds
are interleaved (each measure runs every system before the next round); the
table gives medians and the taskd/peer ratios. All waits are bounded.

Measures:
  drain      N pre-filled tasks; rate between the first and the last completion
  stream     publish N tasks while the worker runs; N / (last completion - first send)
  latency    sequential send + get() round trips (result via the rpc pattern)
  eta        N tasks sent at once with countdown=2: lateness (run - due) p50/p99/max,
             never early; the worker tree's peak RSS meanwhile
  memory     PSS and RSS of the idle worker tree (supervisor/main + children)
  publish    one client publishing N tasks (taskd with confirms)

With ``--backend URL`` (redis://... or postgresql://...), drain and latency run with
results *stored* in that result store, taskd against Celery configured with the same
store (Celery only for redis://: its SQL backend needs SQLAlchemy and has its own
schema). Drain tasks then keep their results (no ignore_result); a round trip is
send + get() through the store's pub/sub (taskd: LISTEN/NOTIFY on PostgreSQL).
"""
import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import pika
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
BROKER = os.environ.get("TASKD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PY = sys.executable
BACKEND = None      # --backend: the result store both sides use


def wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def tree(pid):
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_memory(pid):
    pss = rss = 0
    for p in tree(pid):
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        pss += info.pss
        rss += info.rss
    return pss, rss


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            for p in tree(proc.pid)[::-1]:
                p.kill()
            proc.wait(10)


def delete(queues, exchanges=()):
    conn = pika.BlockingConnection(pika.URLParameters(BROKER))
    ch = conn.channel()
    for q in queues:
        ch.queue_delete(q)
    for e in exchanges:
        ch.exchange_delete(e)
    conn.close()


class Run:
    """One worker of one system on a fresh queue, with a fresh output file."""

    def __init__(self, system, **opts):
        self.system, self.opts = system, opts
        self.queue = f"bench.{system.key}.{uuid.uuid4().hex[:6]}"
        fd, self.out = tempfile.mkstemp(prefix="bench-")
        os.close(fd)
        self.proc = None

    def env(self):
        return dict(os.environ, BENCH_OUT=self.out, BENCH_QUEUE=self.queue, BENCH_BROKER=BROKER,
                    PYTHONPATH=f"{HERE}:{getattr(self.system, 'root', ROOT)}", BENCH_ACKS_LATE="1" if self.opts.get("acks_late") else "0",
                    BENCH_BACKEND=BACKEND or "rpc://")

    def count(self):
        return os.path.getsize(self.out)

    def start(self):
        self.proc = subprocess.Popen(self.system.command(self), env=self.env(), cwd=HERE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def warm(self):
        """Start the worker and wait until it has run one task."""
        self.start()
        self.system.send_noop(self, 1)
        wait(lambda: self.count() >= 1, 60, f"{self.system.name} to start")
        return self

    def close(self):
        if self.proc is not None:
            stop(self.proc)
        self.system.cleanup(self)
        os.unlink(self.out)


class Taskd:
    """taskd with its defaults, or ``tuned`` for short tasks: each child is sent its next
    task in advance (``worker.child_prefetch: 2``) and the supervisor reserves more
    messages (``worker.prefetch_multiplier: 16``). Both are documented trade-offs."""

    TUNED = {"child_prefetch": 2, "prefetch_multiplier": 16}

    def __init__(self, tuned=False, settings=None, root=None):
        from taskd import App
        self.app = App("bench", broker=BROKER, backend=BACKEND)
        self.settings = dict(self.TUNED if tuned else {}, **(settings or {}))
        self.key = "taskd_tuned" if tuned else "taskd"
        self.name = "taskd tuned" if tuned else "taskd"
        self.root = root or ROOT        # the checkout whose taskd package the worker runs
        if root:                        # --before: the same client, that checkout's worker
            self.key += "_before"
            self.name = self.name.replace("taskd", "taskd-before", 1)
        if settings:
            self.name += " " + " ".join(f"{k}={v}" for k, v in settings.items())

    def command(self, run):
        cfg = os.path.join(tempfile.gettempdir(), f"{run.queue}.yaml")
        tuning = "".join(f"{k}: {v}, " for k, v in self.settings.items())
        with open(cfg, "w") as fh:
            fh.write(f"broker: {{url: '{BROKER}'}}\nimports: [tasks_taskd]\n"
                     f"queues: [{{name: {run.queue}}}]\n"
                     f"worker: {{concurrency: 2, queues: [{run.queue}], {tuning}"
                     f"control_socket: {cfg}.sock, "
                     f"delay_queue_prefix: {run.queue}.delay}}\nlogging: {{level: warning}}\n"
                     + (f"result_backend: '{BACKEND}'\n" if BACKEND else ""))
        run.cfg = cfg
        return [PY, "-m", "taskd", "worker", "--config", cfg]

    def send_noop(self, run, n):
        with self.app.get_publisher() as p:
            for _ in range(n):
                self.app.send_task("bench.noop", queue=run.queue, ignore_result=not BACKEND,
                                   publisher=p)

    def send_late(self, run, n, countdown):
        with self.app.get_publisher() as p:
            for _ in range(n):
                due = time.time() + countdown
                self.app.send_task("bench.late", [due], queue=run.queue, countdown=countdown,
                                   ignore_result=True, publisher=p)

    def roundtrip(self, run):
        self.app.send_task("bench.noop", queue=run.queue).get(timeout=10)

    def publish_rate(self, run, n):
        start = time.perf_counter()
        self.send_noop(run, n)
        return n / (time.perf_counter() - start)

    def cleanup(self, run):
        from taskd.worker.parking import BUCKETS
        names = [f"{run.queue}.delay.{b}s" for b in BUCKETS]
        delete([run.queue, "taskd.dead", *names], [run.queue, *names])
        if getattr(run, "cfg", None):
            os.unlink(run.cfg)


class Celery:
    key = "celery"

    def __init__(self, acks_late=False):
        import tasks_celery
        self.acks_late = acks_late
        self.name = "celery" + (" acks_late" if acks_late else "")
        self.key = "celery_late" if acks_late else "celery"
        self.mod = tasks_celery

    def command(self, run):
        return [PY, "-m", "celery", "-A", "tasks_celery", "worker", "-P", "prefork", "-c", "2",
                "-Q", run.queue, "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                "--without-heartbeat", "-n", f"{run.queue}@%h"]

    def send_noop(self, run, n):
        for _ in range(n):
            self.mod.app.send_task("bench.noop", queue=run.queue, ignore_result=not BACKEND)

    def send_late(self, run, n, countdown):
        for _ in range(n):
            due = time.time() + countdown
            self.mod.app.send_task("bench.late", [due], queue=run.queue, countdown=countdown,
                                   ignore_result=True)

    def roundtrip(self, run):
        self.mod.app.send_task("bench.noop", queue=run.queue).get(timeout=10)

    def publish_rate(self, run, n):
        start = time.perf_counter()
        self.send_noop(run, n)
        return n / (time.perf_counter() - start)

    def cleanup(self, run):
        delete([run.queue], [run.queue])


class Dramatiq:
    def __init__(self, threads):
        self.threads = threads
        self.key = f"dramatiq{threads}"
        self.name = f"dramatiq {threads} thread{'s' if threads > 1 else ''}"

    def command(self, run):
        return [PY, "-m", "dramatiq", "tasks_dramatiq", "--processes", "2", "--threads",
                str(self.threads), "--queues", run.queue]

    def _actors(self, run):
        os.environ["BENCH_QUEUE"] = run.queue
        import importlib
        import tasks_dramatiq
        return importlib.reload(tasks_dramatiq)

    def send_noop(self, run, n):
        mod = self._actors(run)
        for _ in range(n):
            mod.noop.send()

    def send_late(self, run, n, countdown):
        mod = self._actors(run)
        for _ in range(n):
            due = time.time() + countdown
            mod.late.send_with_options(args=(due,), delay=int(countdown * 1000))

    roundtrip = None      # no result backend without Redis

    def publish_rate(self, run, n):
        mod = self._actors(run)
        start = time.perf_counter()
        for _ in range(n):
            mod.noop.send()
        return n / (time.perf_counter() - start)

    def cleanup(self, run):
        delete([run.queue, f"{run.queue}.DQ", f"{run.queue}.XQ"])


# -- measures -------------------------------------------------------------------

def m_drain(system, n):
    run = Run(system, acks_late=getattr(system, "acks_late", False))
    try:
        system.send_noop(run, n)
        run.start()
        wait(lambda: run.count() >= 1, 60, "first completion")
        first = time.perf_counter()
        wait(lambda: run.count() >= n, 600, "the drain")
        return {"rate": (n - 1) / (time.perf_counter() - first)}
    finally:
        run.close()


def m_stream(system, n):
    run = Run(system, acks_late=getattr(system, "acks_late", False)).warm()
    try:
        start = time.perf_counter()
        system.send_noop(run, n)
        wait(lambda: run.count() >= n + 1, 600, "the stream")
        return {"rate": n / (time.perf_counter() - start)}
    finally:
        run.close()


def m_latency(system, n):
    if system.roundtrip is None:
        return None
    run = Run(system).warm()
    try:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            system.roundtrip(run)
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        return {"p50": times[len(times) // 2], "p90": times[int(len(times) * 0.9)],
                "p99": times[int(len(times) * 0.99)]}
    finally:
        run.close()


def m_eta(system, n):
    run = Run(system).warm()
    try:
        open(run.out, "w").close()                # drop the warm-up byte
        base_pss, base_rss = tree_memory(run.proc.pid)
        system.send_late(run, n, 2.0)
        peak = base_rss
        deadline = time.monotonic() + 120
        while True:
            with open(run.out) as fh:
                done = sum(1 for _ in fh)
            if done >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("ETA tasks did not all run")
            peak = max(peak, tree_memory(run.proc.pid)[1])
            time.sleep(0.05)
        with open(run.out) as fh:
            late = sorted(float(x) * 1000 for x in fh)
        return {"p50": late[len(late) // 2], "p99": late[int(len(late) * 0.99)], "max": late[-1],
                "min": late[0], "peak_rss": peak / 2**20}
    finally:
        run.close()


def m_memory(system, _n):
    run = Run(system).warm()
    try:
        time.sleep(1.0)
        pss, rss = tree_memory(run.proc.pid)
        return {"pss": pss / 2**20, "rss": rss / 2**20}
    finally:
        run.close()


def m_publish(system, n):
    run = Run(system)
    try:
        return {"rate": system.publish_rate(run, n)}
    finally:
        run.close()


MEASURES = {
    "drain": (m_drain, 20000, 2000), "stream": (m_stream, 10000, 1000),
    "latency": (m_latency, 1000, 100), "eta1k": (m_eta, 1000, 200),
    "eta10k": (m_eta, 10000, 1000), "memory": (m_memory, 0, 0), "publish": (m_publish, 5000, 500),
}
WHO = {
    "drain": ["taskd", "taskd_tuned", "celery", "celery_late", "dramatiq1", "dramatiq8"],
    "stream": ["taskd", "taskd_tuned", "celery", "dramatiq1", "dramatiq8"],
    "latency": ["taskd", "celery"],
    "eta1k": ["taskd", "celery", "dramatiq8"], "eta10k": ["taskd", "celery", "dramatiq8"],
    "memory": ["taskd", "celery", "dramatiq1"],
    "publish": ["taskd", "celery", "dramatiq1"],
}


def before_checkout(path):
    """The checkout ``--before`` names: a directory holding a ``taskd`` package."""
    root = os.path.abspath(path)
    if not os.path.isfile(os.path.join(root, "taskd", "__init__.py")):
        raise SystemExit(f"--before {path}: no taskd package there (expected "
                         f"{os.path.join(root, 'taskd', '__init__.py')})")
    return root


BEFORE_AFTER = ("drain", "stream", "latency")     # the measures --before adds a system to


def median_of(results, key):
    values = [r[key] for r in results if r]
    return statistics.median(values) if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated measures: " + ",".join(MEASURES))
    parser.add_argument("--write", metavar="FILE", help="write the Markdown table into FILE")
    parser.add_argument("--before", metavar="PATH",
                        help="another taskd checkout: its worker runs as \"taskd-before\" "
                        "beside this one in drain, stream and latency (same client)")
    parser.add_argument("--backend", metavar="URL",
                        help="store results in this result store (redis://... or "
                        "postgresql://...): drain and latency, taskd against Celery")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    if args.backend:
        global BACKEND
        BACKEND = os.environ["BENCH_BACKEND"] = args.backend
        args.only = args.only or "drain,latency"
    candidates = [Taskd(), Taskd(tuned=True), Celery(), Celery(acks_late=True), Dramatiq(1),
                  Dramatiq(8)]
    who = {m: list(keys) for m, keys in WHO.items()}
    if args.backend:
        peers = ["celery"] if args.backend.startswith("redis") else []
        who = {"drain": ["taskd", "taskd_tuned", *peers], "latency": ["taskd", *peers]}
    if args.before:
        root = before_checkout(args.before)
        candidates += [Taskd(root=root), Taskd(tuned=True, root=root)]
        for m in BEFORE_AFTER:
            for key in ("taskd_tuned", "taskd"):
                if key in who[m]:
                    who[m].insert(who[m].index(key) + 1, f"{key}_before")
    systems = {s.key: s for s in candidates}
    only = args.only.split(",") if args.only else list(MEASURES)
    results = {m: {k: [] for k in who[m]} for m in only}
    for r in range(rounds):
        for m in only:
            fn, full, quick = MEASURES[m]
            for key in who[m]:
                value = fn(systems[key], quick if args.quick else full)
                results[m][key].append(value)
                print(f"round {r + 1} {m:8} {systems[key].name:18} {value}", file=sys.stderr)
    table = render(results, systems, rounds, args)
    print(table)
    if args.write:
        write(args.write, table)


def fmt(v, unit=""):
    return "-" if v is None else (f"{v:,.0f}{unit}" if v >= 100 else f"{v:.1f}{unit}")


def render(results, systems, rounds, args):
    cmd = "bench/run.py" + (" --quick" if args.quick else f" --rounds {rounds}") + \
        (f" --backend {args.backend}" if args.backend else "") + \
        (f" --only {args.only}" if args.only else "") + \
        (f" --before {args.before}" if args.before else "")
    import celery
    import dramatiq
    import pika as pika_mod
    out = [f"Command: `.venv/bin/python {cmd}` — {time.strftime('%Y-%m-%d %H:%M')}, "
           f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, "
           f"celery {celery.__version__}, dramatiq {dramatiq.__version__}, pika {pika_mod.__version__}, "
           f"{rounds} round(s), medians.", ""]
    out += ["| measure | system | median | ratio taskd/this | ratio taskd tuned/this |",
            "|---|---|---|---|---|"]
    spec = {"drain": ("rate", "tasks/s", True), "stream": ("rate", "tasks/s", True),
            "publish": ("rate", "msgs/s", True)}
    for m, per in results.items():
        if m in spec:
            key, unit, higher = spec[m]
            base = median_of(per["taskd"], key)
            tuned = median_of(per["taskd_tuned"], key) if "taskd_tuned" in per else None
            for who, rs in per.items():
                v = median_of(rs, key)
                ratio = "" if who == "taskd" or not v else f"{base / v:.2f}×"
                ratio2 = "" if not tuned or who.startswith("taskd") or not v else f"{tuned / v:.2f}×"
                if who == "taskd_tuned_before" and tuned and v:
                    ratio2 = f"{tuned / v:.2f}×"
                out.append(f"| {m} | {systems[who].name} | {fmt(v)} {unit} | {ratio} | {ratio2} |")
        elif m == "latency":
            for who, rs in per.items():
                vals = {k: median_of(rs, k) for k in ("p50", "p90", "p99")}
                ratio = "" if who == "taskd" else \
                    f"p50 {median_of(per['taskd'], 'p50') / vals['p50']:.2f}×"
                out.append(f"| round trip | {systems[who].name} | p50 {vals['p50']:.2f} / p90 "
                           f"{vals['p90']:.2f} / p99 {vals['p99']:.2f} ms | {ratio} | |")
        elif m.startswith("eta"):
            for who, rs in per.items():
                vals = {k: median_of(rs, k) for k in ("p50", "p99", "max", "min", "peak_rss")}
                ratio = "" if who == "taskd" else \
                    f"p99 {median_of(per['taskd'], 'p99') / vals['p99']:.2f}×"
                out.append(f"| {m} countdown=2 lateness | {systems[who].name} | p50 {vals['p50']:.0f} / "
                           f"p99 {vals['p99']:.0f} / max {vals['max']:.0f} ms (min {vals['min']:.0f}); "
                           f"peak RSS {vals['peak_rss']:.0f} MiB | {ratio} | |")
        elif m == "memory":
            base = median_of(per["taskd"], "pss")
            for who, rs in per.items():
                pss, rss = median_of(rs, "pss"), median_of(rs, "rss")
                ratio = "" if who == "taskd" else f"PSS {base / pss:.2f}×"
                out.append(f"| idle worker tree | {systems[who].name} | PSS {pss:.0f} MiB "
                           f"(RSS {rss:.0f} MiB) | {ratio} | |")
    return "\n".join(out) + "\n"


def write(path, table):
    begin, end = "<!-- bench/run.py begin -->", "<!-- bench/run.py end -->"
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{table}{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
