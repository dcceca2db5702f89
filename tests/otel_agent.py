"""An agent for the OpenTelemetry tests, run in a subprocess with TELEMETRY_OTEL=1.

It records four runs with the client built from the environment: a root run with events,
a run nested in it, a failed run, and a run inside an active application span. It prints
their run ids as a JSON object on stdout and exits, which closes the client and flushes
the bridge within TELEMETRY_END_RUN_TIMEOUT.

The application span is a remote NonRecordingSpan with the ids APP_TRACE_ID and
APP_SPAN_ID and the tracestate APP_TRACE_STATE, as a propagated context gives. So the
process sets no TracerProvider, and the bridge builds its own.
"""

from __future__ import annotations

import json
import sys

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from telemetry import TelemetryClient

APP_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
APP_SPAN_ID = 0x00F067AA0BA902B7
APP_TRACE_STATE = "vendor=abc"


def main() -> int:
    """Record the runs and print their ids."""
    client = TelemetryClient()
    ids: dict[str, str] = {}
    with client.track_run("otel-agent", "sync", trigger_type="cron", product="search") as run:
        ids["root"] = run.run_id
        run.log_event("fetched", {"count": 3, "source": {"name": "feed", "pages": [1, 2]}})
        run.set_metrics(items_discovered=3, items_succeeded=3, metrics_json={"ratio": 0.5})
        with client.track_run("otel-agent-child", "step") as child:
            ids["child"] = child.run_id
            child.log_event("step", {"blob": b"\x00\x01", "big": 2**70})

    try:
        with client.track_run("otel-agent-failing", "sync") as failing:
            ids["failed"] = failing.run_id
            raise ValueError("feed unreachable")
    except ValueError:
        pass

    app_context = SpanContext(
        APP_TRACE_ID,
        APP_SPAN_ID,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState.from_header([APP_TRACE_STATE]),
    )
    with (
        trace.use_span(NonRecordingSpan(app_context)),
        client.track_run("otel-agent-in-app", "serve") as served,
    ):
        ids["in_app"] = served.run_id

    print(json.dumps(ids), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
