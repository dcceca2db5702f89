"""ScriptedServer: a real HTTP server on 127.0.0.1 that responds with scripted behaviours.

Tests queue one behaviour per expected request: ``respond``, ``slow``, ``hang`` or
``drop``. Each request consumes the next one, and once the queue is empty the server
responds 200 with an empty body. Every request is recorded before its behaviour runs, so
a test can inspect it even when the client timed out.

    with ScriptedServer() as server:
        server.respond(503)
        ...  # post to server.url: the first request gets 503, later ones 200
        assert server.requests[0].headers["idempotency-key"] == run_id

The server speaks HTTP/1.1 with keep-alive, so a client may send several requests on one
connection. ``stop()`` releases hung and slow handlers and closes open connections, so
teardown takes at most its timeout even with hung requests.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["Headers", "RecordedRequest", "ScriptedServer"]

HOST = "127.0.0.1"
RUNS_PATH = "/runs"
CONNECTION_IDLE_TIMEOUT = 5.0
"""Seconds a handler waits for the next request on an idle keep-alive connection."""


class Headers(Mapping[str, str]):
    """Request headers, looked up without regard to case. Repeated headers are joined by ", "."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._values: dict[str, str] = {}
        self._names: dict[str, str] = {}
        for name, value in items:
            key = name.lower()
            if key in self._values:
                self._values[key] += ", " + value
            else:
                self._values[key] = value
                self._names[key] = name

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names.values())

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    headers: Headers
    body: bytes
    client_port: int
    """The client's source port, which distinguishes its connections."""

    def json(self) -> Any:
        """Parse the body as JSON."""
        return json.loads(self.body)


@dataclass(frozen=True)
class _Behaviour:
    kind: str  # "respond", "hang" or "drop"
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0


_DEFAULT = _Behaviour("respond")


class ScriptedServer:
    """HTTP server on 127.0.0.1 with a free port, run in a daemon thread.

    Use it as a context manager, or call start() and stop(). Behaviours are queued in
    order and may be queued while the server runs. Methods GET, POST, PUT, PATCH and
    DELETE are served alike on every path.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: deque[_Behaviour] = deque()
        self._requests: list[RecordedRequest] = []
        self._errors: list[BaseException] = []
        self._release = threading.Event()
        self._connections: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle

    def start(self) -> ScriptedServer:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("ScriptedServer is already started; create a new one instead")
        self._httpd = _Server(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"ScriptedServer:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Release hung and slow handlers, close open connections and stop serving.

        Waits at most about ``timeout`` seconds in total for the threads to end. Safe to
        call more than once.
        """
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._release.set()
        httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._handler_threads)
        for connection in connections:
            # The client or the handler may have closed the connection already.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in [*threads, self._thread]:
            if thread is not None:
                thread.join(timeout / (len(threads) + 1))
        httpd.server_close()

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # Addresses and records

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        if self._httpd is None:
            raise RuntimeError("ScriptedServer is not running; call start() first")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``, with no path."""
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """A URL to use as api_url: ``http://127.0.0.1:<port>/runs``."""
        return self.base_url + RUNS_PATH

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions raised in handlers, other than connections closed by clients."""
        with self._lock:
            return list(self._errors)

    # Script

    def respond(
        self,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        *,
        times: int = 1,
    ) -> None:
        """Respond with ``status``, ``headers`` and ``body`` to the next ``times`` requests.

        A Date header is added unless ``headers`` contains one. Content-Length is always set.
        """
        self._queue(_Behaviour("respond", status, dict(headers or {}), body), times)

    def slow(
        self,
        seconds: float,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        *,
        times: int = 1,
    ) -> None:
        """Wait ``seconds`` (or until stop()), then respond like respond()."""
        self._queue(_Behaviour("respond", status, dict(headers or {}), body, seconds), times)

    def hang(self, *, times: int = 1) -> None:
        """Accept the request and never respond, until stop() closes the connection."""
        self._queue(_Behaviour("hang"), times)

    def drop(self, *, times: int = 1) -> None:
        """Close the connection without sending a response."""
        self._queue(_Behaviour("drop"), times)

    def _queue(self, behaviour: _Behaviour, times: int) -> None:
        with self._lock:
            self._script.extend([behaviour] * times)

    # Called by the handler threads

    def _next_behaviour(self, request: RecordedRequest) -> _Behaviour:
        with self._lock:
            self._requests.append(request)
            return self._script.popleft() if self._script else _DEFAULT

    def _track(self, connection: socket.socket, thread: threading.Thread, active: bool) -> None:
        with self._lock:
            if active:
                self._connections.add(connection)
                self._handler_threads.add(thread)
            else:
                self._connections.discard(connection)
                self._handler_threads.discard(thread)

    def _record_error(self, error: BaseException) -> None:
        with self._lock:
            self._errors.append(error)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: ScriptedServer) -> None:
        self.owner = owner
        super().__init__((HOST, 0), _Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        thread = threading.current_thread()
        self.owner._track(request, thread, active=True)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._track(request, thread, active=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        # An OSError comes from a client that timed out or closed its connection, which
        # tests cause on purpose.
        if isinstance(error, OSError) or self.owner._release.is_set():
            return
        if error is not None:
            self.owner._record_error(error)
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = CONNECTION_IDLE_TIMEOUT
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean; the requests are recorded instead

    def _serve(self) -> None:
        owner = self.server.owner
        request = RecordedRequest(
            method=self.command,
            path=self.path,
            headers=Headers(list(self.headers.items())),
            body=self._read_body(),
            client_port=int(self.client_address[1]),
        )
        behaviour = owner._next_behaviour(request)

        if behaviour.kind == "hang":
            owner._release.wait()
            self.close_connection = True
            return
        if behaviour.kind == "drop":
            self.close_connection = True
            return
        if behaviour.delay and owner._release.wait(behaviour.delay):
            self.close_connection = True
            return
        self._send(behaviour)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields, unused
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _send(self, behaviour: _Behaviour) -> None:
        self.send_response_only(behaviour.status)
        names = {name.lower() for name in behaviour.headers}
        if "date" not in names:
            self.send_header("Date", self.date_time_string())
        for name, value in behaviour.headers.items():
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(behaviour.body)))
        self.end_headers()
        self.wfile.write(behaviour.body)
