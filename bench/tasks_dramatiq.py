"""The benchmark's tasks for Dramatiq 2, on the same broker."""
import os
import time

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

broker = RabbitmqBroker(url=os.environ.get("BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672/%2F"))
dramatiq.set_broker(broker)
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
_out = None


@dramatiq.actor(queue_name=QUEUE, actor_name="noop")
def noop():
    global _out
    if _out is None:
        _out = os.open(os.environ["BENCH_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_out, b".")


@dramatiq.actor(queue_name=QUEUE, actor_name="late")
def late(due):
    with open(os.environ["BENCH_OUT"], "a") as fh:
        fh.write(f"{time.time() - due:.6f}\n")
