"""The OpenTelemetry bridge's cost per run: a client with TELEMETRY_OTEL on against one without.

The bridge's own pipeline exports with a batch span processor over OTLP/HTTP. Its
collector here is OTLPSink, an HTTP server on 127.0.0.1 in a child process that accepts
every request and counts the requests. Run as a script, this module is that
server:

    python benchmarks/_bridge.py

prints the port it listens on, then serves until its standard input closes.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["OTLPSink", "bridge_environment", "make_bridge_client"]

_START_TIMEOUT_SECONDS = 30.0


class OTLPSink:
    """An OTLP/HTTP collector on 127.0.0.1 that accepts every export, in a child process.

    Use as a context manager. ``endpoint`` is its base URL, for OTEL_EXPORTER_OTLP_ENDPOINT.

    Raises:
        RuntimeError: the server did not report its port within 30 s.
    """

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        port_line = _read_line(self._process.stdout, _START_TIMEOUT_SECONDS)
        if not port_line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the OTLP sink did not start: it printed {port_line!r}")
        self.endpoint = f"http://127.0.0.1:{int(port_line)}"

    def close(self) -> int:
        """Stop the server and return the number of export requests it received."""
        try:
            output, _ = self._process.communicate(input="", timeout=_START_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            return 0
        text = output.strip()
        return int(text) if text.isdigit() else 0

    def __enter__(self) -> OTLPSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def bridge_environment(endpoint: str) -> Iterator[None]:
    """Point the bridge's own pipeline at ``endpoint`` for the duration of the block.

    The OTLP exporter reads these variables when the bridge builds its pipeline, at the
    client's first start_run.
    """
    settings = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "bench-write",
        "OTEL_SDK_DISABLED": "false",
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_bridge_client(data_dir: Path) -> Any:
    """Return a client with durability fsync, no API and the OpenTelemetry bridge on."""
    from telemetry import TelemetryClient, TelemetryConfig

    config = TelemetryConfig(
        data_dir=data_dir, durability="fsync", api_enabled=False, otel=True, environ={}
    )
    return TelemetryClient(config)


def _read_line(stream: Any, timeout: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


class _SinkHandler(http.server.BaseHTTPRequestHandler):
    requests_received = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        _SinkHandler.requests_received += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SinkHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()
    server.shutdown()
    print(_SinkHandler.requests_received, flush=True)


if __name__ == "__main__":
    _serve()
