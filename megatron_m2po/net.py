"""This host on the network: a free port to listen on, the address other hosts reach it at, a server's health.

Below every layer that opens a port or waits for a server (engine launchers, weight-update groups), so
neither has to import the other for these.
"""

from __future__ import annotations

import socket
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def host_address() -> str:
    """This host's address as the engines on other hosts reach it (loopback when the name does not resolve)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def is_healthy(url: str, timeout: float = 2.0, path: str = "/health") -> bool:
    """The server at `url` answers 200 on `path` (`/health`: SGLang, vLLM and the local engine server all have
    it; sglang-router's `/health` is liveness only, its `/readiness` checks the workers)."""
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False
