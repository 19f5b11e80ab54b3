"""Where a taskd round trip (send_task + get) spends its time.

    .venv/bin/python bench/roundtrip_split.py [--n 500]

Prints medians of: the broker's publisher confirm for a persistent and for a
transient message to a durable queue nobody consumes (the floor set by the
broker), then, against a running `taskd worker -c 2`, the time `send_task`
takes to return (it waits for the confirm) and the time `get()` waits after it.
"""
import argparse
import statistics
import time
import uuid

import pika

import run as B


def confirm_floor(n):
    conn = pika.BlockingConnection(pika.URLParameters(B.BROKER))
    ch = conn.channel()
    ch.confirm_delivery()
    queue = f"bench.floor.{uuid.uuid4().hex[:6]}"
    ch.queue_declare(queue, durable=True)
    out = {}
    try:
        for mode, label in ((2, "persistent"), (1, "transient")):
            times = []
            for _ in range(n):
                t = time.perf_counter()
                ch.basic_publish("", queue, b"x" * 200, pika.BasicProperties(delivery_mode=mode))
                times.append((time.perf_counter() - t) * 1e3)
            out[label] = statistics.median(times)
    finally:
        ch.queue_delete(queue)
        conn.close()
    return out


def split(n):
    system = B.Taskd()
    run = B.Run(system).warm()
    try:
        sends, gets = [], []
        for i in range(n + 50):
            t0 = time.perf_counter()
            result = system.app.send_task("bench.noop", queue=run.queue)
            t1 = time.perf_counter()
            result.get(timeout=10)
            t2 = time.perf_counter()
            if i >= 50:                 # warm-up
                sends.append((t1 - t0) * 1e3)
                gets.append((t2 - t1) * 1e3)
        return statistics.median(sends), statistics.median(gets)
    finally:
        run.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    floor = confirm_floor(args.n)
    send, get = split(args.n)
    print(f"broker confirm, nothing consuming: persistent p50 {floor['persistent']:.3f} ms, "
          f"transient p50 {floor['transient']:.3f} ms")
    print(f"taskd round trip: send_task (until confirmed) p50 {send:.3f} ms, "
          f"then get() p50 {get:.3f} ms")


if __name__ == "__main__":
    main()
