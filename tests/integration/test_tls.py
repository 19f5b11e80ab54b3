"""TLS to a private RabbitMQ node that verifies client certificates (one node per module).

The node listens for TLS with a server certificate for localhost/127.0.0.1 from a
throwaway CA and refuses clients without a certificate from that CA.
"""
import pytest

import certs
import rmqnode
from taskd.broker.connection import connect_blocking
from taskd.config import validate
from taskd.exceptions import ConnectionError as TaskdConnectionError

pytestmark = pytest.mark.skipif(not (rmqnode.available() and certs.available()),
                                reason="needs rabbitmq-server, root (private node) and openssl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return certs.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node(pki):
    n = rmqnode.RabbitNode(tls=rmqnode.TlsFiles(str(pki.ca), str(pki.server_cert),
                                                str(pki.server_key)),
                           require_client_cert=True).start()
    yield n
    n.destroy()


def tls(pki, **changes):
    """broker.tls with our CA and client certificate; ``key=None`` drops a key."""
    settings = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
                "key_file": str(pki.client_key), "key_password": certs.KEY_PASSWORD}
    settings.update(changes)
    return {k: v for k, v in settings.items() if v is not None}


def broker(node, settings, **extra):
    return {"broker": {"url": node.tls_url, "tls": settings, "connect_timeout": 3, **extra}}


def connect(node, settings):
    """Open and close a client connection with these broker.tls settings."""
    config = validate(broker(node, settings), environ={})
    connect_blocking(node.tls_url, 3, 0, "taskd-test", config["broker.tls"]).close()


def connect_error(node, settings):
    """The message of the error a client gets connecting with these settings."""
    with pytest.raises(TaskdConnectionError) as info:
        connect(node, settings)
    return str(info.value)


def test_a_worker_and_a_client_run_a_task_over_verified_tls(topo, workers, app_for, node, pki):
    path = topo.config(broker(node, tls(pki)))
    w = workers(path).ready()
    app = app_for(path)
    assert app.send_task("ttasks.add", [2, 3]).get(timeout=10) == 5
    assert "verification is off" not in w.log


def test_a_broker_certificate_from_another_ca_is_refused_naming_host_and_ca_file(topo, workers,
                                                                               node, pki):
    expected = (f"certificate verify failed for 127.0.0.1:{node.tls_port} "
                f"with ca_file={pki.other_ca}")
    settings = tls(pki, ca_file=str(pki.other_ca))
    message = connect_error(node, settings)
    assert expected in message and "self-signed certificate in certificate chain" in message
    w = workers(topo.config(broker(node, settings, retry_for=0.5)))
    assert w.proc.wait(30) == 69
    assert expected in w.log


def test_a_certificate_for_another_host_name_is_refused(node, pki):
    message = connect_error(node, tls(pki, server_hostname="wrong.example"))
    assert f"certificate verify failed for 127.0.0.1:{node.tls_port}" in message
    assert "not valid for 'wrong.example'" in message
    connect(node, tls(pki, server_hostname="localhost"))     # a name the certificate has


def test_verify_false_connects_to_an_unverifiable_broker_and_warns(topo, workers, app_for,
                                                                   node, pki):
    path = topo.config(broker(node, tls(pki, ca_file=str(pki.other_ca), verify=False)))
    w = workers(path).ready()
    assert app_for(path).send_task("ttasks.add", [1, 1]).get(timeout=10) == 2
    assert f"TLS certificate verification is off for 127.0.0.1:{node.tls_port}" in w.log


def test_the_broker_requires_a_client_certificate_and_accepts_ours_without_a_ca_file(
        node, pki, monkeypatch):
    message = connect_error(node, tls(pki, cert_file=None, key_file=None, key_password=None))
    assert f"TLS handshake with 127.0.0.1:{node.tls_port} failed" in message
    assert "client certificate (broker.tls.cert_file, key_file)" in message
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))     # our CA as the system trust store
    connect(node, tls(pki, ca_file=None))


def test_amqps_to_a_plain_amqp_port_says_which_port_speaks_tls(node, pki):
    config = validate(broker(node, tls(pki)), environ={})
    plain = f"amqps://guest:guest@127.0.0.1:{node.port}/%2F"
    with pytest.raises(TaskdConnectionError, match=(
            rf"TLS handshake with 127.0.0.1:{node.port} failed \(wrong version number\): "
            r"is this port a TLS listener")):
        connect_blocking(plain, 3, 0, "taskd-test", config["broker.tls"])


def test_check_config_reports_a_verified_tls_node_and_refuses_the_wrong_ca(node, pki, tmp_path):
    import yaml
    from test_check_config_nodes import run
    path = tmp_path / "taskd.yaml"
    path.write_text(yaml.safe_dump(broker(node, tls(pki))))
    out = run("check-config", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert (f"127.0.0.1:{node.tls_port}  ok: RabbitMQ " in out.stdout
            and "TLS, certificate and host name verified" in out.stdout)
    path.write_text(yaml.safe_dump(broker(node, tls(pki, ca_file=str(pki.other_ca)))))
    out = run("check-config", "--config", str(path))
    assert out.returncode == 69
    assert (f"127.0.0.1:{node.tls_port}  FAILED: cannot connect to the broker over TLS: "
            f"certificate verify failed for 127.0.0.1:{node.tls_port} with "
            f"ca_file={pki.other_ca}") in out.stdout
    assert certs.KEY_PASSWORD not in out.stdout + out.stderr
