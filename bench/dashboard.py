"""The dashboard's history: ingest rate into SQLite, task list and detail latency at 1M rows.

    .venv/bin/python bench/dashboard.py [--events 100000] [--rows 1000000] [--db PATH]

1. **fold + write**: Celery-shaped events (sent, received, started, succeeded per
   task, a heartbeat every 100) folded and written by ``Store.write`` in batches of
   ``ingest.BATCH``, into a fresh SQLite file; five runs, median events/s.
2. **end to end**: the same events published to a unique durable queue, one per
   message (as a solo Celery worker or a client sends them) and 24 per message (the
   ``task.multi`` lists of a prefork Celery worker, its ``buffer_limit``); then
   ``Ingest`` (the dashboard's consumer: batch, commit, ack) drains it into a fresh
   SQLite file; events/s from its start until all are recorded; three runs each.
3. **pages at 1M rows**: a database with ``--rows`` tasks (and one timeline row
   each) is made once (kept at ``--db``); each page is fetched 30 times through
   the real Starlette application (in-process HTTP client), median and p95 ms.
"""
import argparse
import warnings
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BROKER = os.environ.get("TASKD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")

from taskd import config as config_mod  # noqa: E402
from taskd.dashboard import events, ingest  # noqa: E402
from taskd.dashboard.store import Store, seen as seen_table, tasks as tasks_table, timeline  # noqa: E402

NAMES = [f"bench.task{i}" for i in range(20)]


def celery_events(n_events, t0=None):
    t0 = time.time() if t0 is None else t0
    out, i = [], 0
    while len(out) < n_events:
        tid, ts = str(uuid.uuid4()), t0 + i * 0.001
        name = NAMES[i % len(NAMES)]
        out += [{"type": "task-sent", "uuid": tid, "name": name, "args": "(1, 2)", "kwargs": "{}",
                 "queue": "q", "timestamp": ts, "hostname": "client@h", "retries": 0},
                {"type": "task-received", "uuid": tid, "name": name, "args": "(1, 2)",
                 "kwargs": "{}", "timestamp": ts + 0.0001, "hostname": "w1@h", "retries": 0},
                {"type": "task-started", "uuid": tid, "timestamp": ts + 0.0002, "hostname": "w1@h"},
                {"type": "task-succeeded", "uuid": tid, "result": "3", "runtime": 0.0001,
                 "timestamp": ts + 0.0003, "hostname": "w1@h"}]
        if i % 25 == 0:
            out.append({"type": "worker-heartbeat", "hostname": "w1@h", "timestamp": ts,
                        "freq": 2.0, "active": 1, "processed": i, "loadavg": [0.1, 0.2, 0.3]})
        i += 1
    return out[:n_events]


def bench_fold_write(evs, runs=5):
    rates = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(f"sqlite:///{tmp}/h.sqlite3")
            start = time.perf_counter()
            for i in range(0, len(evs), ingest.BATCH):
                store.write(events.fold(evs[i:i + ingest.BATCH]))
            rates.append(len(evs) / (time.perf_counter() - start))
            store.close()
    return rates


def bench_end_to_end(evs, per_message=1):
    import pika
    queue = f"bench.dashboard.{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(BROKER))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True)
    props = pika.BasicProperties(content_type="application/json", delivery_mode=1)
    for i in range(0, len(evs), per_message):
        body = evs[i] if per_message == 1 else evs[i:i + per_message]   # a task.multi list
        ch.basic_publish("", queue, json.dumps(body), props)
    conn.close()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config_mod.validate({"broker": {"url": BROKER}, "dashboard": {
                "database": f"sqlite:///{tmp}/h.sqlite3", "event_queue": queue,
                "event_queue_max_length": 0}}, environ={})
            store = Store(cfg["dashboard.database"])
            consumer = ingest.Ingest(cfg, store)
            start = time.perf_counter()
            consumer.start()
            while consumer.recorded < len(evs):
                time.sleep(0.01)
            elapsed = time.perf_counter() - start
            consumer.stop()
            store.close()
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(BROKER))
        conn.channel().queue_delete(queue)
        conn.close()
    return len(evs) / elapsed


def seed(path, rows):
    store = Store(f"sqlite:///{path}")
    with store.engine.connect() as c:
        have = c.execute(tasks_table.select().with_only_columns(
            tasks_table.c.id).limit(1).offset(rows - 1)).first()
    if have:
        return store
    print(f"seeding {rows} tasks into {path} ...", flush=True)
    t0 = time.time() - rows * 0.5
    rnd = random.Random(7)
    states = ["SUCCESS"] * 90 + ["FAILURE"] * 5 + ["RETRY"] * 3 + ["STARTED"] * 2
    chunk = 20000
    for start in range(0, rows, chunk):
        trows, erows = [], []
        for i in range(start, min(rows, start + chunk)):
            ts = t0 + i * 0.5
            state = rnd.choice(states)
            tid = str(uuid.UUID(int=rnd.getrandbits(128)))
            trows.append({"id": tid, "name": NAMES[i % len(NAMES)], "state": state, "state_at": ts,
                          "updated_at": ts, "args": "(1, 2)", "kwargs": "{}", "worker": "w1@h",
                          "received_at": ts - 0.1, "started_at": ts - 0.05, "runtime": 0.05,
                          "result": "3" if state == "SUCCESS" else None,
                          "exception": "ValueError('x')" if state == "FAILURE" else None,
                          "retries": 0, "queue": "q"})
            erows.append({"task_id": tid, "type": "task-" + state.lower(), "at": ts,
                          "hostname": "w1@h", "retries": 0, "detail": None})
        with store.engine.begin() as c:
            c.execute(tasks_table.insert(), trows)
            c.execute(timeline.insert(), erows)
    with store.engine.begin() as c:
        c.execute(seen_table.insert(), [{"kind": "name", "value": n} for n in NAMES]
                  + [{"kind": "queue", "value": "q"}])        # as the ingest records them
        c.exec_driver_sql("ANALYZE")
    return store


def bench_pages(path, rows, runs=30):
    warnings.filterwarnings("ignore", message=".*httpx.*")
    from starlette.testclient import TestClient
    from taskd.dashboard.security import Guard
    from taskd.dashboard.web import Dashboard
    store = seed(path, rows)
    cfg = config_mod.validate({"dashboard": {"database": f"sqlite:///{path}"}}, environ={})
    client = TestClient(Dashboard(cfg, store, Guard(None, "127.0.0.1")).app, base_url="http://127.0.0.1")
    some = store.search(limit=1)[0]
    deep = store.search(name=NAMES[3], until=some["updated_at"] - rows * 0.25, limit=1)[0]
    page2 = store.search(limit=50)[-1]
    urls = {
        "task list (newest)": "/tasks",
        "task list, page 2 (keyset)": f"/tasks?before={page2['updated_at']!r}:{page2['id']}",
        "by state FAILURE": "/tasks?state=FAILURE",
        "by name": f"/tasks?name={NAMES[3]}",
        "by name prefix": "/tasks?name=bench.task1*",
        "by name + state": f"/tasks?name={NAMES[3]}&state=RETRY",
        "by id prefix": f"/tasks?id={deep['id'][:8]}",
        "by time range": f"/tasks?since={deep['updated_at'] - 3600}&until={deep['updated_at']}",
        "task detail": f"/tasks/{deep['id']}",
        "overview (+ broker round trips)": "/",
    }
    out = {}
    for label, url in urls.items():
        client.get(url)                                    # warm the page cache
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            r = client.get(url)
            times.append((time.perf_counter() - start) * 1000)
            assert r.status_code == 200, (url, r.status_code)
        times.sort()
        out[label] = (statistics.median(times), times[int(len(times) * 0.95) - 1])
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "taskd-bench-dashboard.sqlite3"))
    parser.add_argument("--skip-pages", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    if not args.skip_ingest:
        evs = celery_events(args.events)
        rates = bench_fold_write(evs)
        print(f"fold + write into SQLite: median {statistics.median(rates):,.0f} events/s "
              f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}; {len(evs):,} events)", flush=True)
        for per_message in (1, 24):
            e2e = [bench_end_to_end(evs, per_message) for _ in range(3)]
            print(f"end to end (broker -> Ingest -> SQLite, {per_message} event(s) per message): "
                  f"median {statistics.median(e2e):,.0f} events/s "
                  f"(runs: {', '.join(f'{r:,.0f}' for r in e2e)})", flush=True)
    if not args.skip_pages:
        for label, (median, p95) in bench_pages(args.db, args.rows).items():
            print(f"{label:32s} median {median:7.1f} ms   p95 {p95:7.1f} ms", flush=True)


if __name__ == "__main__":
    main()
