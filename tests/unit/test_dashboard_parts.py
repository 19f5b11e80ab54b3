"""The dashboard's pure parts and its store on a real SQLite file."""
import json

import pytest

from taskd import config as config_mod
from taskd.dashboard import charts, events, security
from taskd.dashboard.store import Store

pytest.importorskip("sqlalchemy")


def ev(kind, uuid="t1", ts=100.0, **fields):
    return dict(type=kind, uuid=uuid, timestamp=ts, **fields)


# --- events -----------------------------------------------------------------------

def test_decode_reads_one_event_or_a_task_multi_list():
    one = events.decode(json.dumps(ev("task-started")).encode(), "application/json")
    many = events.decode(json.dumps([ev("task-started"), ev("task-succeeded")]).encode(), None)
    assert [e["type"] for e in one] == ["task-started"]
    assert [e["type"] for e in many] == ["task-started", "task-succeeded"]


@pytest.mark.parametrize("body, ctype, why", [
    (b"{not json", "application/json", "not JSON"),
    (b'{"uuid": "x"}', "application/json", "'type' field"),
    (b"\x80\x03", "application/x-python-serialize", "only application/json"),
])
def test_decode_names_what_is_wrong(body, ctype, why):
    with pytest.raises(events.BadEvent, match=why):
        events.decode(body, ctype)


def test_fold_keeps_the_newest_state_whatever_the_order():
    batch = events.fold([ev("task-succeeded", ts=103, result="5", runtime=0.5, hostname="w1"),
                         ev("task-received", ts=101, name="add", args="(2, 3)", hostname="w1"),
                         ev("task-sent", ts=100, hostname="client", queue="q1")])
    row = batch.tasks["t1"]
    assert (row["state"], row["result"], row["name"], row["worker"]) == ("SUCCESS", "5", "add", "w1")
    assert (row["received_at"], row["succeeded_at"], row["updated_at"]) == (101, 103, 103)
    assert row["queue"] == "q1"
    assert [t["type"] for t in batch.timeline] == ["task-succeeded", "task-received", "task-sent"]
    assert batch.minutes == {1: {"succeeded": 1, "failed": 0, "retried": 0}}


def test_fold_workers_and_cuts_long_text():
    batch = events.fold([
        {"type": "worker-heartbeat", "hostname": "w1", "timestamp": 5.0, "freq": 2.0,
         "active": 1, "processed": 9, "loadavg": [0.5, 0.25, 0.1]},
        ev("task-failed", exception="E(" + "x" * 20000 + ")", traceback="T" * 100),
        {"type": "worker-offline", "hostname": "w2"},
    ], now=7.0)
    assert batch.workers["w1"]["loadavg"] == "0.50 0.25 0.10"
    assert batch.workers["w1"]["processed"] == 9 and batch.workers["w1"]["status"] == "online"
    assert batch.workers["w2"] == {"hostname": "w2", "status": "offline", "last_seen": 7.0}
    assert len(batch.tasks["t1"]["exception"]) == events.TEXT_LIMIT + 1
    assert batch.tasks["t1"]["traceback"] == "T" * 100


def test_fold_drops_fields_of_the_wrong_type_instead_of_failing_the_batch():
    batch = events.fold([ev("task-succeeded", runtime="fast", retries=True, name="n" * 400,
                            result={"a": 1}),
                         {"type": "worker-heartbeat", "hostname": "w", "processed": "many",
                          "active": 2.0, "loadavg": "high"}])
    row = batch.tasks["t1"]
    assert row.get("runtime") is None and row.get("retries") is None
    assert len(row["name"]) == 256 and row["result"] == "{'a': 1}"
    assert "processed" not in batch.workers["w"] and batch.workers["w"]["active"] == 2


# --- store --------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path}/sub/h.sqlite3")     # the directory is created
    yield s
    s.close()


def test_store_merges_batches_and_never_moves_a_task_backwards(store):
    store.write(events.fold([ev("task-succeeded", ts=103, result="5")]))
    store.write(events.fold([ev("task-received", ts=101, name="add", args="(2, 3)")]))
    row = store.task("t1")
    assert (row["state"], row["name"], row["args"], row["result"]) == ("SUCCESS", "add", "(2, 3)", "5")
    assert [a["type"] for a in store.attempts("t1")] == ["task-received", "task-succeeded"]
    store.write(events.fold([ev("task-failed", ts=104)]))
    assert store.task("t1")["state"] == "FAILURE"
    assert store.per_minute(0) == [{"minute": 1, "succeeded": 1, "failed": 1, "retried": 0}]
    store.write(events.fold([ev("task-sent", uuid="t2", queue="q2", name="mul")]))
    assert store.known_queues() == ["q2"]


def test_a_batch_written_twice_changes_no_task_and_adds_no_timeline_row(store):
    batch = events.fold([ev("task-received", ts=101, name="add"), ev("task-succeeded", ts=102)])
    store.write(batch)
    store.write(batch)
    assert store.task("t1")["state"] == "SUCCESS"
    assert [a["type"] for a in store.attempts("t1")] == ["task-received", "task-succeeded"]


def test_store_search_filters_and_pages_by_keyset(store):
    evs = [ev("task-received", uuid=f"id-{i:03d}", ts=1000 + i, name=f"app.t{i % 3}")
           for i in range(120)]
    evs += [ev("task-failed", uuid="id-007", ts=2000)]
    store.write(events.fold(evs))
    first = store.search()
    assert len(first) == 50 and first[0]["id"] == "id-007"      # newest event first
    second = store.search(before=(first[-1]["updated_at"], first[-1]["id"]))
    assert not {r["id"] for r in first} & {r["id"] for r in second}
    assert store.search(state="FAILURE")[0]["id"] == "id-007"
    assert {r["name"] for r in store.search(name="app.t1")} == {"app.t1"}
    assert len(store.search(name="app.*", limit=500)) == 120
    prefixed = store.search(name="app.*")                      # merged from three names
    assert [r["id"] for r in prefixed] == [r["id"] for r in first]
    assert [r["id"] for r in store.search(name="app.*", state="FAILURE")] == ["id-007"]
    assert store.search(name="app.*", before=(1001.0, "id-001")) == [
        r for r in store.search(name="app.*", limit=500) if r["id"] == "id-000"]
    assert [r["id"] for r in store.search(task_id="id-11")] == [f"id-11{i}" for i in range(9, -1, -1)]
    assert len(store.search(since=1100, until=1110)) == 10


def test_store_prunes_by_age_and_by_count(store):
    store.write(events.fold([ev("task-received", uuid=f"t{i}", ts=1000.0 + i) for i in range(2000)]))
    assert store.prune(max_age=10_000, max_tasks=1500, now=3000) == 500
    assert store.task("t499") is None and store.task("t500") is not None
    assert store.attempts("t499") == [] and store.attempts("t500")
    assert store.prune(max_age=1000, max_tasks=1500, now=3500) == 1000   # older than 2500
    assert store.task("t1499") is None and store.task("t1500") is not None


def test_store_measures_wait_from_sent_or_received_to_started(store):
    store.write(events.fold([ev("task-sent", uuid="a", ts=100), ev("task-started", uuid="a", ts=102.5),
                             ev("task-received", uuid="b", ts=200), ev("task-started", uuid="b", ts=201),
                             ev("task-received", uuid="c", ts=300)]))
    assert sorted(store.recent_waits()) == [1.0, 2.5]


def test_store_records_actions(store):
    store.record_action("admin@127.0.0.1", "pool_grow", "w1", "{'ok': 'pool will grow'}")
    (row,) = store.audit_log()
    assert (row["who"], row["action"], row["target"]) == ("admin@127.0.0.1", "pool_grow", "w1")


# --- security -----------------------------------------------------------------------

@pytest.mark.parametrize("host, open_", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                         ("0.0.0.0", False), ("10.1.2.3", False)])
def test_reading_is_open_on_loopback_only(host, open_):
    guard = security.Guard("tok", host)
    assert guard.may_read(guard.session(None)) is open_


@pytest.mark.parametrize("host, allowed", [("127.0.0.1:8080", True), ("localhost:8080", True),
                                            ("[::1]:8080", True), ("127.0.0.1", True),
                                            ("evil.example:8080", False), ("", False)])
def test_on_loopback_only_loopback_host_headers_are_served(host, allowed):
    assert security.Guard(None, "127.0.0.1").host_allowed(host) is allowed
    assert security.Guard("t", "0.0.0.0").host_allowed(host) is True


def test_a_post_needs_origin_csrf_and_a_token_session():
    guard = security.Guard("tok", "127.0.0.1")
    base = "http://127.0.0.1:8080"
    s = guard.session(None)
    assert "Origin" in guard.refuse_post(s, s.csrf, "http://evil.example", None, base)
    assert "Origin" in guard.refuse_post(s, s.csrf, None, None, base)
    assert "Origin" in guard.refuse_post(s, s.csrf, "http://127.0.0.1:9999", None, base)
    assert "log in" in guard.refuse_post(s, s.csrf, "https://127.0.0.1:8080", None, base)
    assert "CSRF" in guard.refuse_post(s, "wrong", base, None, base)
    assert "log in" in guard.refuse_post(s, s.csrf, base, None, base)
    assert guard.refuse_post(s, s.csrf, None, base + "/workers", base, admin=False) is None
    assert guard.login(s, "nope") is None
    admin = guard.login(s, "tok")
    assert admin.sid != s.sid and guard.session(s.sid).sid != s.sid   # old session gone
    assert guard.refuse_post(admin, admin.csrf, base, None, base) is None
    assert "no admin token" in security.Guard(None, "127.0.0.1").refuse_post(
        admin, admin.csrf, base, None, base)


def test_chart_draws_stacked_bars_per_minute():
    svg = charts.per_minute([{"minute": 10, "succeeded": 3, "failed": 1, "retried": 0}], 0)
    assert svg.count("<rect") == 2 and "3 succeeded, 1 failed" in svg


# --- settings -----------------------------------------------------------------------

def test_dashboard_settings_are_checked():
    cfg = config_mod.loads("dashboard: {listen: '0.0.0.0:9000', database: 'postgresql://u@h/db'}")
    assert cfg["dashboard.listen"] == "0.0.0.0:9000"
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.loads("dashboard: {listen: 9000, database: 'mysql://x', max_tasks: 5}")
    text = "\n".join(err.value.errors)
    assert "dashboard.listen" in text and "dashboard.database" in text and "dashboard.max_tasks" in text


# --- command line -------------------------------------------------------------------

def run_cli(argv, capsys):
    from taskd import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    return exit_.value.code, capsys.readouterr().err


def test_cli_names_a_bad_listen_flag(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"dashboard: {{database: 'sqlite:///{tmp_path}/h.sqlite3'}}\n")
    code, err = run_cli(["dashboard", "--config", str(path), "--listen", "nowhere"], capsys)
    assert code == 64 and "--listen: expected HOST:PORT" in err


def test_off_loopback_without_a_token_refuses_to_start(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.delenv("TASKD_DASHBOARD_TOKEN", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(f"dashboard: {{database: 'sqlite:///{tmp_path}/h.sqlite3'}}\n")
    code, err = run_cli(["dashboard", "--config", str(path), "--listen", "0.0.0.0:1"], capsys)
    assert code == 78 and "needs an admin token" in (err + caplog.text)


def test_a_missing_extra_is_named(monkeypatch):
    from taskd import dashboard
    monkeypatch.setattr(dashboard, "EXTRA", dashboard.EXTRA + ("no_such_module_h19",))
    assert "pip install 'taskd-queue[dashboard]'" in dashboard.missing_extra()
    assert "no_such_module_h19" in dashboard.missing_extra()


# --- the periodic page (reads the schedule: entries of taskd's periodic feature) -----

@pytest.mark.filterwarnings("ignore:.*httpx.*")
def test_periodic_page_shows_entries_with_next_and_last_runs(tmp_path):
    from starlette.testclient import TestClient
    from taskd.dashboard.web import Dashboard
    store = Store(f"sqlite:///{tmp_path}/h.sqlite3")
    store.write(events.fold([ev("task-succeeded", uuid="run-1", ts=1e9, name="app.report")]))

    def page(config):
        app = Dashboard(config, store, security.Guard(None, "127.0.0.1")).app
        return TestClient(app, base_url="http://127.0.0.1").get("/periodic").text
    assert "no <code>schedule:</code> entries" in page(config_mod.from_defaults())
    text = page(config_mod.loads("schedule:\n  nightly <report>: {task: app.report, every: 3600}\n"))
    assert "nightly &lt;report&gt;" in text and "every 3600s" in text
    assert text.count(":00:00+00:00") == 3                      # the next three top-of-hours
    assert 'href="/tasks/run-1"' in text                         # its last run, from history
    store.close()


@pytest.mark.filterwarnings("ignore:.*httpx.*")
def test_responses_forbid_framing_and_foreign_scripts_and_rebound_hosts(tmp_path):
    from starlette.testclient import TestClient
    from taskd.dashboard.web import Dashboard
    store = Store(f"sqlite:///{tmp_path}/h.sqlite3")
    app = Dashboard(config_mod.from_defaults(), store, security.Guard(None, "127.0.0.1")).app
    page = TestClient(app, base_url="http://127.0.0.1:8080").get("/audit")
    assert page.status_code == 200
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    rebound = TestClient(app, base_url="http://attacker.example:8080").get("/audit")
    assert rebound.status_code == 421
    store.close()
