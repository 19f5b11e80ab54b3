"""``taskd check-config`` connects to every node of broker.url and reports each (issue 18)."""
import os
import socket
import subprocess

from conftest import BROKER_URL, PYTHONPATH, ROOT, TASKD


def run(*args):
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    env.pop("TASKD_CONFIG", None)
    env.pop("TASKD_BROKER_URL", None)
    return subprocess.run([*TASKD, *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=ROOT)


def refused_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]        # nothing listens there once closed


def write(tmp_path, urls):
    path = tmp_path / "taskd.yaml"
    path.write_text("broker:\n  connect_timeout: 2\n  url:\n"
                    + "".join(f"    - '{u}'\n" for u in urls))
    return path


def test_each_node_is_reported_and_one_that_answers_is_enough(tmp_path):
    port = refused_port()
    out = run("check-config", "--config",
              str(write(tmp_path, [BROKER_URL, f"amqp://guest:s3cret@127.0.0.1:{port}/"])))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    [ok] = [line for line in lines if ":5672  ok: RabbitMQ " in line]
    assert "plain AMQP, not encrypted" in ok
    assert any(f"127.0.0.1:{port}  FAILED: cannot connect to the broker at 127.0.0.1:{port}: "
               "Connection refused" in line for line in lines)
    assert "failover:  round-robin; taskd's own queues: quorum" in out.stdout
    assert "s3cret" not in out.stdout + out.stderr


def test_no_node_answering_exits_69_and_offline_skips_the_probe(tmp_path):
    path = write(tmp_path, [f"amqp://guest:s3cret@127.0.0.1:{refused_port()}/",
                            f"amqp://guest:s3cret@127.0.0.1:{refused_port()}/"])
    out = run("check-config", "--config", str(path))
    assert out.returncode == 69
    assert out.stdout.count("FAILED: cannot connect") == 2
    assert "no broker node answered (2 tried)" in out.stderr
    assert "s3cret" not in out.stdout + out.stderr
    offline = run("check-config", "--offline", "--config", str(path))
    assert offline.returncode == 0 and "nodes:" not in offline.stdout
