"""Many tasks scheduled a day ahead: the worker parks them in the broker and its
memory stays flat.

    .venv/bin/python bench/eta_parked.py [--tasks 200000]

Publishes N tasks with eta = now + 1 day through one pipelined publisher while a
`taskd worker -c 2` consumes the queue; samples the RSS of the worker tree (supervisor
+ children, psutil) every 0.5 s until every task is parked; prints the RSS at start,
peak and end, the parking rate, and how many messages sit in the delay queues. The
queue and delay topology use a unique prefix and are deleted at the end.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta

import pika
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKER = os.environ.get("TASKD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def tree_rss(pid):
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children()])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200000)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from taskd import App
    from taskd.worker.parking import BUCKETS
    prefix = f"bench.eta.{uuid.uuid4().hex[:6]}"
    queue, delay = f"{prefix}.q", f"{prefix}.delay"
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write(f"broker: {{url: '{BROKER}'}}\nimports: [ttasks]\nqueues: [{{name: {queue}}}]\n"
              f"worker: {{concurrency: 2, queues: [{queue}], delay_queue_prefix: {delay}}}\n"
              "logging: {level: warning}\n")
    cfg.close()
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests", "support"))
    worker = subprocess.Popen([sys.executable, "-m", "taskd", "worker", "--config", cfg.name],
                              env=env, cwd=ROOT)
    conn = pika.BlockingConnection(pika.URLParameters(BROKER))
    ch = conn.channel()
    try:
        time.sleep(2)
        rss_start = tree_rss(worker.pid)
        samples = [rss_start]
        app = App("bench", broker=BROKER)
        tomorrow = datetime.now() + timedelta(days=1)
        start = time.perf_counter()
        with app.get_publisher() as publisher:
            for i in range(args.tasks):
                app.send_task("ttasks.add", [i, i], queue=queue, eta=tomorrow,
                              ignore_result=True, publisher=publisher)
                if i % 5000 == 0:
                    samples.append(tree_rss(worker.pid))
        published = time.perf_counter() - start
        bucket = f"{delay}.{65536}s"
        while True:
            samples.append(tree_rss(worker.pid))
            parked = ch.queue_declare(bucket, passive=True).method.message_count
            waiting = ch.queue_declare(queue, passive=True).method.message_count
            if parked >= args.tasks and waiting == 0:
                break
            if time.perf_counter() - start > 3600:
                raise SystemExit("not all parked within an hour")
            time.sleep(0.5)
        elapsed = time.perf_counter() - start
        rss_end = tree_rss(worker.pid)
        mib = 1 << 20
        print(f"{args.tasks} tasks with eta = now + 1 day: published in {published:.1f}s, "
              f"all parked after {elapsed:.1f}s ({args.tasks / elapsed:,.0f} tasks/s); "
              f"worker tree RSS start {rss_start / mib:.1f} MiB, peak {max(samples) / mib:.1f} MiB, "
              f"end {rss_end / mib:.1f} MiB; {parked} messages in {bucket}")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        ch.queue_delete(queue)
        ch.exchange_delete(queue)
        for b in BUCKETS:
            ch.queue_delete(f"{delay}.{b}s")
            ch.exchange_delete(f"{delay}.{b}s")
        conn.close()
        os.unlink(cfg.name)


if __name__ == "__main__":
    main()
