"""broker.tls: validated up front, naming the key; verification on; the key password hidden."""
import ssl

import pytest
import yaml

import certs
from taskd.broker.connection import parameters
from taskd.broker.tls import TLSSettings
from taskd.config import loads
from taskd.exceptions import ConfigError
from test_cli import run

pytestmark = pytest.mark.skipif(not certs.available(), reason="needs openssl")

URL = "amqps://guest:guest@broker.example/%2F"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return certs.make(tmp_path_factory.mktemp("pki"))


def config_text(url=URL, **tls):
    return yaml.safe_dump({"broker": {"url": url, "tls": tls}})


def errors(text):
    with pytest.raises(ConfigError) as info:
        loads(text, environ={})
    return info.value.errors


def test_unusable_tls_settings_are_refused_naming_the_key_and_the_file(pki, tmp_path):
    missing = tmp_path / "missing.pem"
    assert errors(config_text(ca_file=str(missing))) == [
        f"broker.tls.ca_file (line 3): expected the path of a readable file (No such file or "
        f"directory), got '{missing}'"]
    [error] = errors(config_text(ca_file=str(pki.client_cert.with_suffix(".key"))))
    assert error.startswith("broker.tls.ca_file (line 3): cannot load CA certificates from ")
    [error] = errors(config_text(cert_file=str(pki.client_cert), key_file=str(pki.client_key),
                                 key_password="wrong"))
    assert error.startswith(f"broker.tls.cert_file (line 3): cannot load the client certificate "
                            f"cert_file={pki.client_cert} with key_file={pki.client_key}")
    assert "key_password if the key is encrypted" in error
    [error] = errors(config_text(key_file=str(pki.client_key)))
    assert error.startswith("broker.tls.key_file (line 3): needs cert_file")
    [error] = errors(config_text("amqp://guest:guest@broker.example/%2F", ca_file=str(pki.ca)))
    assert error.startswith("broker.tls (line 2): is set but broker.url uses amqp://")
    [error] = errors(config_text(verify="no"))
    assert error.startswith("broker.tls.verify (line 3): expected true or false")


def test_the_key_password_is_never_printed(pki, tmp_path):
    text = config_text(ca_file=str(pki.ca), cert_file=str(pki.client_cert),
                       key_file=str(pki.client_key), key_password=certs.KEY_PASSWORD)
    config = loads(text, environ={})
    settings = config["broker.tls"]
    assert settings.key_password == certs.KEY_PASSWORD
    for shown in (repr(config), repr(settings), str(settings), settings.describe()):
        assert certs.KEY_PASSWORD not in shown
    assert "key_password=***" in settings.describe()
    path = tmp_path / "taskd.yaml"
    path.write_text(text)
    out = run("check-config", "--offline", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert f"tls:       ca_file={pki.ca}, cert_file={pki.client_cert}" in out.stdout
    assert "key_password=***, verify=on" in out.stdout
    assert certs.KEY_PASSWORD not in out.stdout + out.stderr


def test_an_amqps_url_alone_verifies_the_certificate_and_the_host_name_of_the_url():
    params = parameters(URL)
    context = params.ssl_options.context
    assert params.port == 5671
    assert params.ssl_options.server_hostname == "broker.example"
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_ssl_options_are_made_per_host_unless_server_hostname_is_set(pki):
    settings = TLSSettings(ca_file=str(pki.ca))
    assert settings.ssl_options("rabbit-1").server_hostname == "rabbit-1"
    assert settings.ssl_options("rabbit-2").server_hostname == "rabbit-2"
    fixed = TLSSettings(ca_file=str(pki.ca), server_hostname="rabbit.internal")
    assert fixed.ssl_options("10.0.0.7").server_hostname == "rabbit.internal"
    off = TLSSettings(verify=False).ssl_options("h").context
    assert off.verify_mode == ssl.CERT_NONE and not off.check_hostname
