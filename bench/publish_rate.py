"""Publish rate of one client: taskd (pooled, per-message confirms), taskd (a reused
publisher, pipelined confirms) and Celery 5 (its default: no confirms), side by side.

    .venv/bin/python bench/publish_rate.py [--messages 3000] [--rounds 5]

Rounds are interleaved (taskd pooled, taskd publisher, celery, repeat); the table
gives the median messages/s of each and the ratio to Celery. Every system publishes
the same task (`bench.noop`, no arguments) to its own fresh queue, deleted at the end.
Nothing consumes during the run.
"""
import argparse
import os
import statistics
import sys
import time
import uuid

import pika

BROKER = os.environ.get("TASKD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def taskd_pooled(queue, n):
    from taskd import App
    app = App("bench", broker=BROKER)
    app.send_task("bench.noop", queue=queue, ignore_result=True)    # connect + declare first
    start = time.perf_counter()
    for _ in range(n):
        app.send_task("bench.noop", queue=queue, ignore_result=True)
    elapsed = time.perf_counter() - start
    app.close()
    return n / elapsed


def taskd_publisher(queue, n):
    from taskd import App
    app = App("bench", broker=BROKER)
    with app.get_publisher() as publisher:
        app.send_task("bench.noop", queue=queue, ignore_result=True, publisher=publisher)
        publisher.flush()
        start = time.perf_counter()
        for _ in range(n):
            app.send_task("bench.noop", queue=queue, ignore_result=True, publisher=publisher)
        publisher.flush()              # every confirm received
        elapsed = time.perf_counter() - start
    return n / elapsed


def celery_default(queue, n):
    from celery import Celery
    app = Celery(broker=BROKER.replace("%2F", ""), set_as_current=False)
    app.conf.task_ignore_result = True
    app.send_task("bench.noop", queue=queue)
    start = time.perf_counter()
    for _ in range(n):
        app.send_task("bench.noop", queue=queue)
    elapsed = time.perf_counter() - start
    app.close()
    return n / elapsed


SYSTEMS = [("taskd, pooled connection (confirm per message)", taskd_pooled),
           ("taskd, reused publisher (pipelined confirms)", taskd_publisher),
           ("celery 5, default (no confirms)", celery_default)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    queues = {name: f"bench.publish.{uuid.uuid4().hex[:8]}" for name, _ in SYSTEMS}
    rates = {name: [] for name, _ in SYSTEMS}
    try:
        for r in range(args.rounds):
            for name, fn in SYSTEMS:
                rates[name].append(fn(queues[name], args.messages))
            print(f"round {r + 1}: " + ", ".join(f"{rates[n][-1]:.0f}" for n, _ in SYSTEMS),
                  file=sys.stderr)
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(BROKER))
        ch = conn.channel()
        for q in queues.values():
            ch.queue_delete(q)
            ch.exchange_delete(q)
        conn.close()
    celery = statistics.median(rates[SYSTEMS[-1][0]])
    print(f"\npublish rate, one client, {args.messages} messages x {args.rounds} rounds "
          "(median messages/s; ratio to celery)")
    print("| client | median msg/s | min | max | ratio to celery |")
    print("|---|---|---|---|---|")
    for name, _ in SYSTEMS:
        med = statistics.median(rates[name])
        print(f"| {name} | {med:,.0f} | {min(rates[name]):,.0f} | {max(rates[name]):,.0f} | "
              f"{med / celery:.2f} |")


if __name__ == "__main__":
    main()
