"""Operations: signals, reload, status, sd_notify and the systemd units, with real
processes and real signals."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pika
import pytest
import yaml

from conftest import BROKER_URL, PYTHONPATH, ROOT, wait_for


def runs(path):
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines()]


def taskd(*args, timeout=30):
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    return subprocess.run([sys.executable, "-m", "taskd", *args], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=timeout)


def test_sighup_during_a_stream_adds_a_queue_and_replaces_every_child(topo, workers, app_for,
                                                                       tmp_path):
    sock = tmp_path / "ctl.sock"
    path = topo.config({"queues": [{"name": "celery"}, {"name": "extra"}]},
                       queues=["celery"], control_socket=str(sock))
    w = workers(path).ready()
    before = set(wait_for(lambda: len(w.children()) == 2 and w.children(), message="children"))
    app = app_for(path)
    out = tmp_path / "runs.txt"
    n = 1000
    for i in range(n // 2):
        app.send_task("ttasks.record", [str(out), f"a{i}", 0.001], ignore_result=True)
    wait_for(lambda: len(runs(out)) >= 100, message="the stream under way")
    # change the config: consume the extra queue too
    data = yaml.safe_load(path.read_text())
    data["worker"]["queues"].append(topo.name("extra"))
    path.write_text(yaml.safe_dump(data))
    w.signal(signal.SIGHUP)
    for i in range(n // 2, n):
        app.send_task("ttasks.record", [str(out), f"a{i}", 0.001], ignore_result=True)
    extra = app.send_task("ttasks.record", [str(out), "extra"], queue=topo.name("extra"))
    assert extra.get(timeout=30) == "extra"              # the new queue is consumed
    wait_for(lambda: len(runs(out)) >= n + 1, timeout=60, message="every task done")
    tokens = [r[0] for r in runs(out)]
    assert sorted(tokens) == sorted([f"a{i}" for i in range(n)] + ["extra"])   # exactly once
    assert {r[1] for r in runs(out)} == {str(w.pid)}      # the supervisor PID never changed
    after = set(wait_for(lambda: (c := w.children()) and len(c) == 2 and not (set(c) & before)
                         and c, timeout=30, message="all children replaced"))
    assert not (after & before)
    state = json.loads(taskd("status", "--socket", str(sock), "--json").stdout)
    assert state["last_reload"]["ok"] is True and topo.name("extra") in state["queues"]


def test_sighup_with_a_broken_config_keeps_the_old_one(topo, workers, app_for, tmp_path):
    sock = tmp_path / "ctl.sock"
    path = topo.config(control_socket=str(sock))
    w = workers(path).ready()
    app = app_for(path)
    good = path.read_text()
    path.write_text(good + "worker_typo: {concurrency: 3}\n")
    w.signal(signal.SIGHUP)
    w.wait_log("configuration not reloaded")
    assert "worker_typo (line" in w.log and "unknown setting" in w.log
    assert app.send_task("ttasks.add", [2, 2]).get(timeout=10) == 4    # still serving
    out = taskd("status", "--socket", str(sock))
    assert out.returncode == 0, out.stderr
    assert "reload:" in out.stdout and "FAILED: worker_typo" in out.stdout


def test_sighup_with_a_task_module_that_does_not_import_keeps_the_old_children(
        topo, workers, app_for, tmp_path):
    sock = tmp_path / "ctl.sock"
    path = topo.config(concurrency=2, control_socket=str(sock))
    w = workers(path).ready()
    app = app_for(path)
    assert app.send_task("ttasks.add", [1, 1]).get(timeout=10) == 2
    old_children = sorted(w.children())
    data = yaml.safe_load(path.read_text())
    data["imports"] = ["ttasks", "no_such_module_xyz"]
    path.write_text(yaml.safe_dump(data))
    w.signal(signal.SIGHUP)
    w.wait_log("reloaded")                      # the reload is over, whatever its outcome
    assert app.send_task("ttasks.add", [2, 2]).get(timeout=10) == 4    # still serving
    assert "No module named 'no_such_module_xyz'" in w.log
    assert "configuration not reloaded" in w.log
    wait_for(lambda: sorted(w.children()) == old_children, message="the old children only")
    state = json.loads(taskd("status", "--socket", str(sock), "--json").stdout)
    assert state["last_reload"]["ok"] is False
    assert "no_such_module_xyz" in state["last_reload"]["errors"][0]
    assert sorted(c["pid"] for c in state["children"]) == old_children


def test_sighup_with_a_declaration_the_broker_refuses_keeps_consuming(topo, workers, app_for,
                                                                     tmp_path, broker):
    sock = tmp_path / "ctl.sock"
    path = topo.config(control_socket=str(sock))
    w = workers(path).ready()
    app = app_for(path)
    clash = topo.name("clash")
    topo.queues.add(clash)
    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    conn.channel().queue_declare(clash, durable=True, arguments={"x-max-priority": 5})
    conn.close()
    running = app.send_task("ttasks.sleep", [1.5, str(tmp_path / "log.txt"), "long"])
    wait_for(lambda: (tmp_path / "log.txt").exists(), message="the long task started")
    data = yaml.safe_load(path.read_text())
    data["queues"].append({"name": clash, "max_priority": 9})       # the broker has 5
    data["worker"]["queues"] = [q["name"] for q in data["queues"]]
    path.write_text(yaml.safe_dump(data))
    w.signal(signal.SIGHUP)
    w.wait_log("configuration not reloaded")
    assert "PRECONDITION_FAILED" in w.log or "x-max-priority" in w.log, w.log
    assert running.get(timeout=10) is not None          # the running task was not cut
    assert app.send_task("ttasks.add", [2, 2]).get(timeout=10) == 4    # still consuming
    assert "lost the broker" not in w.log
    assert [r[0] for r in runs(tmp_path / "log.txt")].count("start") == 1   # ran once
    state = json.loads(taskd("status", "--socket", str(sock), "--json").stdout)
    assert state["last_reload"]["ok"] is False and clash not in state["queues"]


def test_sighup_with_an_unknown_serializer_keeps_the_old_config(topo, workers, app_for):
    path = topo.config()
    w = workers(path).ready()
    app = app_for(path)
    data = yaml.safe_load(path.read_text())
    data["accept_content"] = ["json", "nosuch"]
    path.write_text(yaml.safe_dump(data))
    w.signal(signal.SIGHUP)
    w.wait_log("configuration not reloaded")
    assert "no serializer named 'nosuch'" in w.log
    assert app.send_task("ttasks.add", [1, 2]).get(timeout=10) == 3


def test_sigterm_lets_running_tasks_finish_and_gives_the_rest_back(topo, workers, app_for,
                                                                    tmp_path, broker):
    path = topo.config(concurrency=2, prefetch_multiplier=4)
    w = workers(path).ready()
    app = app_for(path)
    log = tmp_path / "log.txt"
    for i in range(10):
        app.send_task("ttasks.sleep", [1.0, str(log), f"s{i}"], ignore_result=True)
    wait_for(lambda: sum(1 for r in runs(log) if r[0] == "start") == 2, message="2 running")
    w.signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0
    started = [r[1] for r in runs(log) if r[0] == "start"]
    ended = [r[1] for r in runs(log) if r[0] == "end"]
    assert sorted(started) == sorted(ended) and len(ended) == 2      # finished, not cut
    assert broker.queue_state(topo.name("celery"))[0] == 8           # the rest back in the queue


def test_sigterm_past_shutdown_timeout_cuts_and_exits_1(topo, workers, app_for, tmp_path, broker):
    path = topo.config(concurrency=1, shutdown_timeout=1)
    w = workers(path).ready()
    app = app_for(path)
    log = tmp_path / "log.txt"
    app.send_task("ttasks.sleep", [30, str(log), "long"], ignore_result=True)
    wait_for(lambda: runs(log), message="the task to start")
    w.signal(signal.SIGTERM)
    assert w.proc.wait(30) == 1
    assert "shutdown_timeout reached" in w.log and "ttasks.sleep" in w.log
    assert broker.queue_state(topo.name("celery"))[0] == 1           # redelivered, not lost
    # the one left is the confirmed copy: the original was acked, not requeued
    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    method, props, _ = conn.channel().basic_get(topo.name("celery"), auto_ack=False)
    conn.close()
    assert "x-taskd-copy" in props.headers and not method.redelivered, props.headers


def test_sigquit_is_a_cold_shutdown(topo, workers, app_for, tmp_path, broker):
    path = topo.config(concurrency=1)
    w = workers(path).ready()
    app = app_for(path)
    log = tmp_path / "log.txt"
    app.send_task("ttasks.sleep", [30, str(log), "long"], ignore_result=True)
    wait_for(lambda: runs(log), message="the task to start")
    children = w.children()
    started = time.monotonic()
    w.signal(signal.SIGQUIT)
    assert w.proc.wait(20) == 1             # a task was cut: not a clean stop
    assert time.monotonic() - started < 10
    assert "cold shutdown" in w.log and "ttasks.sleep" in w.log
    for pid in children:
        assert subprocess.run(["ps", "-p", str(pid)], capture_output=True).returncode != 0
    wait_for(lambda: broker.queue_state(topo.name("celery"))[0] == 1, message="task requeued")


def test_sigquit_with_nothing_running_exits_0(topo, workers):
    w = workers(topo.config(concurrency=1)).ready()
    w.signal(signal.SIGQUIT)
    assert w.proc.wait(20) == 0


def test_ttin_and_ttou_change_the_number_of_children(topo, workers):
    w = workers(topo.config(concurrency=2)).ready()
    wait_for(lambda: len(w.children()) == 2, message="2 children")
    w.signal(signal.SIGTTIN)
    wait_for(lambda: len(w.children()) == 3, message="3 children")
    # one signal at a time: the kernel merges identical signals still pending
    w.signal(signal.SIGTTOU)
    wait_for(lambda: len(w.children()) == 2, message="2 children")
    w.signal(signal.SIGTTOU)
    wait_for(lambda: len(w.children()) == 1, message="1 child")
    w.signal(signal.SIGTTOU)                        # never below one
    w.wait_log("already at one child")
    assert len(w.children()) == 1


def test_sigusr1_logs_a_state_dump(topo, workers):
    w = workers(topo.config()).ready()
    wait_for(lambda: len(w.children()) == 2, message="children")
    w.signal(signal.SIGUSR1)
    w.wait_log("counters=")
    assert "child 1 pid=" in w.log and "child 2 pid=" in w.log


def test_status_text_and_json(topo, workers, app_for, tmp_path):
    sock = tmp_path / "ctl.sock"
    path = topo.config(control_socket=str(sock))
    w = workers(path).ready()
    app = app_for(path)
    assert app.send_task("ttasks.add", [1, 1]).get(timeout=10) == 2
    app.send_task("ttasks.add", [1, 1], countdown=60, ignore_result=True)
    wait_for(lambda: json.loads(taskd("status", "--socket", str(sock), "--json").stdout)["held"] == 1,
             message="one held task")
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    state = json.loads(taskd("status", "--socket", str(sock), "--json").stdout)
    assert state["pid"] == w.pid and state["connected"] is True
    assert state["hostname"] == topo.node
    assert state["counters"]["succeeded"] == 1 and len(state["children"]) == 2
    assert state["queues"] == [topo.name("celery")] and state["config"] == str(path)
    text = taskd("status", "--config", str(path)).stdout
    assert f"pid:        {w.pid}" in text and "1 held (ETA)" in text and "succeeded 1" in text
    assert f"node:       {topo.node}" in text
    missing = taskd("status", "--socket", str(tmp_path / "nope.sock"))
    assert missing.returncode == 69 and "no worker answers" in missing.stderr


def test_sd_notify_messages_arrive_in_order(topo, workers, tmp_path):
    addr = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(addr)
    server.settimeout(20)
    path = topo.config()
    w = workers(path, env={"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "2000000"})
    messages = []

    def receive_until(key, count=1):
        while sum(m.startswith(key) for m in messages) < count:
            messages.append(server.recv(4096).decode())
    receive_until("READY=1")
    receive_until("WATCHDOG=1")
    w.signal(signal.SIGHUP)
    receive_until("RELOADING=1")
    receive_until("READY=1", count=2)                  # the reload is done
    w.signal(signal.SIGTERM)
    receive_until("STOPPING=1")
    server.close()
    kinds = [m.split("\n")[0].split("=")[0] for m in messages]
    order = [k for k in kinds if k in ("READY", "RELOADING", "STOPPING")]
    assert order[:4] == ["READY", "RELOADING", "READY", "STOPPING"], messages
    reloading = next(m for m in messages if m.startswith("RELOADING=1"))
    assert "MONOTONIC_USEC=" in reloading
    assert any(m.startswith("STATUS=") and "busy" in m for m in messages)


def test_ready_is_sent_only_once_the_children_have_imported_the_tasks(topo, workers, tmp_path):
    addr = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(addr)
    server.settimeout(20)
    path = topo.config({"imports": ["ttasks", "slowimport"]})
    w = workers(path, env={"NOTIFY_SOCKET": addr, "TASKD_TEST_IMPORT_DELAY": "2"})
    while not server.recv(4096).decode().startswith("READY=1"):
        pass
    titles = subprocess.run(["ps", "-o", "args=", "--ppid", str(w.pid)], capture_output=True,
                            text=True).stdout.splitlines()
    server.close()
    assert "consuming" in w.log                     # connected first, then ready
    # READY=1 follows the first child that has imported the tasks (its siblings, which
    # import in parallel, may still be at it): with a 2 s import, a READY sent before
    # the imports would find no child idle.
    assert any(t.endswith(" idle") for t in titles), titles


UNITS = ["taskd.service", "taskd@.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_accepts_the_units(unit, tmp_path):
    # verify checks that ExecStart's binary exists: point it at this checkout's taskd
    taskd_bin = shutil.which("taskd") or str(ROOT / ".venv" / "bin" / "taskd")
    text = (ROOT / "systemd" / unit).read_text().replace("/opt/taskd/bin/taskd", taskd_bin)
    (tmp_path / unit).write_text(text)
    target = tmp_path / unit
    if unit.endswith("@.service"):
        target = tmp_path / "taskd@video.service"
        target.symlink_to(tmp_path / unit)
    out = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "taskd" not in out.stderr, out.stderr   # no warning about our unit
    # and the check can fail: a unit with a typo is refused
    (tmp_path / "broken.service").write_text(text.replace("KillMode=mixed", "KillMode=mixd")
                                             .replace("Type=notify", "Type=notfy"))
    bad = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "broken.service")],
                         capture_output=True, text=True, timeout=60)
    assert "Failed to parse" in bad.stderr or bad.returncode != 0


@pytest.mark.parametrize("name", UNITS)
def test_units_keep_warm_shutdown_and_config_errors_final(name):
    from taskd.config import SETTINGS
    unit = (ROOT / "systemd" / name).read_text()
    sample = yaml.safe_load((ROOT / "etc" / "taskd.yaml").read_text())
    assert "KillMode=mixed" in unit and "Type=notify" in unit
    assert "RestartPreventExitStatus=78" in unit and "Restart=on-failure" in unit
    # a failing ExecStartPre is restarted despite RestartPreventExitStatus (main process only)
    assert "\nExecStartPre=" not in unit

    def seconds(key):
        return int(next(line.split("=")[1] for line in unit.splitlines()
                        if line.startswith(key + "=")))
    assert seconds("TimeoutStopSec") > sample["worker"]["shutdown_timeout"]
    retry_for = next(s.default for s in SETTINGS if s.key == "broker.retry_for")
    assert seconds("TimeoutStartSec") > retry_for     # READY=1 waits for the broker
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_taskd_call_sends_by_name_and_prints_the_result(topo, workers):
    path = topo.config()
    workers(path).ready()
    ok = taskd("call", "ttasks.add", "[2, 3]", "--config", str(path))
    assert ok.returncode == 0 and ok.stdout.strip() == "5", ok.stderr
    failed = taskd("call", "ttasks.fail", '["nope"]', "--config", str(path))
    assert failed.returncode == 1 and "FAILURE: ValueError: nope" in failed.stderr
    bad = taskd("call", "ttasks.add", "[2, ", "--config", str(path))
    assert bad.returncode == 64 and "not valid JSON" in bad.stderr
    queued = taskd("call", "ttasks.add", "[1, 1]", "--no-wait", "--config", str(path))
    assert queued.returncode == 0 and len(queued.stdout.strip()) == 36      # the task id
