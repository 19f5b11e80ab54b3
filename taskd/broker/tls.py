"""TLS to the broker: the ``broker.tls`` settings, the SSL context, and why a handshake failed.

``amqps://`` URLs and ``broker.tls`` use one path (:func:`for_url`): a
context from :func:`ssl.create_default_context`, so certificates and host
names are verified unless ``verify: false``. Without ``ca_file`` the
system's trust store is used, also when a client certificate is given
(pika's own ``?ssl_options=`` parsing demands a CA file then).

The SSL options are built per host (:meth:`TLSSettings.ssl_options`): the
server name checked is ``server_hostname`` or else the host of the URL being
connected to, so one ``broker.tls`` can serve several broker nodes.

Every file is read when the configuration is validated (``taskd
check-config`` reports a wrong path, a file that is not PEM, or a wrong key
password, naming the key) and again at each connection, so renewed
certificates are picked up by the next connection. The key password is never
printed: it is left out of ``repr`` and shown as ``***`` by
:meth:`TLSSettings.describe`.
"""
from __future__ import annotations

import re
import ssl
import urllib.parse
from dataclasses import dataclass, field

import pika

from ..exceptions import ConfigError


class TLSFileError(ValueError):
    """A ``broker.tls`` file that cannot be used; ``key`` names the setting."""

    def __init__(self, key, message):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class TLSSettings:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: str | None = field(default=None, repr=False)
    verify: bool = True
    server_hostname: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client SSL context; raises :class:`TLSFileError` naming the file at fault."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise TLSFileError("ca_file", f"cannot load CA certificates from {self.ca_file}: "
                                          f"{_reason(exc)}") from None
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            try:
                # a password, even empty, keeps OpenSSL from asking on the terminal
                ctx.load_cert_chain(self.cert_file, self.key_file, self.key_password or "")
            except (ssl.SSLError, OSError) as exc:
                key = f"key_file={self.key_file}" if self.key_file else "its key in the same file"
                raise TLSFileError("cert_file", (
                    f"cannot load the client certificate cert_file={self.cert_file} with {key}: "
                    f"{_reason(exc)} (a PEM certificate, the key that belongs to it, and "
                    "key_password if the key is encrypted?)")) from None
        return ctx

    def ssl_options(self, host) -> pika.SSLOptions:
        """pika's SSL options for a connection to ``host``."""
        return pika.SSLOptions(self.context(), server_hostname=self.server_hostname or host)

    def describe(self):
        """The settings in one line, the key password masked."""
        parts = [f"{name}={value}" for name, value in (
            ("ca_file", self.ca_file or "(system trust store)"), ("cert_file", self.cert_file),
            ("key_file", self.key_file), ("server_hostname", self.server_hostname)) if value]
        if self.key_password:
            parts.append("key_password=***")
        parts.append("verify=" + ("on" if self.verify else "OFF"))
        return ", ".join(parts)

    def explain(self, exc, host, port):
        """Why a connection to ``host:port`` failed, if TLS was the cause (else None)."""
        verify_message = _find_verify_message(exc)
        if verify_message is not None:
            trust = f"ca_file={self.ca_file}" if self.ca_file else "the system trust store"
            name = self.server_hostname or host
            return (f"certificate verify failed for {host}:{port} with {trust} and "
                    f"server_hostname={name} ({verify_message})")
        reason = _find_ssl_reason(exc)
        if reason is None:
            return None
        hint = ""
        if "certificate required" in reason:
            hint = ": the broker requires a client certificate (broker.tls.cert_file, key_file)"
        elif self.cert_file and ("unknown ca" in reason or "bad certificate" in reason):
            hint = f": the broker does not accept cert_file={self.cert_file}"
        elif "wrong version number" in reason.lower():
            hint = ": is this port a TLS listener (5671), not plain AMQP (5672)?"
        elif reason == _CLOSED:     # TLS 1.3: the alert may be lost when the broker hangs up
            hint = (f": does the broker accept cert_file={self.cert_file}?" if self.cert_file else
                    ": does the broker require a client certificate "
                    "(broker.tls.cert_file, key_file)?")
        return f"TLS handshake with {host}:{port} failed ({reason}){hint}"


def for_url(url, tls):
    """The TLS settings a connection to ``url`` uses: ``tls`` (broker.tls), defaults for an
    ``amqps://`` URL, or None for plain AMQP and for pika's own ``?ssl_options=`` query.
    Raises ConfigError when the URL and ``broker.tls`` disagree."""
    problem = conflict(url, tls)
    if problem:
        raise ConfigError([f"broker.tls: {problem}"])
    if tls is not None:
        return tls
    scheme, query = _scheme_and_query(url)
    return TLSSettings() if scheme == "amqps" and "ssl_options" not in query else None


def conflict(url, tls):
    """What is wrong with ``broker.tls`` for this URL (None: nothing)."""
    if tls is None:
        return None
    scheme, query = _scheme_and_query(url)
    if scheme != "amqps":
        return (f"is set but broker.url uses {scheme}:// (plain AMQP): "
                "use amqps:// (port 5671 by default)")
    if "ssl_options" in query:
        return "is set and broker.url has ?ssl_options=: give the TLS settings in broker.tls only"
    return None


def _scheme_and_query(url):
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, urllib.parse.parse_qs(parts.query)


_SSL_TEXT = re.compile(r"\[SSL: [A-Z0-9_]+\] ([^(\\'\"]+)")
_EOF_TEXT = "EOF occurred in violation of protocol"      # ssl.SSLEOFError, also as text
_CLOSED = "the broker closed the connection during the handshake"


def _reason(exc):
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason.replace('_', ' ').lower()} ({exc.library})"
    return getattr(exc, "strerror", None) or re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(exc))


def _causes(exc, depth=0):
    """``exc`` and what pika wrapped in it: workflow attempts, phase errors, args."""
    if depth > 6 or not isinstance(exc, BaseException):
        return
    yield exc
    for inner in (*getattr(exc, "exceptions", ()), getattr(exc, "exception", None), *exc.args):
        yield from _causes(inner, depth + 1)


def _find_verify_message(exc):
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause.verify_message or str(cause)
    return None


def _find_ssl_reason(exc):
    """The reason of an SSL error in ``exc``, also when pika kept only its text."""
    for cause in _causes(exc):
        match = _SSL_TEXT.search(str(cause))
        if match:
            return match.group(1).strip()
        if _EOF_TEXT in str(cause):
            return _CLOSED
    return None
