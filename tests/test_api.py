"""APIClient against a real HTTP server on 127.0.0.1, with recorded sleeps instead of waits."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from http_server import ScriptedServer

from telemetry.api import BODY_READ_LIMIT, EXCERPT_MAX_CHARS, APIClient, PostResult
from telemetry.config import TelemetryConfig
from telemetry.errors import ConfigError
from telemetry.models import APIPayload, RunRecord

TOKEN = "tok-5d8e1a-api-secret"
RUN_ID = "20261204T193417123456Z-api-test-0123456789abcdef"
START = "2026-12-04T19:34:17.123456+00:00"
MODES = ("sync", "async")


class FakeClock:
    """A monotonic clock that only the recorded sleeps advance."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """Delays that the client requested, recorded instead of slept."""

    def __init__(self, clock: FakeClock | None) -> None:
        self.delays: list[float] = []
        self._clock = clock

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self._clock is not None:
            self._clock.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


ClientFactory = Callable[..., tuple[APIClient, Sleeps]]


@pytest.fixture(autouse=True)
def logs_without_token(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture every log record, httpx's included, and check that none shows the token."""
    caplog.set_level(logging.DEBUG)
    yield
    formatter = logging.Formatter()
    text = "\n".join(formatter.format(record) for record in caplog.get_records("call"))
    assert TOKEN not in text


@pytest.fixture
def make_client(api_server: ScriptedServer) -> Iterator[ClientFactory]:
    """Build APIClients posting to the test server with TOKEN, and close them after."""
    clients: list[APIClient] = []

    def make(clock: FakeClock | None = None, **settings: Any) -> tuple[APIClient, Sleeps]:
        settings.setdefault("api_url", api_server.url)
        settings.setdefault("api_token", TOKEN)
        settings.setdefault("timeout", 2.0)
        sleeps = Sleeps(clock)
        client = APIClient(
            TelemetryConfig(environ={}, **settings),
            sleep=sleeps.sleep,
            async_sleep=sleeps.async_sleep,
            clock=clock or time.monotonic,
        )
        clients.append(client)
        return client, sleeps

    yield make
    for client in clients:
        client.close()


def make_payload(**fields: Any) -> APIPayload:
    fields.setdefault("run_id", RUN_ID)
    return APIPayload(agent_name="api-test", job_type="sync", start_time=START, **fields)


def post(
    client: APIClient, mode: str, payload: APIPayload | None = None, **kwargs: Any
) -> PostResult:
    """Post with post_run_sync or post_run_async, and check that the message hides the token."""
    payload = payload or make_payload()
    if mode == "sync":
        result = client.post_run_sync(payload, **kwargs)
    else:
        result = asyncio.run(client.post_run_async(payload, **kwargs))
    assert TOKEN not in result.message
    return result


def api_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "telemetry.api" and r.levelno == level]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# Success and the request sent


@pytest.mark.parametrize("mode", MODES)
def test_post_success_request(
    mode: str, api_server: ScriptedServer, make_client: ClientFactory
) -> None:
    """A 200 is success, and the server receives the URL, headers and body of the run."""
    client, sleeps = make_client()
    payload = make_payload(status="success", items_succeeded=3, metrics_json={"rows": 7})

    result = post(client, mode, payload)

    assert result == PostResult(True, "HTTP 200")
    assert sleeps.delays == []
    [request] = api_server.requests
    assert request.method == "POST"
    assert request.path == "/runs"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["Idempotency-Key"] == RUN_ID
    assert request.headers["User-Agent"].startswith("agent-telemetry/")
    assert request.json() == payload.to_dict()


def test_post_body_encoded_like_journal(
    api_server: ScriptedServer, make_client: ClientFactory
) -> None:
    """Values JSON cannot hold are sent in the form that the journal stores."""
    client, _ = make_client()
    payload = make_payload(metrics_json={"ratio": float("nan"), "big": 2**70, "tags": {"b", "a"}})

    post(client, "sync", payload)

    body = api_server.requests[0].json()
    assert body == orjson.loads(payload.to_json())
    assert body["metrics_json"] == {"ratio": "NaN", "big": str(2**70), "tags": ["a", "b"]}


def test_post_without_token(api_server: ScriptedServer, make_client: ClientFactory) -> None:
    """Without a token the request has no Authorization header."""
    client, _ = make_client(api_token="")

    result = post(client, "sync")

    assert result.success
    assert "Authorization" not in api_server.requests[0].headers


@pytest.mark.parametrize("status", [201, 202, 204])
def test_post_other_2xx_success(
    status: int, api_server: ScriptedServer, make_client: ClientFactory
) -> None:
    """Every 2xx status is success."""
    client, _ = make_client()
    api_server.respond(status)

    result = post(client, "sync")

    assert result == PostResult(True, f"HTTP {status}")


# Retries


@pytest.mark.parametrize("mode", MODES)
def test_post_retry_then_success(
    mode: str,
    api_server: ScriptedServer,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two 500s are retried after 1 and 2 s, and the third attempt succeeds."""
    client, sleeps = make_client()
    api_server.respond(500, times=2)

    result = post(client, mode)

    assert result == PostResult(True, "HTTP 200")
    assert sleeps.delays == [1, 2]
    assert len(api_server.requests) == 3
    assert {r.headers["Idempotency-Key"] for r in api_server.requests} == {RUN_ID}
    assert len({r.body for r in api_server.requests}) == 1
    assert len(api_records(caplog, logging.WARNING)) == 2
    assert api_records(caplog, logging.ERROR) == []


@pytest.mark.parametrize("mode", MODES)
def test_post_gives_up_after_max_retries(
    mode: str,
    api_server: ScriptedServer,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With only 500s, 4 requests are sent, with sleeps of 1, 2 and 4 s, then one ERROR."""
    client, sleeps = make_client(max_retries=3)
    api_server.respond(500, times=4)

    result = post(client, mode)

    assert result == PostResult(False, "failed after 4 attempts: HTTP 500", 500)
    assert sleeps.delays == [1, 2, 4]
    assert len(api_server.requests) == 4
    assert len(api_records(caplog, logging.WARNING)) == 3
    [error] = api_records(caplog, logging.ERROR)
    assert RUN_ID in error.getMessage()
    assert "HTTP 500" in error.getMessage()


def test_post_retry_warning_text(
    api_server: ScriptedServer, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A retry WARNING names the run, the attempt, the cause and the delay."""
    client, _ = make_client()
    api_server.respond(503, body=b"maintenance")

    post(client, "sync")

    [warning] = api_records(caplog, logging.WARNING)
    message = warning.getMessage()
    assert RUN_ID in message
    assert "attempt 1 of 4" in message
    assert "HTTP 503: maintenance" in message
    assert "retrying in 1 s" in message


def test_post_no_retries(api_server: ScriptedServer, make_client: ClientFactory) -> None:
    """With max_retries=0 a 500 fails after one request and no sleep."""
    client, sleeps = make_client(max_retries=0)
    api_server.respond(500)

    result = post(client, "sync")

    assert result == PostResult(False, "failed after 1 attempt: HTTP 500", 500)
    assert sleeps.delays == []
    assert len(api_server.requests) == 1


@pytest.mark.parametrize(
    ("retry_after", "expected_delay"),
    [
        pytest.param("7", 7.0, id="seconds"),
        pytest.param("120", 30.0, id="capped"),
        pytest.param("Wed, 21 Oct 2015 07:28:09 GMT", 9.0, id="http-date"),
        pytest.param("Wed, 21 Oct 2015 07:27:00 GMT", 0.0, id="past-date"),
        pytest.param("soon", 1.0, id="invalid"),
        pytest.param("-5", 1.0, id="negative"),
        pytest.param(None, 1.0, id="missing"),
    ],
)
def test_post_429_retry_after(
    retry_after: str | None,
    expected_delay: float,
    api_server: ScriptedServer,
    make_client: ClientFactory,
) -> None:
    """A 429 waits for Retry-After, capped at retry_after_max, else for the normal delay."""
    client, sleeps = make_client(retry_after_max=30)
    headers = {"Date": "Wed, 21 Oct 2015 07:28:00 GMT"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    api_server.respond(429, headers)

    result = post(client, "sync")

    assert result.success
    assert sleeps.delays == [expected_delay]


def test_post_503_retry_after(api_server: ScriptedServer, make_client: ClientFactory) -> None:
    """A 503 with Retry-After waits for it, as RFC 9110 allows for that status."""
    client, sleeps = make_client()
    api_server.respond(503, {"Retry-After": "5"})

    post(client, "sync")

    assert sleeps.delays == [5.0]


def test_post_500_ignores_retry_after(
    api_server: ScriptedServer, make_client: ClientFactory
) -> None:
    """Retry-After on a 500 is ignored in favour of the normal delay."""
    client, sleeps = make_client()
    api_server.respond(500, {"Retry-After": "20"})

    post(client, "sync")

    assert sleeps.delays == [1.0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", [400, 404, 422])
def test_post_4xx_not_retried(
    status: int,
    mode: str,
    api_server: ScriptedServer,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 4xx other than 429 fails at once, with the status and the body in the message."""
    client, sleeps = make_client()
    api_server.respond(status, body=b'{"error": "invalid field"}')

    result = post(client, mode)

    assert result == PostResult(False, f'HTTP {status}: {{"error": "invalid field"}}', status)
    assert len(api_server.requests) == 1
    assert sleeps.delays == []
    assert len(api_records(caplog, logging.ERROR)) == 1


def test_post_long_body_truncated(api_server: ScriptedServer, make_client: ClientFactory) -> None:
    """A long error body is cut to a one-line excerpt."""
    client, _ = make_client()
    api_server.respond(422, body=b"line one\nline two " + b"x" * 10_000)

    result = post(client, "sync")

    assert result.message.startswith("HTTP 422: line one line two xxx")
    assert result.message.endswith("...")
    assert len(result.message) <= len("HTTP 422: ") + EXCERPT_MAX_CHARS


def test_post_body_token_masked(api_server: ScriptedServer, make_client: ClientFactory) -> None:
    """A token echoed in an error body is replaced by ***."""
    client, _ = make_client()
    api_server.respond(400, body=f"unknown token {TOKEN}".encode())

    result = post(client, "sync")

    assert result.message == "HTTP 400: unknown token ***"


@pytest.mark.parametrize(
    "echo",
    [
        '{"auth": "Bearer abc\\/def+ghi"}',
        "token=abc%2Fdef%2Bghi",
        "path=/runs/abc/def%2Bghi",
    ],
)
def test_post_escaped_token_masked(
    api_server: ScriptedServer, make_client: ClientFactory, echo: str
) -> None:
    """A token echoed JSON-escaped or percent-encoded in an error body is masked too."""
    client, _ = make_client(api_token="abc/def+ghi")
    api_server.respond(400, body=echo.encode())

    result = post(client, "sync")

    assert "def" not in result.message
    assert "***" in result.message


def test_post_cut_token_masked(api_server: ScriptedServer, make_client: ClientFactory) -> None:
    """A token cut in two by the body read limit leaks no part of itself."""
    client, _ = make_client()
    body = b" " * (BODY_READ_LIMIT - 8) + TOKEN.encode() + b" " * 100
    api_server.respond(400, body=b"error" + body)

    result = post(client, "sync")

    assert result.message == "HTTP 400: error"


def test_post_redirect_not_followed(api_server: ScriptedServer, make_client: ClientFactory) -> None:
    """A redirect fails at once, with a hint to set the final URL."""
    client, _ = make_client()
    api_server.respond(307, {"Location": "/v2/runs"})

    result = post(client, "sync")

    assert result == PostResult(
        False, "HTTP 307; redirects are not followed, so set api_url to the final URL", 307
    )
    assert len(api_server.requests) == 1


@pytest.mark.parametrize("mode", MODES)
def test_post_timeout_retried(
    mode: str,
    api_server: ScriptedServer,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A response slower than the timeout is retried as a timeout."""
    client, sleeps = make_client(timeout=0.2)
    api_server.slow(2.0)

    result = post(client, mode)

    assert result == PostResult(True, "HTTP 200")
    assert sleeps.delays == [1]
    assert len(api_server.requests) == 2
    [warning] = api_records(caplog, logging.WARNING)
    assert "timed out (ReadTimeout)" in warning.getMessage()


@pytest.mark.parametrize("mode", MODES)
def test_post_dropped_connection_retried(
    mode: str,
    api_server: ScriptedServer,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection closed without a response is retried as a transport error."""
    client, sleeps = make_client()
    api_server.drop()

    result = post(client, mode)

    assert result == PostResult(True, "HTTP 200")
    assert sleeps.delays == [1]
    [warning] = api_records(caplog, logging.WARNING)
    assert "RemoteProtocolError" in warning.getMessage()


def test_post_refused_connection(make_client: ClientFactory, free_port: int) -> None:
    """A port with no listener is retried as a transport error, then given up."""
    client, sleeps = make_client(api_url=f"http://127.0.0.1:{free_port}/runs")

    result = post(client, "sync")

    assert result.message.startswith("failed after 4 attempts: ConnectError")
    assert sleeps.delays == [1, 2, 4]


# Deadline


@pytest.mark.parametrize("mode", MODES)
def test_post_hanging_server_deadline(
    mode: str, api_server: ScriptedServer, make_client: ClientFactory
) -> None:
    """A server that never responds ends the post at the deadline, with no sleep."""
    client, sleeps = make_client(timeout=10.0)
    api_server.hang()

    result = post(client, mode, deadline=time.monotonic() + 0.3)

    assert result == PostResult(
        False,
        "deadline reached after 1 attempt; left pending (last error: timed out (ReadTimeout))",
        unreachable=True,
    )
    assert len(api_server.requests) == 1
    assert sleeps.delays == []


@pytest.mark.parametrize("mode", MODES)
def test_post_deadline_stops_retries(
    mode: str, api_server: ScriptedServer, make_client: ClientFactory
) -> None:
    """No retry starts when its delay would pass the deadline."""
    clock = FakeClock()
    client, sleeps = make_client(clock=clock)
    api_server.respond(500, times=4)

    result = post(client, mode, deadline=clock() + 2.5)

    assert result == PostResult(
        False, "deadline reached after 2 attempts; left pending (last error: HTTP 500)", 500
    )
    assert sleeps.delays == [1]
    assert len(api_server.requests) == 2


def test_post_deadline_passed(api_server: ScriptedServer, make_client: ClientFactory) -> None:
    """A deadline already passed sends nothing."""
    clock = FakeClock()
    client, _ = make_client(clock=clock)

    result = post(client, "sync", deadline=clock() - 1)

    assert result == PostResult(False, "deadline reached after 0 attempts; left pending")
    assert api_server.requests == []


def test_post_retry_after_past_deadline(
    api_server: ScriptedServer, make_client: ClientFactory
) -> None:
    """A Retry-After that ends past the deadline stops the post instead of sleeping."""
    clock = FakeClock()
    client, sleeps = make_client(clock=clock)
    api_server.respond(429, {"Retry-After": "10"})

    result = post(client, "sync", deadline=clock() + 5)

    assert result.message.startswith("deadline reached after 1 attempt")
    assert sleeps.delays == []


# Skipped posts


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"api_enabled": False}, "skipped: api_enabled is false", id="disabled"),
        pytest.param({"api_url": ""}, "skipped: api_url is not set", id="no-url"),
    ],
)
def test_post_skipped(
    settings: dict[str, Any],
    message: str,
    api_server: ScriptedServer,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A disabled or unconfigured API sends nothing and logs the reason once."""
    client, _ = make_client(**settings)

    results = [post(client, "sync"), post(client, "async"), client.test_connection()]

    assert results == [PostResult(False, message)] * 3
    assert client.enabled is False
    assert api_server.requests == []
    assert len([r for r in caplog.records if r.name == "telemetry.api"]) == 1


def test_post_skipped_without_httpx(api_server: ScriptedServer) -> None:
    """Without httpx posts are skipped, and the WARNING appears once per process."""
    completed = run_python(
        f"""
        import json, logging, sys
        sys.modules["httpx"] = None
        logging.basicConfig(level=logging.DEBUG, format="%(name)s %(levelname)s %(message)s")
        from telemetry.api import APIClient
        from telemetry.config import TelemetryConfig
        from telemetry.models import APIPayload

        config = TelemetryConfig(environ={{}}, api_url={api_server.url!r}, api_token="t")
        payload = APIPayload(run_id="r1", agent_name="a", job_type="j", start_time={START!r})
        results = [APIClient(config).post_run_sync(payload) for _ in range(2)]
        print(json.dumps({{"enabled": APIClient(config).enabled, "results": results}}))
        """
    )

    assert completed.returncode == 0, completed.stderr
    output = json.loads(completed.stdout)
    assert output["enabled"] is False
    assert output["results"] == [[False, "skipped: httpx is not installed", None, False]] * 2
    assert completed.stderr.count("telemetry.api WARNING httpx is not installed") == 1
    assert api_server.requests == []


def test_import_leaves_httpx_unloaded() -> None:
    """Importing telemetry.api does not import httpx."""
    completed = run_python("import sys, telemetry.api; print('httpx' in sys.modules)")

    assert completed.stdout.strip() == "False", completed.stderr


def test_enabled_when_configured(make_client: ClientFactory) -> None:
    """enabled is True with a URL, api_enabled and httpx."""
    client, _ = make_client()

    assert client.enabled is True


def test_post_after_close_skipped(api_server: ScriptedServer, make_client: ClientFactory) -> None:
    """After close(), which may run twice, posts are skipped."""
    client, _ = make_client()
    post(client, "sync")
    client.close()
    client.close()

    results = [post(client, "sync"), post(client, "async")]

    assert results == [PostResult(False, "skipped: the API client is closed")] * 2
    assert len(api_server.requests) == 1


def test_aclose_closes(api_server: ScriptedServer, make_client: ClientFactory) -> None:
    """aclose() closes the client like close()."""
    client, _ = make_client()

    asyncio.run(client.aclose())

    assert post(client, "sync") == PostResult(False, "skipped: the API client is closed")


@pytest.mark.parametrize("mode", MODES)
def test_post_invalid_proxy_setting(
    mode: str,
    api_server: ScriptedServer,
    make_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A proxy variable httpx rejects fails the post instead of raising."""
    monkeypatch.setenv("HTTP_PROXY", "ftp://127.0.0.1:1")
    client, _ = make_client()

    result = post(client, mode)

    assert result.success is False
    assert result.message.startswith("cannot create the HTTP client (ValueError: ")
    assert api_server.requests == []


# Misuse and invalid values


def test_post_rejects_run_record(make_client: ClientFactory) -> None:
    """A RunRecord instead of an APIPayload raises TypeError naming the conversion."""
    client, _ = make_client()
    record = RunRecord(run_id=RUN_ID, agent_name="a", job_type="j", start_time=START)

    with pytest.raises(TypeError, match=r"APIPayload\.from_run_record"):
        client.post_run_sync(record)  # type: ignore[arg-type]


@pytest.mark.parametrize("run_id", ["run\nid", "rün-1", ""])
def test_post_invalid_run_id(
    run_id: str, api_server: ScriptedServer, make_client: ClientFactory
) -> None:
    """A run_id that cannot be an Idempotency-Key fails without a request."""
    client, _ = make_client()

    result = post(client, "sync", make_payload(run_id=run_id))

    assert result.success is False
    assert result.message.startswith("invalid run_id")
    assert api_server.requests == []


@pytest.mark.parametrize("token", ["tök-en", "tok en"])
def test_token_not_header_safe(token: str) -> None:
    """A token that cannot be sent in a header raises ConfigError, masked."""
    config = TelemetryConfig(environ={}, api_url="http://127.0.0.1:1/runs", api_token=token)

    with pytest.raises(ConfigError) as caught:
        APIClient(config)

    assert token not in str(caught.value)
    assert "***" in str(caught.value)


def test_repr_masks_token(make_client: ClientFactory, api_server: ScriptedServer) -> None:
    """repr shows the URL and *** for the token."""
    client, _ = make_client()

    assert repr(client) == f"APIClient(url={api_server.url!r}, token=***)"


def test_repr_masks_url_password(make_client: ClientFactory, free_port: int) -> None:
    """A password in the URL is masked in repr and in messages."""
    client, _ = make_client(api_url=f"http://user:{TOKEN}@127.0.0.1:{free_port}/runs")

    result = post(client, "sync")

    assert TOKEN not in repr(client)
    assert "user:***@127.0.0.1" in repr(client)
    assert result.success is False


@pytest.mark.parametrize("mode", MODES)
def test_log_masks_token_in_url(
    mode: str,
    api_server: ScriptedServer,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The token written in the URL's path and query is masked in the failure log line."""
    url = f"{api_server.base_url}/hooks/{TOKEN}?token={TOKEN}&region=eu"
    client, _ = make_client(api_url=url, max_retries=0)
    api_server.respond(500)

    result = post(client, mode)
    errors = [record.getMessage() for record in api_records(caplog, logging.ERROR)]

    assert result.success is False
    assert len(errors) == 1
    assert TOKEN not in errors[0]
    assert f"{api_server.base_url}/hooks/***?token=***&region=eu" in errors[0]
    assert TOKEN not in repr(client)


def test_log_masks_secret_query_value(
    api_server: ScriptedServer, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A secret query value other than the configured token is masked in log lines too."""
    client, _ = make_client(api_url=f"{api_server.url}?api_key=key-9c1e55&x=1", max_retries=0)
    api_server.respond(500, body=b"bad api_key key-9c1e55")

    result = post(client, "sync")
    errors = [record.getMessage() for record in api_records(caplog, logging.ERROR)]

    assert "key-9c1e55" not in result.message
    assert len(errors) == 1
    assert "key-9c1e55" not in errors[0]
    assert "?api_key=***&x=1" in errors[0]


# Threads and processes


def test_concurrent_posts(api_server: ScriptedServer, make_client: ClientFactory) -> None:
    """Posts from several threads share one client and all succeed."""
    client, _ = make_client()
    results: list[PostResult] = []

    def post_one(index: int) -> None:
        results.append(client.post_run_sync(make_payload(run_id=f"run-{index}")))

    threads = [threading.Thread(target=post_one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert results == [PostResult(True, "HTTP 200")] * 8
    keys = sorted(r.headers["Idempotency-Key"] for r in api_server.requests)
    assert keys == [f"run-{i}" for i in range(8)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_opens_own_connection(api_server: ScriptedServer) -> None:
    """A forked child posts on a new connection, and the parent keeps its own."""
    completed = run_python(
        f"""
        import os
        from telemetry.api import APIClient
        from telemetry.config import TelemetryConfig
        from telemetry.models import APIPayload

        client = APIClient(TelemetryConfig(environ={{}}, api_url={api_server.url!r}))
        def post(run_id):
            payload = APIPayload(run_id=run_id, agent_name="a", job_type="j", start_time={START!r})
            return client.post_run_sync(payload).success

        assert post("parent-1")
        pid = os.fork()
        if pid == 0:
            os._exit(0 if post("child") else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert post("parent-2")
        client.close()
        """
    )

    assert completed.returncode == 0, completed.stderr
    ports = {r.headers["Idempotency-Key"]: r.client_port for r in api_server.requests}
    assert ports["child"] != ports["parent-1"]
    assert ports["parent-2"] == ports["parent-1"]


# test_connection


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, PostResult(True, "reachable (HTTP 200)")),
        (405, PostResult(True, "reachable (HTTP 405)")),
        (401, PostResult(False, "token rejected (HTTP 401)")),
        (403, PostResult(False, "token rejected (HTTP 403)")),
        (503, PostResult(False, "HTTP 503")),
    ],
)
def test_connection_status(
    status: int, expected: PostResult, api_server: ScriptedServer, make_client: ClientFactory
) -> None:
    """test_connection sends one GET with the token and reports the status."""
    client, sleeps = make_client()
    api_server.respond(status)

    result = client.test_connection()

    assert result == expected
    [request] = api_server.requests
    assert request.method == "GET"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert sleeps.delays == []


def test_connection_refused(make_client: ClientFactory, free_port: int) -> None:
    """test_connection reports a port with no listener as a ConnectError, without retrying."""
    client, sleeps = make_client(api_url=f"http://127.0.0.1:{free_port}/runs")

    result = client.test_connection()

    assert result.success is False
    assert result.message.startswith("ConnectError")
    assert sleeps.delays == []
