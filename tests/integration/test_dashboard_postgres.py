"""The dashboard's store on the real PostgreSQL (``postgresql://`` in dashboard.database).

Each test makes a database of its own (uuid-named) and drops it. Skipped, saying
why, when no PostgreSQL answers at $TASKD_TEST_POSTGRES (default
postgresql://postgres@127.0.0.1:5432/test).
"""
import os
import uuid

import pytest

from taskd.dashboard import events

psycopg = pytest.importorskip("psycopg")
ADMIN_URL = os.environ.get("TASKD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url():
    name = f"taskd_dash_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {ADMIN_URL}: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.close()


def ev(kind, uuid_="t1", ts=100.0, **fields):
    return dict(type=kind, uuid=uuid_, timestamp=ts, **fields)


def test_history_on_postgresql(pg_url):
    from taskd.dashboard.store import Store
    store = Store(pg_url)
    try:
        store.write(events.fold([ev("task-succeeded", ts=103, result="5"),
                                 {"type": "worker-heartbeat", "hostname": "w1", "timestamp": 103.0}]))
        store.write(events.fold([ev("task-received", ts=101, name="add", args="(2, 3)"),
                                 ev("task-succeeded", uuid_="t2", ts=104)]))
        row = store.task("t1")
        assert (row["state"], row["name"], row["result"]) == ("SUCCESS", "add", "5")
        assert [r["id"] for r in store.search(name="add")] == ["t1"]
        assert [r["id"] for r in store.search(before=(104.0, "t2"))] == ["t1"]
        assert store.per_minute(0) == [{"minute": 1, "succeeded": 2, "failed": 0, "retried": 0}]
        assert store.workers()[0]["hostname"] == "w1"
        assert store.prune(max_age=10, max_tasks=1000, now=113.5) == 1     # t1 (103) goes
        assert store.task("t1") is None and store.task("t2") is not None
    finally:
        store.close()
