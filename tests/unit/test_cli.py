"""The command line: clear one-line errors and sysexits-style exit codes."""
import socket
import subprocess
import sys
import threading

from conftest import PYTHONPATH, ROOT

TASKD = [sys.executable, "-m", "taskd"]


def run(*args, timeout=30, env=None):
    import os
    e = dict(os.environ, PYTHONPATH=PYTHONPATH)
    e.pop("TASKD_CONFIG", None)
    e.update(env or {})
    return subprocess.run([*TASKD, *args], capture_output=True, text=True, timeout=timeout,
                          env=e, cwd=ROOT)


def test_check_config_ok_on_the_sample():
    out = run("check-config", "--config", str(ROOT / "etc" / "taskd.yaml"))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout and "guest:***@" in out.stdout   # password masked


def test_bad_config_exits_78_with_every_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("worker:\n  concurrency: -1\nnonsense: true\n")
    for command in ("check-config", "worker"):
        out = run(command, "--config", str(bad))
        assert out.returncode == 78
        assert "worker.concurrency (line 2)" in out.stderr
        assert "nonsense (line 3): unknown setting" in out.stderr
        assert "Traceback" not in out.stderr


def test_bad_flag_exits_64():
    out = run("worker", "-c", "zero")
    assert out.returncode == 64
    assert "expected a whole number" in out.stderr


def test_unreachable_broker_exits_69_with_one_line(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                                  # nothing listens there now
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"broker: {{url: 'amqp://guest:secret@127.0.0.1:{port}/', connect_timeout: 2, "
                   "retry_for: 1}\n"
                   "imports: [ttasks]\nworker: {concurrency: 1}\n")
    out = run("worker", "--config", str(cfg))
    assert out.returncode == 69
    assert f"cannot connect to the broker at 127.0.0.1:{port}" in out.stderr
    assert "gave up after 1s (broker.retry_for)" in out.stderr
    assert "Traceback" not in out.stderr and "secret" not in out.stderr
    assert "pika" not in out.stderr       # taskd's own lines only, not pika's per attempt


def test_silent_broker_times_out_within_connect_timeout(tmp_path):
    # A port that accepts TCP but never speaks AMQP.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"broker: {{url: 'amqp://guest:guest@127.0.0.1:{port}/', connect_timeout: 1, "
                   "retry_for: 0.5}\n"
                   "imports: [ttasks]\nworker: {concurrency: 1}\n")
    out = run("worker", "--config", str(cfg), timeout=20)
    server.close()
    assert out.returncode == 69
    assert f"127.0.0.1:{port}" in out.stderr and "no AMQP handshake within 1s" in out.stderr


def test_help_documents_signals_and_exit_codes():
    out = run("worker", "--help")
    assert out.returncode == 0
    for word in ("TERM", "HUP", "QUIT", "TTIN", "USR1", "78 configuration error"):
        assert word in out.stdout


def test_waiting_for_the_broker_status_answers_and_sigterm_stops_at_once(tmp_path):
    import os
    import signal
    import time
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cfg = tmp_path / "c.yaml"
    control = tmp_path / "control.sock"
    cfg.write_text(f"broker: {{url: 'amqp://guest:guest@127.0.0.1:{port}/', retry_for: 120, "
                   "retry_max_interval: 30}\nimports: [ttasks]\n"
                   f"worker: {{concurrency: 1, control_socket: '{control}'}}\n")
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([*TASKD, "worker", "--config", str(cfg)], stderr=out,
                                env=dict(os.environ, PYTHONPATH=PYTHONPATH), cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while log.read_text().count("cannot connect") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "waiting for the broker" in log.read_text()
        status = run("status", "--socket", str(control), "--json")   # answers meanwhile
        assert status.returncode == 0, status.stderr
        assert '"connected": false' in status.stdout
        time.sleep(1.5)                 # well into a back-off pause
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - sent < 2.0    # not at the end of the pause or of retry_for
        assert "stopped (exit code 0)" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
