"""Throwaway certificates for TLS tests, made with the ``openssl`` command line.

:func:`make` writes a CA, a server certificate for ``localhost`` and
``127.0.0.1`` and a client certificate (its key encrypted with
``KEY_PASSWORD``), all signed by that CA, and a second, unrelated CA that
signed nothing the server shows. EC keys keep it fast (well under a second).
"""
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

KEY_PASSWORD = "s3cret-key-pass"


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path            # encrypted with KEY_PASSWORD
    other_ca: Path


def available():
    return shutil.which("openssl") is not None


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _key(cwd, name):
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", f"{name}.key", cwd=cwd)


def _ca(cwd, name):
    _key(cwd, name)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=taskd test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)


def _leaf(cwd, name, ca, usage, san=None):
    _key(cwd, name)
    _openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=cwd)
    ext = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}",
           "authorityKeyIdentifier=keyid", "subjectKeyIdentifier=hash"]
    if san:
        ext.append(f"subjectAltName={san}")
    (cwd / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=cwd)


def make(directory) -> Certs:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    _leaf(d, "client", "ca", "clientAuth")
    _openssl("pkey", "-in", "client.key", "-aes256", "-passout", f"pass:{KEY_PASSWORD}",
             "-out", "client-encrypted.key", cwd=d)
    return Certs(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
                 client_cert=d / "client.pem", client_key=d / "client-encrypted.key",
                 other_ca=d / "other-ca.pem")
