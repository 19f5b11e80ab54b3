"""A Celery app that only speaks remote control, for tests that run Celery's own CLI
(``celery -A celeryctl inspect ping -d NAME``) against taskd workers.

``$TASKD_BROKER_URL`` names the broker; ``$CELERYCTL_EXCHANGE`` the control
name space (Celery's ``control_exchange``), so that a test's commands reach
only its own workers.
"""
import os

from celery import Celery

app = Celery("celeryctl", broker=os.environ.get("TASKD_BROKER_URL",
                                                "amqp://guest:guest@127.0.0.1:5672/%2F"))
app.conf.control_exchange = os.environ.get("CELERYCTL_EXCHANGE", "celery")
app.conf.broker_connection_retry_on_startup = False
