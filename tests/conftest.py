"""Fixtures shared by the test modules."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from http_server import ScriptedServer

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def api_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedServer]:
    """Yield a started ScriptedServer on 127.0.0.1, and stop it after the test.

    Proxy variables are removed from the environment for the test, because httpx would
    otherwise send requests for the loopback server through a proxy.
    """
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    with ScriptedServer() as server:
        yield server


@pytest.fixture
def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, so nothing listens on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
