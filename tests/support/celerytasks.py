"""A Celery app for interop tests: broker and result backend from the environment
(``CELERY_TEST_BROKER``, ``CELERY_TEST_BACKEND``)."""
import os

from celery import Celery

app = Celery("celerytasks", broker=os.environ.get("CELERY_TEST_BROKER"),
             backend=os.environ.get("CELERY_TEST_BACKEND"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


@app.task(name="celerytasks.mul")
def mul(x, y):
    return x * y


@app.task(name="celerytasks.boom")
def boom(message):
    raise KeyError(message)
