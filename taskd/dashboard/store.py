"""Durable task history: SQLAlchemy Core tables on SQLite or PostgreSQL.

One :class:`Store` owns the engine. The ingest thread writes a folded batch of
events (:meth:`Store.write`) in one transaction with upserts; the web pages
read through the query methods. Upserts merge field by field
(``COALESCE(new, old)``) and keep the state of the newest event, so a batch
may hold any mix of events and arrive in any order.

Indexes serve the task list's searches (by state, by name, by time, by id
prefix: a range scan, never ``LIKE``) with keyset paging on
``(updated_at, id)``, which costs the same on page 1 and page 1,000.
SQLite runs in WAL mode so the pages read while the ingest thread writes.
"""
from __future__ import annotations

import os
import time

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from .events import Batch

meta = sa.MetaData()
Text = sa.Text
Float = sa.Float

tasks = sa.Table(
    "taskd_tasks", meta,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("name", sa.String(255)), sa.Column("state", sa.String(16)),
    sa.Column("state_at", Float), sa.Column("updated_at", Float, nullable=False),
    sa.Column("args", Text), sa.Column("kwargs", Text), sa.Column("result", Text),
    sa.Column("exception", Text), sa.Column("traceback", Text),
    sa.Column("worker", sa.String(255)), sa.Column("queue", sa.String(255)),
    sa.Column("sent_at", Float), sa.Column("received_at", Float),
    sa.Column("started_at", Float), sa.Column("succeeded_at", Float),
    sa.Column("failed_at", Float), sa.Column("runtime", Float),
    sa.Column("retries", sa.Integer), sa.Column("parent_id", sa.String(255)),
    sa.Column("root_id", sa.String(255)), sa.Column("eta", Text), sa.Column("expires", Text),
    sa.Index("taskd_tasks_updated", "updated_at", "id"),
    sa.Index("taskd_tasks_name", "name", "updated_at"),
    sa.Index("taskd_tasks_state", "state", "updated_at"),
    sa.Index("taskd_tasks_parent", "parent_id", "updated_at"),
)
timeline = sa.Table(
    "taskd_task_events", meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(255), nullable=False), sa.Column("type", sa.String(32)),
    sa.Column("at", Float, nullable=False), sa.Column("hostname", sa.String(255)),
    sa.Column("retries", sa.Integer), sa.Column("detail", Text),
    # unique: a batch delivered again (a crash between commit and ack) adds no row twice
    sa.Index("taskd_task_events_once", "task_id", "at", "type", unique=True),
    sa.Index("taskd_task_events_at", "at"),
)
workers = sa.Table(
    "taskd_workers", meta,
    sa.Column("hostname", sa.String(255), primary_key=True),
    sa.Column("status", sa.String(16)), sa.Column("last_seen", Float),
    sa.Column("freq", Float), sa.Column("active", sa.BigInteger),
    sa.Column("processed", sa.BigInteger), sa.Column("loadavg", sa.String(64)),
    sa.Column("sw_ident", sa.String(100)), sa.Column("sw_ver", sa.String(100)),
    sa.Column("sw_sys", sa.String(100)),
)
minutes = sa.Table(
    "taskd_minutes", meta,
    sa.Column("minute", sa.Integer, primary_key=True),
    sa.Column("succeeded", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    sa.Column("retried", sa.Integer, nullable=False),
)
seen = sa.Table(           # every task name and queue seen, so no page scans the tasks for them
    "taskd_seen", meta,
    sa.Column("kind", sa.String(16), primary_key=True),     # "name" or "queue"
    sa.Column("value", sa.String(255), primary_key=True),
)
audit = sa.Table(
    "taskd_audit", meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", Float, nullable=False), sa.Column("who", sa.String(255)),
    sa.Column("action", sa.String(64)), sa.Column("target", Text),
    sa.Column("outcome", Text),
)

TASK_COLUMNS = tuple(c.name for c in tasks.columns)
WORKER_COLUMNS = tuple(c.name for c in workers.columns)
PAGE = 50
MAX_PREFIX_NAMES = 200      # a name prefix searches at most this many task names


def engine_for(url: str) -> sa.Engine:
    """An engine for ``sqlite:///PATH`` (directory created, WAL) or ``postgresql://``."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path != ":memory:" and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return sa.create_engine(url, pool_pre_ping=True)


class Store:
    """Task history: write folded event batches, answer the pages' queries, prune."""

    def __init__(self, url: str):
        self.engine = engine_for(url)
        self._insert = (postgresql.insert if self.engine.dialect.name == "postgresql"
                        else sqlite.insert)
        meta.create_all(self.engine)
        for table in meta.sorted_tables:        # indexes added by a newer version
            for index in table.indexes:
                index.create(self.engine, checkfirst=True)

    def close(self) -> None:
        self.engine.dispose()

    # --- writing ---------------------------------------------------------------

    def write(self, batch: Batch) -> None:
        """Write one folded batch in one transaction."""
        with self.engine.begin() as conn:
            if batch.tasks:
                conn.execute(self._task_upsert(),
                             [{c: row.get(c) for c in TASK_COLUMNS} for row in batch.tasks.values()])
                values = sorted({(kind, r[kind]) for r in batch.tasks.values()
                                 for kind in ("name", "queue") if r.get(kind)})
                if values:
                    conn.execute(self._insert(seen).on_conflict_do_nothing(),
                                 [{"kind": k, "value": v} for k, v in values])
            if batch.timeline:
                conn.execute(self._insert(timeline).on_conflict_do_nothing(), batch.timeline)
            if batch.workers:
                conn.execute(self._worker_upsert(),
                             [{c: row.get(c) for c in WORKER_COLUMNS} for row in batch.workers.values()])
            if batch.minutes:
                ins = self._insert(minutes)
                conn.execute(ins.on_conflict_do_update(index_elements=["minute"], set_={
                    k: getattr(minutes.c, k) + getattr(ins.excluded, k)
                    for k in ("succeeded", "failed", "retried")}),
                    [{"minute": m, **counts} for m, counts in batch.minutes.items()])

    def _task_upsert(self):
        ins = self._insert(tasks)
        new, old = ins.excluded, tasks.c
        newer = new.state_at >= sa.func.coalesce(old.state_at, 0.0)
        values = {c: sa.func.coalesce(getattr(new, c), getattr(old, c))
                  for c in TASK_COLUMNS if c not in ("id", "state", "state_at", "updated_at")}
        values["state"] = sa.case((newer, new.state), else_=old.state)
        values["state_at"] = sa.case((newer, new.state_at), else_=old.state_at)
        values["updated_at"] = sa.case((new.updated_at > old.updated_at, new.updated_at),
                                       else_=old.updated_at)
        return ins.on_conflict_do_update(index_elements=["id"], set_=values)

    def _worker_upsert(self):
        ins = self._insert(workers)
        return ins.on_conflict_do_update(index_elements=["hostname"], set_={
            c: sa.func.coalesce(getattr(ins.excluded, c), getattr(workers.c, c))
            for c in WORKER_COLUMNS if c != "hostname"})

    def record_action(self, who: str, action: str, target: str, outcome: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(audit.insert().values(at=time.time(), who=who[:255], action=action,
                                               target=target, outcome=outcome))

    def prune(self, max_age: float, max_tasks: int, now: float | None = None) -> int:
        """Delete history older than ``max_age`` seconds or past ``max_tasks``; returns tasks deleted."""
        now = time.time() if now is None else now
        cutoff = now - max_age
        with self.engine.begin() as conn:
            nth = conn.execute(sa.select(tasks.c.updated_at).order_by(tasks.c.updated_at.desc())
                               .offset(max_tasks).limit(1)).scalar()
            if nth is not None:
                cutoff = max(cutoff, nth + 1e-6)
            deleted = conn.execute(tasks.delete().where(tasks.c.updated_at < cutoff)).rowcount
            conn.execute(timeline.delete().where(timeline.c.at < cutoff))
            conn.execute(minutes.delete().where(minutes.c.minute < int((now - max_age) // 60)))
            conn.execute(workers.delete().where(workers.c.last_seen < now - max_age))
        return deleted

    # --- reading ---------------------------------------------------------------

    def _rows(self, query):
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def search(self, task_id=None, name=None, state=None, since=None, until=None,
               before=None, limit=PAGE):
        """Tasks newest first; ``before`` is the ``(updated_at, id)`` of the last row shown."""
        cols = [tasks.c[c] for c in ("id", "name", "state", "worker", "updated_at", "runtime",
                                     "retries", "received_at", "exception")]
        q = sa.select(*cols)
        if task_id:
            q = q.where(tasks.c.id >= task_id, tasks.c.id < task_id + "\uffff")
        if name and name.endswith("*"):
            return self._search_prefix(q, name[:-1], limit, state, since, until, before)
        if name:
            q = q.where(tasks.c.name == name)
        return self._rows(self._filtered(q, state, since, until, before).limit(limit))

    def _filtered(self, q, state, since, until, before):
        if state:
            q = q.where(tasks.c.state == state)
        if since is not None:
            q = q.where(tasks.c.updated_at >= since)
        if until is not None:
            q = q.where(tasks.c.updated_at < until)
        if before is not None:
            q = q.where(sa.tuple_(tasks.c.updated_at, tasks.c.id) < sa.tuple_(*before))
        return q.order_by(tasks.c.updated_at.desc(), tasks.c.id.desc())

    def _search_prefix(self, q, prefix, limit, state, since, until, before):
        """A name prefix: the newest ``limit`` of each matching name (each an index range
        read in order), merged. A range over names would sort every matching row."""
        with self.engine.connect() as conn:
            matching = conn.execute(sa.select(seen.c.value).where(
                seen.c.kind == "name", seen.c.value >= prefix, seen.c.value < prefix + "\uffff")
                .order_by(seen.c.value).limit(MAX_PREFIX_NAMES)).scalars().all()
            rows = []
            for name in matching:
                one = self._filtered(q.where(tasks.c.name == name), state, since, until, before)
                rows += [dict(r._mapping) for r in conn.execute(one.limit(limit))]
        rows.sort(key=lambda r: (r["updated_at"], r["id"]), reverse=True)
        return rows[:limit]

    def task(self, task_id):
        rows = self._rows(sa.select(tasks).where(tasks.c.id == task_id))
        return rows[0] if rows else None

    def attempts(self, task_id):
        return self._rows(sa.select(timeline).where(timeline.c.task_id == task_id)
                          .order_by(timeline.c.at, timeline.c.seq))

    def children(self, task_id, limit=200):
        return self._rows(sa.select(tasks.c.id, tasks.c.name, tasks.c.state)
                          .where(tasks.c.parent_id == task_id)
                          .order_by(tasks.c.updated_at).limit(limit))

    def recent_waits(self, limit=1000):
        """Seconds from sent (else received) to started, of the newest ``limit`` tasks."""
        since = sa.func.coalesce(tasks.c.sent_at, tasks.c.received_at)
        newest = (sa.select((tasks.c.started_at - since).label("wait"))
                  .order_by(tasks.c.updated_at.desc()).limit(limit).subquery())
        return [r["wait"] for r in self._rows(sa.select(newest.c.wait)
                                              .where(newest.c.wait.is_not(None)))]

    def workers(self):
        return self._rows(sa.select(workers).order_by(workers.c.hostname))

    def per_minute(self, since_minute: int):
        return self._rows(sa.select(minutes).where(minutes.c.minute >= since_minute)
                          .order_by(minutes.c.minute))

    def known_queues(self, limit=200):
        return [r["value"] for r in self._rows(sa.select(seen.c.value).where(
            seen.c.kind == "queue").order_by(seen.c.value).limit(limit))]

    def audit_log(self, limit=200):
        return self._rows(sa.select(audit).order_by(audit.c.seq.desc()).limit(limit))
