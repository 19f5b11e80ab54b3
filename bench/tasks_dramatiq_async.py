"""bench/async_tasks.py's task for Dramatiq 2 with its AsyncIO middleware."""
import asyncio
import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware.asyncio import AsyncIO

broker = RabbitmqBroker(url=os.environ.get("BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672/%2F"))
broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
_out = None


@dramatiq.actor(queue_name=QUEUE, actor_name="anap")
async def anap(seconds=0.01):
    global _out
    await asyncio.sleep(seconds)
    if _out is None:
        _out = os.open(os.environ["BENCH_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_out, b".")
