"""A tiny Celery app: the real peer that sends events (-E) and answers the mailbox.

The dashboard tests start ``celery -A dashcelery worker -E`` with ``DASH_QUEUE``
naming a queue of their own, so nothing else consumes it.
"""
import os

from celery import Celery

QUEUE = os.environ.get("DASH_QUEUE", "dash-unset")
app = Celery("dashcelery", broker=os.environ.get("TASKD_BROKER_URL",
                                                  "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_default_queue=QUEUE, task_default_exchange=QUEUE, task_default_routing_key=QUEUE,
    worker_send_task_events=True, task_send_sent_event=True, worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
    task_serializer="json", accept_content=["json"], result_backend=None,
    event_queue_expires=60,
)


@app.task(name="dash.add")
def add(x, y):
    return x + y


@app.task(name="dash.fail")
def fail(message):
    raise ValueError(message)


@app.task(name="dash.parent")
def parent(n):
    """Sends ``n`` children (dash.add), so the history has parent/child links."""
    return [add.delay(i, i).id for i in range(n)]
