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


def test_a_taskd_worker_is_a_peer_too(tmp_path, topo, workers, app_for, broker):
    """taskd's own worker (-E, remote control) feeds the same history and answers the same
    mailbox as the Celery worker of the browser tests: nothing in the dashboard changes."""
    from taskd.dashboard.mailbox import Mailbox
    node = f"dash-{uuid.uuid4().hex[:8]}@test"
    queue = f"taskd.dashboard.test-{uuid.uuid4().hex[:10]}"
    path = topo.config({"dashboard": {"database": f"sqlite:///{tmp_path}/h.sqlite3",
                                      "event_queue": queue}},
                       hostname=node, send_events=True, concurrency=1)
    cfg = config_mod.load(str(path))        # the workers' file, as deployed: same mailbox
    store = Store(cfg["dashboard.database"])
    ingest = Ingest(cfg, store)
    ingest.start()
    try:
        wait_for(ingest.connected.is_set, 20, message="the ingest to consume")
        workers(path).ready()
        result = app_for(path).send_task("ttasks.add", [2, 3])
        assert result.get(timeout=20) == 5
        wait_for(lambda: (store.task(result.id) or {}).get("state") == "SUCCESS", 20,
                 message="the taskd task recorded")
        row = store.task(result.id)
        assert (row["name"], row["result"], row["worker"]) == ("ttasks.add", "5", node)
        wait_for(lambda: any(w["hostname"] == node for w in store.workers()), 20,
                 message="the taskd worker's heartbeat")
        with Mailbox(cfg) as mb:
            stats = mb.call("stats", destination=[node])
        assert node in stats
    finally:
        ingest.stop()
        store.close()
        broker.delete([queue])
