"""A process's Prometheus ``/metrics`` endpoint (the server's and the worker's)."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server


def start_metrics_http(port: int, address: str) -> WSGIServer:
    """Serve the default registry from a thread of its own, so that scrapes never wait
    on the event loop. A port that cannot be taken raises OSError naming
    ``metrics_port`` (the other port a process opens is fine)."""
    try:
        server, _ = start_http_server(port, addr=address)
    except OSError as error:
        raise OSError(error.errno, f"metrics_port {port}: {error.strerror}") from None
    return server
