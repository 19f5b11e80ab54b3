"""Secrets never printed: broker URLs (whatever their password holds), their TLS
query options, and secret settings."""
import pytest

from taskd.broker.connection import host_port, mask_url
from taskd.masking import mask_value


@pytest.mark.parametrize("url, secrets", [
    ("amqp://guest:s3cret@127.0.0.1:5672/%2F", ["s3cret"]),
    ("amqp://user:pa/ss@broker/vhost", ["pa/ss", "pa", "ss@"]),
    ("amqp://user:pa#ss@broker:5672/vhost", ["pa#ss", "pa", "ss@"]),
    ("amqp://user:pa?ss@broker/vhost", ["pa?ss", "pa", "ss@"]),
    ("amqp://user:p@ss@broker/vhost", ["p@ss"]),
    ("amqps://user:pw@broker/v?ssl_options={'password': 'tlspw', 'keyfile': '/k/key.pem'}",
     ["pw@", "tlspw", "/k/key.pem"]),
    ("amqps://user:pw@broker/v?ssl_options=%7B%27password%27%3A+%27tlspw%27%7D&heartbeat=5",
     ["tlspw"]),
])
def test_broker_urls_are_printed_without_any_secret(url, secrets):
    masked = mask_url(url)
    for secret in secrets:
        assert secret not in masked, masked
    assert "user" in masked or "guest" in masked          # the user name is kept
    assert "broker" in masked or "127.0.0.1" in masked    # and the host


def test_host_and_port_are_found_whatever_the_password_holds():
    assert host_port("amqp://user:pa/ss@broker:5673/v") == ("broker", 5673)
    assert host_port("amqp://user:pa#ss@broker/v") == ("broker", 5672)


def test_errors_about_a_broker_url_quote_no_part_of_its_password():
    from taskd.broker.connection import parameters
    from taskd.exceptions import ConnectionError
    with pytest.raises(ConnectionError) as caught:
        parameters("amqp://user:pw/secret@broker/v")
    assert "pw" not in str(caught.value) and "secret" not in str(caught.value)
    assert "user:***@broker" in str(caught.value)


def test_check_config_prints_no_tls_key_password(tmp_path):
    from test_cli import run
    path = tmp_path / "taskd.yaml"
    path.write_text("broker:\n  url: \"amqps://u:pa/ss@broker/v?ssl_options={'password': "
                    "'tlspw'}\"\n")
    out = run("check-config", "--offline", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert "tlspw" not in out.stdout and "pa/ss" not in out.stdout
    assert "u:***@broker" in out.stdout


def test_secret_settings_are_masked_by_name():
    assert mask_value("broker.tls.key_password", "x") == "***"
    assert mask_value("broker.tls.key_file", "/etc/key.pem") == "***"
    assert mask_value("broker.tls.ca_file", "/etc/ca.pem") == "/etc/ca.pem"
    assert mask_value("broker.tls.key_password", None) is None
