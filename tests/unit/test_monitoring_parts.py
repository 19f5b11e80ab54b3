"""The lifecycle seam and its two observers, events and metrics, against stub parts and
stub channels (no broker, no children): which hook each part calls, what the events
look like on the wire, what the metrics count and serve."""
import asyncio
import collections
import json
import logging
import types
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskd import config as config_mod, protocol
from taskd.worker import events as events_mod, framing, lifecycle, metrics as metrics_mod
from taskd.worker.childstate import exit_cause
from test_worker_parts import deliver, parts


class Recorder(lifecycle.Observer):
    """An observer that writes down every hook called, with its main arguments."""

    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name in lifecycle._HOOKS:
            calls = object.__getattribute__(self, "calls")
            return lambda *a, **kw: calls.append((name, a, kw))
        return object.__getattribute__(self, name)


def outcome(status, body=b"{}", runtime=0.25, error=None, retry=None):
    return framing.Outcome(1, status, body, "application/json", "utf-8", runtime, 0, error,
                           retry)


def encoded(status, value, tb=None):
    return protocol.encode_result("id", status, value, tb)[1]


# == the seam ===================================================================================

def test_nobody_listening_is_one_shared_no_op_and_every_hook_exists_on_it():
    assert lifecycle.combine([]) is lifecycle.NOBODY
    assert lifecycle.combine([None, None]) is lifecycle.NOBODY
    for name in ("received", "started", "succeeded", "failed", "retried", "revoked",
                 "dead_lettered", "child_started", "child_exited", "child_recycled",
                 "connected", "disconnected", "stopping", "close"):
        assert name in lifecycle._HOOKS
    assert lifecycle.NOBODY.received(object()) is None


def test_a_fanout_calls_each_observer_in_order_and_an_observer_that_raises_is_logged(caplog):
    class Broken(lifecycle.Observer):
        def received(self, job):
            raise RuntimeError("bug in an observer")

    first, last = Recorder(), Recorder()
    fan = lifecycle.combine([first, Broken(), last])
    with caplog.at_level(logging.ERROR, "taskd.supervisor"):
        fan.received("job")                     # does not raise into the caller
    assert first.calls == last.calls == [("received", ("job",), {})]
    assert "internal error in the Broken observer (received)" in caplog.text


def test_intake_dispatch_and_outcomes_call_the_hooks_where_things_happen():
    async def main():
        p = parts(asyncio.get_running_loop())
        rec = Recorder()
        p.intake.lifecycle = p.dispatcher.lifecycle = p.outcomes.lifecycle = rec
        deliver(p, 1, protocol.encode_task("id-1", "t.add", [2, 2], {}))
        [job] = p.pool.sent
        p.dispatcher.started(types.SimpleNamespace(pid=42), job)
        p.outcomes.ran(job, outcome(protocol.SUCCESS))
        p.outcomes.ran(job, outcome(protocol.FAILURE, error="ValueError: x"))
        p.outcomes.fail(job, TimeoutError("hard limit"))
        gone = datetime.now(timezone.utc) - timedelta(seconds=1)
        deliver(p, 2, protocol.encode_task("id-2", "t.add", [], {}, expires=gone))
        p.outcomes.fail(job, Exception("revoked by a user"), protocol.REVOKED)
        p.outcomes.dead_letter(job, "NotRegistered: t.add")
        return rec.calls, job

    calls, job = asyncio.run(main())
    assert [c[0] for c in calls] == ["received", "started", "succeeded", "failed", "failed",
                                     "received", "revoked", "revoked", "dead_lettered"]
    assert calls[1][1] == (job, 42)
    assert calls[4][2]["exc"].args == ("hard limit",)           # failed by the worker
    assert calls[6][2] == {"expired": True}                     # expires passed
    assert calls[7][2] == {"expired": False}                    # a revoke


def test_a_bad_message_is_dead_lettered_without_being_received():
    async def main():
        p = parts(asyncio.get_running_loop())
        rec = Recorder()
        p.intake.lifecycle = p.outcomes.lifecycle = rec
        bad = protocol.encode_task("id-2", "t.add", [], {})
        bad.headers["id"] = 5
        deliver(p, 1, bad)
        return rec.calls

    assert [c[0] for c in asyncio.run(main())] == ["dead_lettered"]


def test_why_a_child_left_is_one_word_from_a_short_list():
    child = types.SimpleNamespace(fault=None, state="busy")
    timed_out = types.SimpleNamespace(timed_out=30.0)
    assert exit_cause(child, 9, None, True) == "start_failed"
    assert exit_cause(types.SimpleNamespace(fault="bad frame", state="busy"), 9, None,
                      False) == "broken_stream"
    assert exit_cause(child, 9, timed_out, False) == "time_limit"
    assert exit_cause(types.SimpleNamespace(fault=None, state="retiring"), 0, None,
                      False) == "retired"
    assert exit_cause(child, 9, None, False) == "killed"        # SIGKILL's wait status
    assert exit_cause(child, 256, None, False) == "exited"      # exit(1)


# == events =====================================================================================

class EventChannel:
    is_open = True

    def __init__(self):
        self.published = []

    def basic_publish(self, exchange, routing_key, body, properties):
        self.published.append((exchange, routing_key, json.loads(body), properties))


def events_for(loop, busy=0):
    pool = types.SimpleNamespace(busy=lambda: [object()] * busy)
    ev = events_mod.Events(loop, "taskd@test", pool, collections.Counter())
    ev.channel = EventChannel()
    ev.publisher = types.SimpleNamespace(blocked=False)
    return ev


def a_job(name="t.add", args=(2, 2), **headers):
    msg = protocol.encode_task("id-1", name, list(args), {"k": 1}, **headers)
    request = protocol.decode_task(msg.headers, msg.body, msg.content_type, msg.content_encoding)
    return types.SimpleNamespace(task_id=request.id, request=request, queue="q")


def test_task_events_close_together_go_out_as_one_task_multi_message_with_celerys_fields():
    async def main():
        ev = events_for(asyncio.get_running_loop())
        job = a_job(eta=datetime(2030, 1, 1, tzinfo=timezone.utc))
        ev.received(job)
        ev.started(job, 7)
        ev.succeeded(job, outcome(protocol.SUCCESS, encoded(protocol.SUCCESS, [4, "four"])))
        assert ev.channel.published == []           # not yet: others may join them
        await asyncio.sleep(events_mod.FLUSH_DELAY * 2)
        return ev.channel.published

    [(exchange, key, body, props)] = asyncio.run(main())
    assert (exchange, key) == ("celeryev", "task.multi")
    assert props.content_type == "application/json" and props.delivery_mode == 1
    assert props.headers == {"hostname": "taskd@test"}
    received, started, succeeded = body
    assert [e["type"] for e in body] == ["task-received", "task-started", "task-succeeded"]
    for e in body:
        assert {"type", "hostname", "timestamp", "utcoffset", "pid", "clock", "uuid"} <= set(e)
        assert e["hostname"] == "taskd@test" and e["uuid"] == "id-1"
    assert [e["clock"] for e in body] == [1, 2, 3]
    assert received["name"] == "t.add" and received["args"] == "(2, 2)"
    assert received["kwargs"] == "{'k': 1}" and received["retries"] == 0
    assert received["root_id"] == "id-1" and received["parent_id"] is None
    assert received["eta"] == "2030-01-01T00:00:00+00:00" and received["expires"] is None
    assert succeeded["result"] == "[4, 'four']" and succeeded["runtime"] == 0.25


def test_failed_and_retried_events_carry_the_exception_repr_and_the_traceback():
    async def main():
        ev = events_for(asyncio.get_running_loop())
        job = a_job()
        body = encoded(protocol.FAILURE, ValueError("boom", 3), "Traceback ...\nValueError\n")
        ev.failed(job, outcome(protocol.FAILURE, body, error="ValueError: boom"))
        ev.retried(job, outcome(protocol.RETRY, encoded(protocol.RETRY, KeyError("k"), "tb")))
        ev.failed(job, exc=TimeoutError("hard time limit (5s) exceeded"))
        ev.revoked(job, "expired at ...", expired=True)
        ev.dead_lettered(job, "NotRegistered")
        ev.flush()
        return ev.channel.published[0][2]

    failed, retried, limit, revoked, rejected = asyncio.run(main())
    assert failed["type"] == "task-failed"
    assert failed["exception"] == "ValueError('boom', 3)"
    assert failed["traceback"] == "Traceback ...\nValueError\n"
    assert retried["type"] == "task-retried" and retried["exception"] == "KeyError('k')"
    assert limit["exception"] == "TimeoutError('hard time limit (5s) exceeded')"
    assert (revoked["type"], revoked["expired"], revoked["terminated"], revoked["signum"]) == (
        "task-revoked", True, False, None)
    assert (rejected["type"], rejected["requeue"]) == ("task-rejected", False)


def test_worker_events_go_one_per_message_with_the_heartbeat_fields():
    async def main():
        ev = events_for(asyncio.get_running_loop(), busy=2)
        ev.received(a_job())
        ev.worker("worker-heartbeat")               # flushes the task event first
        return ev.channel.published

    multi, heartbeat = asyncio.run(main())
    assert multi[1] == "task.multi"
    _, key, body, _ = heartbeat
    assert key == "worker.heartbeat" and body["type"] == "worker-heartbeat"
    assert body["freq"] == 2.0 and body["active"] == 2 and body["processed"] == 0
    assert len(body["loadavg"]) == 3
    assert (body["sw_ident"], body["sw_sys"]) == ("taskd", __import__("platform").system())


def test_events_wait_while_the_broker_is_away_and_are_dropped_while_it_blocks():
    async def main():
        ev = events_for(asyncio.get_running_loop())
        channel = ev.channel
        ev.disconnected()
        ev.received(a_job())
        ev.started(a_job(), 1)
        await asyncio.sleep(events_mod.FLUSH_DELAY * 2)
        assert len(ev.pending) == 2 and channel.published == []
        ev.channel, ev.publisher = channel, types.SimpleNamespace(blocked=False)
        ev.flush()                                  # what connected() does, once declared
        assert [e["type"] for e in channel.published[0][2]] == ["task-received",
                                                                "task-started"]
        ev.publisher.blocked = True
        ev.received(a_job())
        ev.flush()
        return ev, channel

    ev, channel = asyncio.run(main())
    assert len(channel.published) == 1 and ev.counters["events_dropped"] == 1


def test_the_node_name_expands_celerys_placeholders():
    assert events_mod.node_name(None, "web1.example.com") == "taskd@web1.example.com"
    assert events_mod.node_name("w%n@%d", "web1.example.com") == "wweb1@example.com"
    assert events_mod.node_name("100%%@%h", "h") == "100%@h"


# == metrics =================================================================================

class Link:
    connected, publisher = True, None


def metrics_for(counters=None, names=frozenset({"t.add"})):
    pool = types.SimpleNamespace(busy=lambda: [1], children={1: 0, 2: 0})
    dispatcher = types.SimpleNamespace(task_names=names, schedule=[1, 2, 3])
    shutdown = types.SimpleNamespace(stopping=False)
    return metrics_mod.Metrics(("127.0.0.1", 0), pool, dispatcher, Link(), shutdown,
                               counters if counters is not None else collections.Counter())


def scrape(m):
    status, ctype, body = m.respond("GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_count_each_outcome_by_task_queue_and_outcome_and_time_runs_and_waits():
    m = metrics_for(collections.Counter(parked=5))
    job = a_job()
    stranger = a_job(name="not.registered.here")
    m.received(job)
    job.received_at -= 2.0                          # it waited two seconds for a child
    m.started(job, 1)
    m.succeeded(job, outcome(protocol.SUCCESS, runtime=0.5))
    m.failed(job, outcome(protocol.FAILURE, runtime=0.1))
    m.failed(job, exc=TimeoutError())               # no runtime
    m.retried(job, outcome(protocol.RETRY, runtime=0.1))
    m.revoked(job, "x", expired=True)
    m.revoked(job, "x")
    m.dead_lettered(stranger, "NotRegistered")
    m.child_exited(None, "killed")
    m.child_exited(None, "retired")                 # not a restart
    m.child_recycled(None, "max_tasks")
    m.connected(None)
    m.connected(None)                               # the second one is a reconnect
    s = scrape(m)

    def total(task, outcome):
        return s[("taskd_tasks_total", (("outcome", outcome), ("queue", "q"), ("task", task)))]
    assert [total("t.add", o) for o in ("succeeded", "failed", "retried", "revoked",
                                        "expired")] == [1, 2, 1, 1, 1]
    assert total("unknown", "dead_lettered") == 1   # names the children do not know collapse
    assert s[("taskd_task_runtime_seconds_count", (("task", "t.add"),))] == 3
    assert s[("taskd_task_runtime_seconds_sum", (("task", "t.add"),))] == pytest.approx(0.7)
    assert s[("taskd_task_queue_wait_seconds_count", (("task", "t.add"),))] == 1
    assert s[("taskd_task_queue_wait_seconds_sum", (("task", "t.add"),))] == pytest.approx(
        2.0, abs=0.5)
    assert s[("taskd_child_restarts_total", (("reason", "killed"),))] == 1
    assert s[("taskd_child_restarts_total", (("reason", "max_tasks"),))] == 1
    assert ("taskd_child_restarts_total", (("reason", "retired"),)) not in s
    assert s[("taskd_broker_reconnects_total", ())] == 1
    assert s[("taskd_tasks_in_progress", ())] == 1 and s[("taskd_children", ())] == 2
    assert s[("taskd_eta_held", ())] == 3 and s[("taskd_eta_parked_total", ())] == 5
    assert s[("taskd_broker_connected", ())] == 1 and s[("taskd_publisher_blocked", ())] == 0


def test_queue_wait_of_an_eta_task_counts_from_its_eta_not_from_its_arrival():
    m = metrics_for()
    job = a_job(eta=datetime.now(timezone.utc) - timedelta(seconds=1))
    m.received(job)
    job.received_at -= 3600                         # arrived an hour ago, due a second ago
    m.started(job, 1)
    wait = scrape(m)[("taskd_task_queue_wait_seconds_sum", (("task", "t.add"),))]
    assert 0.9 < wait < 60


def test_healthz_is_200_only_while_consuming_and_other_requests_are_refused():
    m = metrics_for()
    assert m.respond("GET", "/healthz")[:1] == (200,)
    m.link.connected = False
    assert m.respond("GET", "/healthz") == (503, "text/plain; charset=utf-8",
                                            b"not connected to the broker\n")
    m.link.connected, m.shutdown.stopping = True, True
    assert m.respond("GET", "/healthz")[0] == 503
    assert m.respond("POST", "/metrics")[0] == 405
    assert m.respond("GET", "/nothing")[0] == 404


def test_metrics_listen_is_checked_when_the_configuration_is_loaded():
    ok = config_mod.loads("metrics:\n  listen: '127.0.0.1:9808'\n")
    assert ok["metrics.listen"] == "127.0.0.1:9808"
    assert metrics_mod.parse_listen("[::1]:9808") == ("::1", 9808)
    assert config_mod.loads("")["metrics.listen"] is None
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.loads("metrics:\n  listen: 9808\n")
    assert "metrics.listen" in str(info.value.errors) and "HOST:PORT" in str(info.value.errors)
    with pytest.raises(config_mod.ConfigError):
        config_mod.loads("metrics:\n  listen: 'localhost:99999'\n")
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.loads("worker:\n  send_events: 'yes'\n")
    assert "worker.send_events" in str(info.value.errors)


def test_the_dashboard_and_the_alert_rules_use_only_metrics_the_worker_serves():
    import pathlib
    import re
    import yaml
    root = pathlib.Path(__file__).resolve().parents[2] / "etc" / "monitoring"
    dashboard = json.loads((root / "grafana-dashboard.json").read_text())
    rules = yaml.safe_load((root / "prometheus-rules.yml").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {name for e in exprs for name in re.findall(r"\btaskd_[a-z_]+", e)}
    m = metrics_for()
    m.succeeded(a_job(), outcome(protocol.SUCCESS))
    m.received(job := a_job())
    m.started(job, 1)
    m.child_exited(None, "killed")
    served = {name for name, _ in scrape(m)}
    assert used and used <= served, used - served
    assert {r["alert"] for g in rules["groups"] for r in g["rules"]} >= {
        "TaskdWorkerDown", "TaskdHighFailureRate", "TaskdQueueWaitHigh"}


def test_dash_e_and_dash_n_set_the_worker_settings_and_an_empty_name_is_refused(capsys):
    from taskd import cli
    config = config_mod.loads("worker:\n  hostname: 'from@file'\n")
    args = cli.build_parser().parse_args(["worker", "-E", "-n", "w1@%h"])
    changed = cli._worker_overrides(config, args)
    assert changed["worker.send_events"] is True and changed["worker.hostname"] == "w1@%h"
    assert config["worker.send_events"] is False            # the loaded one is unchanged
    plain = cli.build_parser().parse_args(["worker"])
    assert cli._worker_overrides(config, plain) is config
    with pytest.raises(SystemExit) as info:
        cli._worker_overrides(config, cli.build_parser().parse_args(["worker", "-n", " "]))
    assert info.value.code == cli.EX_USAGE and "-n: expected a node name" in capsys.readouterr().err


def test_task_events_written_as_json_text_round_trip_any_text_and_number():
    async def main():
        ev = events_for(asyncio.get_running_loop())
        job = a_job()
        job.task_id = 'id "quoted" \\ \n \x00 \u00e9 \U0001f600 \ud800'   # a lone surrogate too
        tb = "Traceback\n\t\"x\" \u2028"
        ev.failed(job, exc=ValueError("caf\u00e9", float("nan")))
        ev.retried(job, outcome(protocol.RETRY, encoded(protocol.RETRY, KeyError("k"), tb),
                                runtime=float("inf")))
        ev.succeeded(job, outcome(protocol.SUCCESS, encoded(protocol.SUCCESS, {"\u00e9": 1.5})))
        ev.flush()
        return ev.channel.published[0][2], job.task_id

    (failed, retried, succeeded), task_id = asyncio.run(main())
    assert failed["uuid"] == retried["uuid"] == task_id
    assert failed["exception"] == "ValueError('caf\u00e9', nan)"
    assert retried["traceback"] == "Traceback\n\t\"x\" \u2028"
    assert succeeded["result"] == "{'\u00e9': 1.5}"
    assert events_mod._json(float("inf")) == "null" and events_mod._json(2) == "2"
