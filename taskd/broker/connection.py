"""Broker URLs, connection parameters, and opening a connection.

``connect_timeout`` bounds the whole establishment of a connection: the TCP
connect *and* the AMQP handshake (pika's ``stack_timeout``), so a port that
accepts TCP but never speaks AMQP fails in about that many seconds.

TLS (``amqps://`` and ``broker.tls``) is set up per host by :mod:`.tls`.
"""
from __future__ import annotations

import logging
import os
import urllib.parse

import pika
import pika.exceptions

from ..exceptions import ConfigError, ConnectionError as TaskdConnectionError
from ..masking import mask_url, scrub
from . import tls as tls_mod
from .nodes import split_urls

log = logging.getLogger(__name__)

# What pika raises when a connection (or its socket) goes away.
CONNECTION_ERRORS = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionClosed,
    pika.exceptions.StreamLostError,
    pika.exceptions.ChannelWrongStateError,
    pika.exceptions.ConnectionWrongStateError,
    OSError,
)


def host_port(url):
    # Parsed from the masked URL: a password with an unencoded "/" or "#"
    # would otherwise be taken for the host or the port.
    parts = urllib.parse.urlsplit(mask_url(url))
    default = 5671 if parts.scheme == "amqps" else 5672
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.hostname or "localhost", port or default


def parameters(url, connect_timeout=4.0, heartbeat=60, name="taskd", tls=None):
    """pika connection parameters for ``url`` with taskd's timeouts and TLS.

    ``tls`` is ``broker.tls`` (a :class:`~.tls.TLSSettings` or None). Raises
    ConfigError for TLS settings that cannot be used.
    """
    try:
        params = pika.URLParameters(url)
    except Exception as exc:
        raise TaskdConnectionError(
            f"invalid broker URL {mask_url(url)!r}: {scrub(exc, url)}") from None
    settings = tls_mod.for_url(url, tls)
    if settings is not None:
        try:
            params.ssl_options = settings.ssl_options(params.host)
        except tls_mod.TLSFileError as exc:
            raise ConfigError([f"broker.tls.{exc.key}: {exc}"]) from None
        if not settings.verify:
            log.warning("TLS certificate verification is off for %s:%s (broker.tls.verify: "
                        "false): the broker is not authenticated", params.host, params.port)
    params.connection_attempts = 1
    params.retry_delay = 0
    params.socket_timeout = connect_timeout
    params.stack_timeout = connect_timeout
    params.blocked_connection_timeout = None
    params.heartbeat = heartbeat
    params.client_properties = {"connection_name": f"{name} pid={os.getpid()}"}
    return params


def describe_failure(url, exc, connect_timeout, tls=None):
    host, port = host_port(url)
    settings = tls_mod.for_url(url, tls)
    tls_reason = settings.explain(exc, host, port) if settings is not None else None
    if tls_reason:
        return f"cannot connect to the broker over TLS: {tls_reason}"
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, pika.exceptions.AMQPConnectionError) and exc.args:
        inner = exc.args[0]
        reason = str(inner) or type(inner).__name__
        if isinstance(inner, pika.exceptions.AMQPConnectionError) and inner.args:
            reason = str(inner.args[0]) or reason
        cause = getattr(inner, "exception", None)      # pika's connector phase errors
        if isinstance(cause, OSError):
            reason = cause.strerror or str(cause) or type(cause).__name__
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError) or "ACCESS_REFUSED" in reason:
        reason = "authentication failed (check the user and password in the broker URL)"
    if "timed out" in reason.lower() or "timeout" in reason.lower():
        reason = f"no AMQP handshake within {connect_timeout:g}s ({reason})"
    return f"cannot connect to the broker at {host}:{port}: {scrub(reason, url)}"


def describe_node(url):
    """``host:port`` of a node's URL, for log lines (never a secret)."""
    host, port = host_port(url)
    return f"{host}:{port}"


def all_failed(failures):
    """One error for a connection attempt over every node: ``failures`` is a list of
    (url, message); a single node keeps its own message."""
    if len(failures) == 1:
        return failures[0][1]
    return (f"no broker node answered (tried {len(failures)}): "
            + "; ".join(message for _url, message in failures))


def connect_blocking(url, connect_timeout=4.0, heartbeat=60, name="taskd", tls=None,
                     nodes=None):
    """Open a pika BlockingConnection or raise taskd's ConnectionError.

    ``url`` may name several nodes (a list, or ``;``-separated); they are tried in
    the order of ``nodes`` (a :class:`~.nodes.Nodes`, which learns which node
    answered or failed) or else as listed. The connection's ``taskd_url`` is the
    URL of the node it reached."""
    urls = nodes.order() if nodes is not None else split_urls(url)
    failures = []
    for node_url in urls:
        params = parameters(node_url, connect_timeout, heartbeat, name, tls)
        try:
            connection = pika.BlockingConnection(params)
        except Exception as exc:
            message = describe_failure(node_url, exc, connect_timeout, tls)
            failures.append((node_url, message))
            if nodes is not None:
                nodes.failed(node_url)
            if len(urls) > 1:
                log.warning("%s; trying the next node", message)
            continue
        if nodes is not None:
            nodes.connected(node_url)
        if failures:
            log.warning("connected to the broker node %s after %d failed", describe_node(node_url),
                        len(failures))
        connection.taskd_url = node_url
        return connection
    raise TaskdConnectionError(all_failed(failures))
