"""How fast a crashed child is replaced: SIGKILL an idle child of a running
`taskd worker -c 2` and time until its replacement reports ready (its process title
turns to `taskd: child N idle`), several times; prints the median and the range.

    .venv/bin/python bench/child_restart.py [--rounds 20]
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)],
                         capture_output=True, text=True).stdout
    return {int(line.split()[0]): line.split(None, 1)[1] for line in out.strip().splitlines()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write("imports: [ttasks]\nqueues: [{name: bench.restart}]\n"
              "worker: {concurrency: 2, queues: [bench.restart]}\nlogging: {level: warning}\n")
    cfg.close()
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests", "support"))
    worker = subprocess.Popen([sys.executable, "-m", "taskd", "worker", "--config", cfg.name],
                              env=env, cwd=ROOT)
    times = []
    try:
        deadline = time.monotonic() + 20
        while sum("idle" in t for t in children(worker.pid).values()) < 2:
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.01)
        for _ in range(args.rounds):
            before = children(worker.pid)
            victim = next(iter(before))
            start = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            while True:
                now = children(worker.pid)
                new = [p for p, title in now.items() if p not in before and "idle" in title]
                if new:
                    times.append(time.perf_counter() - start)
                    break
                if time.perf_counter() - start > 10:
                    raise SystemExit("no replacement within 10 s")
                time.sleep(0.001)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        os.unlink(cfg.name)
    ms = [t * 1000 for t in times]
    print(f"child replaced and ready after SIGKILL, {len(ms)} rounds: median {statistics.median(ms):.1f} ms, "
          f"min {min(ms):.1f} ms, max {max(ms):.1f} ms (includes the ps polling, ~2-5 ms)")


if __name__ == "__main__":
    main()
