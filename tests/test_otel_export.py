"""End-to-end tests of the OpenTelemetry bridge over the wire, with real processes.

An agent runs in a subprocess with TELEMETRY_OTEL=1 and the bridge's own OTLP/HTTP
pipeline, and a ScriptedServer on 127.0.0.1 plays the collector: the tests decode the
protobuf requests it received. ``telemetry export --otlp`` replays the same journal to
it. Collectors that are down (a closed port) or hang (accept and never respond) must not
keep the agent from finishing or its runs from being stored.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs the otel extra")
from cli_support import command_environment, run_cli, run_json
from http_server import RecordedRequest, ScriptedServer
from otel_agent import APP_SPAN_ID, APP_TRACE_ID, APP_TRACE_STATE
from otlp_support import WireSpan, decode_requests, spans_by_name

from telemetry.otel import format_span_id, format_trace_id, run_span_id, run_trace_id

AGENT_SCRIPT = Path(__file__).parent / "otel_agent.py"
PROCESS_TIMEOUT = 60.0
"""A cap for a hung test, far above what a run takes; no test asserts a duration."""
HEADER_SECRET = "otlp-key-7d1e93f0b2"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def otel_environment(data_dir: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """Return the environment of an agent or command that sends spans to ``endpoint``.

    OTEL_* and proxy variables of the test's own environment are left out, so that the
    exporter sends straight to the loopback server with the settings given here.
    """
    environ = {
        key: value
        for key, value in command_environment().items()
        if not key.startswith("OTEL_")
        and key.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    environ.update(
        {
            "NO_PROXY": "127.0.0.1",
            "TELEMETRY_DATA_DIR": str(data_dir),
            "TELEMETRY_OTEL": "1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
            "OTEL_EXPORTER_OTLP_HEADERS": f"x-api-key={HEADER_SECRET}",
            "TELEMETRY_END_RUN_TIMEOUT": "10",
            # Spans are exported at exit only, in one request, whatever the machine's speed.
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
        }
    )
    environ.update(extra)
    return environ


def run_agent(environ: dict[str, str]) -> tuple[dict[str, str], subprocess.CompletedProcess[str]]:
    """Run the agent script; return the run ids it printed and the finished process."""
    result = subprocess.run(
        [sys.executable, str(AGENT_SCRIPT)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout), result


def replay(data_dir: Path, environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``telemetry export --otlp ARGS`` against the store in ``data_dir``."""
    return run_cli("export", "--otlp", *args, data_dir=data_dir, env=environ)


def journal_text(data_dir: Path) -> str:
    """Return the text of every journal file in the store."""
    return "".join(path.read_text("utf-8") for path in sorted((data_dir / "journal").iterdir()))


def without_instance_id(span: WireSpan) -> WireSpan:
    """Return ``span`` without the resource's service.instance.id.

    The SDK gives each process a new random service.instance.id, and a replay runs in
    another process than the agent.
    """
    resource = tuple(item for item in span.resource if item[0] != "service.instance.id")
    return dataclasses.replace(span, resource=resource)


@pytest.fixture
def collector() -> Iterator[ScriptedServer]:
    """Yield a ScriptedServer on 127.0.0.1 that accepts every OTLP request with 200."""
    with ScriptedServer() as server:
        yield server


@dataclasses.dataclass(frozen=True)
class LiveRun:
    """What one run of the agent script against a collector left."""

    data_dir: Path
    ids: dict[str, str]
    spans: list[WireSpan]
    requests: list[RecordedRequest]


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> LiveRun:
    """Run the agent once against a collector, for the tests that only read the result."""
    data_dir = tmp_path_factory.mktemp("live") / "store"
    with ScriptedServer() as server:
        ids, _ = run_agent(otel_environment(data_dir, server.base_url))
        requests = server.requests
    return LiveRun(data_dir, ids, decode_requests(requests), requests)


# --- live export --------------------------------------------------------------------------


def test_live_spans_received(live_run: LiveRun) -> None:
    """Every run of the agent reaches the collector as one span with its stable ids."""
    ids, spans = live_run.ids, live_run.spans
    by_name = spans_by_name(spans)

    assert sorted(by_name) == [
        "otel-agent sync",
        "otel-agent-child step",
        "otel-agent-failing sync",
        "otel-agent-in-app serve",
    ]
    for name, key in [
        ("otel-agent sync", "root"),
        ("otel-agent-child step", "child"),
        ("otel-agent-failing sync", "failed"),
        ("otel-agent-in-app serve", "in_app"),
    ]:
        assert by_name[name].span_id == format_span_id(run_span_id(ids[key]))
        assert by_name[name].attribute("agent_telemetry.run_id") == ids[key]


def test_live_span_fields(live_run: LiveRun) -> None:
    """The root span carries the run's fields, events and status as documented."""
    ids, spans = live_run.ids, live_run.spans
    root = spans_by_name(spans)["otel-agent sync"]

    assert root.trace_id == format_trace_id(run_trace_id(ids["root"]))
    assert root.parent_span_id == ""
    assert root.kind == 1
    assert root.status_code == 1
    assert root.scope == "agent-telemetry"
    assert dict(root.resource)["service.name"] == "agent-telemetry"
    assert root.attribute("agent_telemetry.trigger_type") == "cron"
    assert root.attribute("agent_telemetry.product") == "search"
    assert root.attribute("agent_telemetry.items_succeeded") == 3
    assert root.attribute("agent_telemetry.metrics.ratio") == 0.5
    assert root.end_ns >= root.start_ns
    assert [event[0] for event in root.events] == ["fetched"]
    assert dict(root.events[0][2]) == {"count": 3, "source.name": "feed", "source.pages": (1, 2)}


def test_live_nested_and_app_spans(live_run: LiveRun) -> None:
    """A nested run is a child of its parent's span; a run in an app span is its child."""
    ids, spans = live_run.ids, live_run.spans
    by_name = spans_by_name(spans)
    child = by_name["otel-agent-child step"]
    in_app = by_name["otel-agent-in-app serve"]

    assert child.trace_id == format_trace_id(run_trace_id(ids["root"]))
    assert child.parent_span_id == format_span_id(run_span_id(ids["root"]))
    assert dict(child.events[0][2]) == {"blob": "base64:AAE=", "big": "1180591620717411303424"}
    assert in_app.trace_id == format_trace_id(APP_TRACE_ID)
    assert in_app.parent_span_id == format_span_id(APP_SPAN_ID)
    assert in_app.parent_is_remote is True
    assert in_app.trace_state == APP_TRACE_STATE
    assert child.parent_is_remote is False


def test_live_failed_span(live_run: LiveRun) -> None:
    """A failed run's span has status ERROR and an exception event from its traceback."""
    spans = live_run.spans
    failed = spans_by_name(spans)["otel-agent-failing sync"]
    exception = failed.events[-1]

    assert failed.status_code == 2
    assert failed.status_message == "ValueError: feed unreachable"
    assert exception[0] == "exception"
    assert exception[1] == failed.end_ns
    assert dict(exception[2])["exception.type"] == "ValueError"
    assert dict(exception[2])["exception.message"] == "feed unreachable"
    assert "Traceback" in dict(exception[2])["exception.stacktrace"]


def test_live_headers_sent(live_run: LiveRun) -> None:
    """The exporter sends OTEL_EXPORTER_OTLP_HEADERS, and the secret is in no record."""
    data_dir = live_run.data_dir

    assert live_run.requests[0].headers["x-api-key"] == HEADER_SECRET
    assert HEADER_SECRET not in journal_text(data_dir)


def test_live_context_journaled(live_run: LiveRun) -> None:
    """Only the run inside the application span has an otel.context event."""
    data_dir, ids = live_run.data_dir, live_run.ids
    contexts = [
        orjson.loads(line)
        for line in journal_text(data_dir).splitlines()
        if '"otel.context"' in line
    ]

    assert [record["run_id"] for record in contexts] == [ids["in_app"]]
    assert contexts[0]["payload"] == {
        "trace_id": format_trace_id(APP_TRACE_ID),
        "parent_span_id": format_span_id(APP_SPAN_ID),
        "parent_is_remote": True,
        "trace_state": APP_TRACE_STATE,
    }


# --- replay -------------------------------------------------------------------------------


def test_replay_equals_live(live_run: LiveRun, tmp_path: Path) -> None:
    """A replay of the journal sends the spans the live bridge sent, field by field."""
    data_dir, live_spans = live_run.data_dir, live_run.spans
    with ScriptedServer() as second:
        result = replay(data_dir, otel_environment(tmp_path / "unused", second.base_url))
        replayed = decode_requests(second.requests)

    assert result.returncode == 0, result.stderr
    assert "exported 4 runs with 2 events as spans" in result.stdout
    assert result.stderr == ""
    assert sorted(map(without_instance_id, replayed), key=lambda span: span.name) == sorted(
        map(without_instance_id, live_spans), key=lambda span: span.name
    )


def test_replay_twice_identical(live_run: LiveRun, tmp_path: Path) -> None:
    """Two replays to an endpoint given on the command line send identical spans."""
    data_dir = live_run.data_dir
    environ = otel_environment(tmp_path / "unused", "http://127.0.0.1:9")
    with ScriptedServer() as first, ScriptedServer() as second:
        first_result = replay(data_dir, environ, first.base_url)
        second_result = replay(data_dir, environ, second.base_url + "/v1/traces")
        first_spans = decode_requests(first.requests)
        second_spans = decode_requests(second.requests)

    assert first_result.returncode == 0, first_result.stderr
    assert second_result.returncode == 0, second_result.stderr
    assert len(first_spans) == 4
    assert list(map(without_instance_id, first_spans)) == list(
        map(without_instance_id, second_spans)
    )


def test_replay_filters_and_json(live_run: LiveRun, tmp_path: Path) -> None:
    """--agent selects runs, and --json prints the counts as an object on stdout."""
    data_dir, ids = live_run.data_dir, live_run.ids
    with ScriptedServer() as server:
        summary = run_json(
            "export",
            "--otlp",
            server.base_url,
            "--agent",
            "otel-agent-child",
            data_dir=data_dir,
            env=otel_environment(tmp_path / "unused", server.base_url),
        )
        spans = decode_requests(server.requests)

    assert summary["runs"] == 1
    assert summary["events"] == 1
    assert [span.attribute("agent_telemetry.run_id") for span in spans] == [ids["child"]]


def test_replay_collector_down(live_run: LiveRun, tmp_path: Path, free_port: int) -> None:
    """A replay to a closed port exits 1 with one line naming the endpoint and the fix."""
    data_dir = live_run.data_dir
    endpoint = f"http://127.0.0.1:{free_port}"
    environ = otel_environment(tmp_path / "unused", endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="0.5")

    result = replay(data_dir, environ)

    assert result.returncode == 1
    assert f"the collector at {endpoint}/v1/traces did not accept the spans" in result.stderr
    assert "0 of 4 runs were sent" in result.stderr
    assert "run the command again" in result.stderr
    assert HEADER_SECRET not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_replay_collector_rejects(live_run: LiveRun, tmp_path: Path) -> None:
    """A collector that responds 400 makes the replay exit 1, and the password is masked."""
    data_dir = live_run.data_dir
    with ScriptedServer() as server:
        server.respond(400, body=b"bad request")
        endpoint = f"http://user:pa55word@127.0.0.1:{server.port}"
        result = replay(data_dir, otel_environment(tmp_path / "unused", endpoint))

    assert result.returncode == 1
    assert "did not accept the spans" in result.stderr
    assert "pa55word" not in result.stderr
    assert "user:***@127.0.0.1" in result.stderr


def test_replay_rejects_file_options(tmp_path: Path) -> None:
    """--otlp with --output is a usage error, because --output writes a file."""
    result = run_cli("export", "--otlp", "--output", "runs.csv", data_dir=tmp_path)

    assert result.returncode == 2
    assert "--output writes a file, so it cannot go with --otlp" in result.stderr


def test_replay_rejects_bad_endpoint(tmp_path: Path) -> None:
    """An endpoint that is not an http(s) URL is a usage error naming it."""
    result = run_cli("export", "--otlp", "ftp://127.0.0.1/x", data_dir=tmp_path)

    assert result.returncode == 2
    assert "ftp://127.0.0.1/x/v1/traces' is not an http:// or https:// URL" in result.stderr


# --- collectors that fail -----------------------------------------------------------------


def stored_run_ids(data_dir: Path) -> set[str]:
    """Return the run ids in the store's index, read by ``telemetry runs --json``."""
    runs = run_json("runs", "--limit", "100", data_dir=data_dir)
    return {run["run_id"] for run in runs}


def journaled_run_ids(data_dir: Path) -> set[str]:
    """Return the ids of the runs with a run_end line in the journal."""
    return {
        orjson.loads(line)["run_id"]
        for line in journal_text(data_dir).splitlines()
        if '"record_type":"run_end"' in line
    }


def test_collector_down_run_stored(tmp_path: Path, free_port: int) -> None:
    """With the collector's port closed, the agent exits 0 and its runs are stored."""
    data_dir = tmp_path / "store"
    environ = otel_environment(
        data_dir,
        f"http://127.0.0.1:{free_port}",
        OTEL_EXPORTER_OTLP_TIMEOUT="0.5",
        TELEMETRY_END_RUN_TIMEOUT="0.2",
    )

    ids, _ = run_agent(environ)

    assert journaled_run_ids(data_dir) == set(ids.values())
    assert stored_run_ids(data_dir) == set(ids.values())


def test_collector_hangs_run_stored(tmp_path: Path) -> None:
    """A collector that never responds does not keep the agent from exiting with its runs."""
    data_dir = tmp_path / "store"
    with ScriptedServer() as server:
        server.hang(times=20)
        environ = otel_environment(
            data_dir,
            server.base_url,
            OTEL_EXPORTER_OTLP_TIMEOUT="30",
            TELEMETRY_END_RUN_TIMEOUT="0.2",
        )
        ids, result = run_agent(environ)
        requests = len(server.requests)
        endpoint = f"{server.base_url}/v1/traces"

    assert requests >= 1
    assert f"were not all exported to {endpoint} within 1.0 s" in result.stderr
    assert "TELEMETRY_END_RUN_TIMEOUT (0.2 s)" in result.stderr
    assert journaled_run_ids(data_dir) == set(ids.values())
    assert stored_run_ids(data_dir) == set(ids.values())


def test_collector_rejects_logged(tmp_path: Path, collector: ScriptedServer) -> None:
    """Spans the collector rejects are logged with the endpoint and the fix, not the key."""
    data_dir = tmp_path / "store"
    collector.respond(400, body=b"rejected", times=10)

    ids, result = run_agent(otel_environment(data_dir, collector.base_url))

    assert f"to {collector.base_url}/v1/traces" in result.stderr
    assert "failed to export 4 run spans" in result.stderr
    assert "telemetry export --otlp" in result.stderr
    assert HEADER_SECRET not in result.stderr
    assert stored_run_ids(data_dir) == set(ids.values())


def test_full_queue_drops_spans(tmp_path: Path) -> None:
    """With the exporter stuck and a queue of one span, spans are dropped with the SDK's
    warning, and nothing is raised into the agent."""
    data_dir = tmp_path / "store"
    with ScriptedServer() as server:
        server.hang(times=20)
        environ = otel_environment(
            data_dir,
            server.base_url,
            OTEL_EXPORTER_OTLP_TIMEOUT="30",
            OTEL_BSP_MAX_QUEUE_SIZE="1",
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE="1",
            TELEMETRY_END_RUN_TIMEOUT="0.2",
        )
        ids, result = run_agent(environ)

    assert "Queue full, dropping" in result.stderr
    assert stored_run_ids(data_dir) == set(ids.values())


def test_invalid_bsp_setting_logged(tmp_path: Path, collector: ScriptedServer) -> None:
    """An OTEL_BSP_* value the SDK rejects is logged once; the runs are stored."""
    data_dir = tmp_path / "store"
    environ = otel_environment(data_dir, collector.base_url, OTEL_BSP_MAX_QUEUE_SIZE="1")

    ids, result = run_agent(environ)

    assert result.stderr.count("cannot set up OpenTelemetry") == 1
    assert collector.requests == []
    assert stored_run_ids(data_dir) == set(ids.values())


_LEFT_OPEN_SCRIPT = """
from telemetry import TelemetryClient
client = TelemetryClient()
print(client.start_run("left-open", "job"), flush=True)
"""


def test_open_run_abandoned_at_exit(tmp_path: Path, collector: ScriptedServer) -> None:
    """A run still open at exit is ended as abandoned, and its span still reaches the
    collector, because the client ends it before the pipeline flushes."""
    result = subprocess.run(
        [sys.executable, "-c", _LEFT_OPEN_SCRIPT],
        env=otel_environment(tmp_path / "store", collector.base_url),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    spans = decode_requests(collector.requests)

    assert result.returncode == 0, result.stderr
    assert [span.attribute("agent_telemetry.run_id") for span in spans] == [result.stdout.strip()]
    assert spans[0].attribute("agent_telemetry.status") == "abandoned"
    assert spans[0].status_code == 2


# --- without the extra --------------------------------------------------------------------

# Run in a subprocess: a meta path finder that makes every opentelemetry module
# unimportable, as if the extra were not installed, then one run with the client.
_BLOCKED_SCRIPT = """
import json, logging, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

if sys.argv[1] == "block":
    sys.meta_path.insert(0, Blocker())
logging.basicConfig(format="%(levelname)s %(name)s %(message)s")
from telemetry import TelemetryClient
client = TelemetryClient()
with client.track_run("plain-agent", "sync") as run:
    run.log_event("step", {"n": 1})
second = TelemetryClient()
client.close()
second.close()
print(json.dumps(sorted(name for name in sys.modules if name.startswith("opentelemetry"))))
"""


def run_blocked(data_dir: Path, mode: str, otel: str) -> subprocess.CompletedProcess[str]:
    """Run _BLOCKED_SCRIPT with opentelemetry blocked or not, and TELEMETRY_OTEL=otel."""
    environ = command_environment({"TELEMETRY_DATA_DIR": str(data_dir), "TELEMETRY_OTEL": otel})
    environ = {key: value for key, value in environ.items() if not key.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED_SCRIPT, mode],
        env=environ,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.parametrize("mode", ["block", "allow"])
def test_bridge_off_imports_nothing(tmp_path: Path, mode: str) -> None:
    """With TELEMETRY_OTEL off, no opentelemetry module is imported, installed or not."""
    result = run_blocked(tmp_path, mode, "0")

    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout) == []
    assert result.stderr == ""
    assert len(stored_run_ids(tmp_path)) == 1


def test_bridge_missing_warns_once(tmp_path: Path) -> None:
    """TELEMETRY_OTEL=1 without OpenTelemetry logs one WARNING with the fix; runs are kept."""
    result = run_blocked(tmp_path, "block", "1")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]

    assert result.returncode == 0, result.stderr
    assert len(warnings) == 1
    assert "OpenTelemetry cannot be imported" in warnings[0]
    assert "pip install 'agent-telemetry[otel]'" in warnings[0]
    assert len(stored_run_ids(tmp_path)) == 1


def test_sdk_disabled_no_spans(tmp_path: Path, collector: ScriptedServer) -> None:
    """OTEL_SDK_DISABLED=true keeps the bridge off: nothing is sent, runs are stored."""
    data_dir = tmp_path / "store"
    environ = otel_environment(data_dir, collector.base_url, OTEL_SDK_DISABLED="true")

    ids, _ = run_agent(environ)

    assert collector.requests == []
    assert stored_run_ids(data_dir) == set(ids.values())


# --- settings and process life ------------------------------------------------------------

_TOKEN = "tok-5b0c2e8f"
_ONE_RUN_SCRIPT = """
import logging, sys
if sys.argv[1] == "basic":
    logging.basicConfig()
from telemetry import TelemetryClient
client = TelemetryClient()
with client.track_run("one-run", "job"):
    pass
"""


def run_script(
    script: str, environ: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with ``python -c`` and ARGS in ``environ``; fail on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("logging_setup", ["none", "basic"])
def test_invalid_header_masked(
    tmp_path: Path, collector: ScriptedServer, logging_setup: str
) -> None:
    """An invalid OTEL_EXPORTER_OTLP_HEADERS entry is logged once without its value, and the
    valid entries are sent."""
    environ = otel_environment(
        tmp_path / "store",
        collector.base_url,
        OTEL_EXPORTER_OTLP_HEADERS=f"Authorization: Bearer {_TOKEN}, x-api-key={HEADER_SECRET}",
    )

    result = run_script(_ONE_RUN_SCRIPT, environ, logging_setup)
    (request,) = collector.requests

    assert _TOKEN not in result.stderr
    assert result.stderr.count("is not a valid name=value header") == 1
    assert "entry 1 of OTEL_EXPORTER_OTLP_HEADERS (Authorization: ***)" in result.stderr
    assert "authorization" not in request.headers
    assert request.headers["x-api-key"] == HEADER_SECRET


def test_invalid_traces_header_masked(tmp_path: Path, collector: ScriptedServer) -> None:
    """OTEL_EXPORTER_OTLP_TRACES_HEADERS wins; its entries without a name or an = are masked
    whole, and URL-encoded values are decoded."""
    environ = otel_environment(
        tmp_path / "store",
        collector.base_url,
        OTEL_EXPORTER_OTLP_TRACES_HEADERS=f"x-key=a%20b,={_TOKEN},{_TOKEN}",
    )

    result = run_script(_ONE_RUN_SCRIPT, environ, "basic")
    (request,) = collector.requests

    assert _TOKEN not in result.stderr
    assert "entry 2 of OTEL_EXPORTER_OTLP_TRACES_HEADERS (***)" in result.stderr
    assert "entry 3 of OTEL_EXPORTER_OTLP_TRACES_HEADERS (***)" in result.stderr
    assert request.headers["x-key"] == "a b"
    assert "x-api-key" not in request.headers


def test_header_control_character_left_out(tmp_path: Path, collector: ScriptedServer) -> None:
    """A header value that decodes to a control character is not sent, so the HTTP client's
    error, which would show the value, never happens."""
    environ = otel_environment(
        tmp_path / "store",
        collector.base_url,
        OTEL_EXPORTER_OTLP_HEADERS=f"x-bad=ab%0A{_TOKEN},x-api-key={HEADER_SECRET}",
    )

    result = run_script(_ONE_RUN_SCRIPT, environ, "none")
    (request,) = collector.requests

    assert _TOKEN not in result.stderr
    assert "entry 1 of OTEL_EXPORTER_OTLP_HEADERS (***)" in result.stderr
    assert "x-bad" not in request.headers
    assert request.headers["x-api-key"] == HEADER_SECRET


def test_replay_invalid_header_masked(live_run: LiveRun, tmp_path: Path) -> None:
    """A replay logs an invalid header entry without its value and still sends the runs."""
    with ScriptedServer() as server:
        environ = otel_environment(
            tmp_path / "unused",
            server.base_url,
            OTEL_EXPORTER_OTLP_HEADERS=f"Authorization: Bearer {_TOKEN}",
        )
        result = replay(live_run.data_dir, environ)
        spans = decode_requests(server.requests)

    assert result.returncode == 0, result.stderr
    assert _TOKEN not in result.stdout + result.stderr
    assert "(Authorization: ***) is not a valid name=value header" in result.stderr
    assert len(spans) == 4


# A client, then the modules that its first run, the export and close() import.
_IMPORTS_SCRIPT = """
import json, sys
from telemetry import TelemetryClient
client = TelemetryClient()
before = set(sys.modules)
with client.track_run("imports", "job") as run:
    run.log_event("step", {"n": 1})
client.close()
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_first_run_imports_nothing(tmp_path: Path, collector: ScriptedServer) -> None:
    """The client's constructor imports every module that the bridge's pipeline needs, so
    that a fork during the first run cannot inherit a held import lock."""
    result = run_script(_IMPORTS_SCRIPT, otel_environment(tmp_path / "store", collector.base_url))

    assert orjson.loads(result.stdout) == []
    assert len(decode_requests(collector.requests)) == 1


# Threads start their first run spans, the first of which builds the bridge's pipeline,
# while the main thread forks children. Each child records a span, shuts the bridge down
# and exits; a child that hangs is killed by its alarm, and counted. The script drives
# the bridge without a client, because a fork while another thread is inside SQLite can
# hang the child's index for reasons of its own.
_FORK_SCRIPT = """
import json, os, signal, sys, threading, time
from telemetry import RunRecord, TelemetryConfig
from telemetry.otel import open_bridge

START = "2026-12-04T10:00:00+00:00"
bridge = open_bridge(TelemetryConfig(otel=True))
go = threading.Event()

def record_span(name):
    record = RunRecord(run_id=name, agent_name=name, job_type="job", start_time=START)
    bridge.start_run(record)
    record.status, record.end_time = "success", START
    bridge.end_run(record)

def work(number):
    go.wait()
    record_span(f"parent-{number}")

threads = [threading.Thread(target=work, args=(number,)) for number in range(4)]
for thread in threads:
    thread.start()
go.set()
children = []
for number in range(int(sys.argv[1])):
    time.sleep(0.002)
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        record_span(f"child-{number}")
        bridge.shutdown()
        os._exit(0)
    children.append(pid)
statuses = [os.waitpid(pid, 0)[1] for pid in children]
for thread in threads:
    thread.join()
print(json.dumps([status for status in statuses if status != 0]))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_during_first_run(tmp_path: Path, collector: ScriptedServer) -> None:
    """Children forked while the parent's threads start their first runs do not hang."""
    environ = otel_environment(tmp_path / "store", collector.base_url)

    result = run_script(_FORK_SCRIPT, environ, "30")

    assert orjson.loads(result.stdout) == []


def test_zero_timeout_spans_exported(tmp_path: Path, collector: ScriptedServer) -> None:
    """With TELEMETRY_END_RUN_TIMEOUT=0 the exit still flushes the spans of a short program."""
    environ = otel_environment(
        tmp_path / "store", collector.base_url, TELEMETRY_END_RUN_TIMEOUT="0"
    )

    ids, result = run_agent(environ)
    spans = decode_requests(collector.requests)

    assert {span.attribute("agent_telemetry.run_id") for span in spans} == set(ids.values())
    assert "were not all exported" not in result.stderr


def test_zero_timeout_warning_names_setting(tmp_path: Path) -> None:
    """When the exit's bound runs out with TELEMETRY_END_RUN_TIMEOUT=0, the WARNING names
    that setting."""
    with ScriptedServer() as server:
        server.hang(times=20)
        environ = otel_environment(
            tmp_path / "store",
            server.base_url,
            OTEL_EXPORTER_OTLP_TIMEOUT="30",
            TELEMETRY_END_RUN_TIMEOUT="0",
        )
        _, result = run_agent(environ)

    assert "within 1.0 s" in result.stderr
    assert "the larger of TELEMETRY_END_RUN_TIMEOUT (0 s) and 1 s" in result.stderr


# Clients dropped without close(): each bridge's pipeline must be shut down once the
# bridge is collected, not at exit. Waits at most 30 s for the processor threads to end.
_DROPPED_SCRIPT = """
import gc, json, threading, time
from telemetry import TelemetryClient

def processors():
    return [t for t in threading.enumerate() if t.name.startswith("OtelBatchSpan")]

for number in range(3):
    client = TelemetryClient()
    with client.track_run("dropped", f"job{number}"):
        pass
    del client
gc.collect()
deadline = time.monotonic() + 30
while processors() and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps(len(processors())), flush=True)
"""


def test_dropped_client_pipeline_shut_down(tmp_path: Path, collector: ScriptedServer) -> None:
    """A client dropped without close() has its span pipeline flushed and shut down when it
    is collected, before the exit."""
    result = run_script(_DROPPED_SCRIPT, otel_environment(tmp_path / "store", collector.base_url))
    spans = decode_requests(collector.requests)

    assert orjson.loads(result.stdout) == 0
    assert sorted(span.name for span in spans) == ["dropped job0", "dropped job1", "dropped job2"]


_DROPPED_AT_EXIT_SCRIPT = """
from telemetry import TelemetryClient
for number in range(3):
    client = TelemetryClient()
    with client.track_run("dropped", f"job{number}"):
        pass
    del client
"""


def test_dropped_client_spans_at_exit(tmp_path: Path, collector: ScriptedServer) -> None:
    """Spans of clients dropped just before the exit still reach the collector: the exit
    waits for the shutdowns that their collection started."""
    run_script(_DROPPED_AT_EXIT_SCRIPT, otel_environment(tmp_path / "store", collector.base_url))
    spans = decode_requests(collector.requests)

    assert sorted(span.name for span in spans) == ["dropped job0", "dropped job1", "dropped job2"]
