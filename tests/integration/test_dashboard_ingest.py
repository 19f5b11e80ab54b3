"""The dashboard's ingest against the real broker: batches recorded, then acked; bad messages logged."""
import json
import time
import uuid

import pika
import pytest

from conftest import BROKER_URL, wait_for
from taskd import config as config_mod
from taskd.dashboard.ingest import Ingest
from taskd.dashboard.store import Store

pytestmark = pytest.mark.broker


def test_ingest_records_a_batch_acks_it_and_logs_what_is_not_an_event(tmp_path, broker, caplog):
    queue = f"taskd.dashboard.test-{uuid.uuid4().hex[:10]}"
    cfg = config_mod.validate({"broker": {"url": BROKER_URL}, "dashboard": {
        "database": f"sqlite:///{tmp_path}/h.sqlite3", "event_queue": queue}}, environ={})
    store = Store(cfg["dashboard.database"])
    ingest = Ingest(cfg, store)
    ingest.start()
    try:
        wait_for(ingest.connected.is_set, 20, message="the ingest to consume")
        task_id, now = str(uuid.uuid4()), time.time()     # within dashboard.retention
        props = pika.BasicProperties(content_type="application/json")
        broker.publish(queue, b"{not json", props)
        broker.publish(queue, json.dumps([    # a task.multi list, as a prefork Celery worker sends
            {"type": "task-received", "uuid": task_id, "name": "x.add", "timestamp": now},
            {"type": "task-succeeded", "uuid": task_id, "result": "3", "timestamp": now + 1}]).encode(),
            props, exchange="")
        wait_for(lambda: (store.task(task_id) or {}).get("state") == "SUCCESS", 20,
                 message="the task recorded")
        assert store.task(task_id)["result"] == "3"
        wait_for(lambda: broker.queue_state(queue) == (0, 1), 10, message="the batch acked")
        assert ingest.rejected == 1
        assert "not a Celery event" in caplog.text and "body is not JSON" in caplog.text
    finally:
        ingest.stop()
        store.close()
        broker.delete([queue])
