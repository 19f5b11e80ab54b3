"""``taskd check-config``'s look at the broker: connect to each node of ``broker.url``.

Each node is probed on its own connection (AMQP handshake, TLS verified as the
worker would verify it) and reported on one line: reachable or why not, the
RabbitMQ version and cluster name it announces, and whether the link is TLS.
URLs are never printed, only ``host:port``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..exceptions import ConfigError, ConnectionError as TaskdConnectionError
from . import tls as tls_mod
from .connection import connect_blocking, describe_node


@dataclass(frozen=True)
class NodeReport:
    node: str                   # host:port
    ok: bool
    detail: str                 # version and TLS, or why it failed
    cluster: str | None = None  # the cluster name the node announces

    def line(self) -> str:
        return f"{self.node}  {'ok' if self.ok else 'FAILED'}: {self.detail}"


def probe_node(url: str, config) -> NodeReport:
    """Connect to one node, read what it announces, close."""
    tls = config["broker.tls"]
    try:
        conn = connect_blocking(url, config["broker.connect_timeout"], 0, "taskd-check-config",
                                tls)
    except (TaskdConnectionError, ConfigError) as exc:
        return NodeReport(describe_node(url), False, str(exc))
    try:
        props = getattr(conn._impl, "server_properties", None) or {}
    finally:
        try:
            conn.close()
        except Exception:
            pass
    product = props.get("product", "AMQP broker")
    version = props.get("version", "version unknown")
    cluster = props.get("cluster_name")
    settings = tls_mod.for_url(url, tls)
    link = ("TLS, certificate and host name verified" if settings is not None and settings.verify
            else "TLS, NOT verified (broker.tls.verify: false)" if settings is not None
            else "plain AMQP, not encrypted")
    parts = [f"{product} {version}"] + ([f"cluster {cluster}"] if cluster else []) + [link]
    return NodeReport(describe_node(url), True, ", ".join(parts), cluster)


def probe_all(config) -> list:
    """A report per node of ``broker.url``, in the order listed."""
    return [probe_node(url, config) for url in config.broker_urls]
