"""``telemetry export --otlp``: send the runs in the journal as spans to a collector.

OpenTelemetry is imported only when the option is given, and a missing install is
reported with the command that adds it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from telemetry.cli._context import EXIT_OK, CommandContext, CommandError, UsageError
from telemetry.cli._output import plural, print_json
from telemetry.config import mask_url, url_secrets
from telemetry.models import RunRecord, parse_timestamp
from telemetry.otel import INSTALL_HINT

__all__ = ["export_otlp"]

# Options of export that write a file, and so have no meaning with --otlp.
_FILE_OPTIONS = (
    ("format", "--format"),
    ("output", "--output"),
    ("allow_formulas", "--allow-formulas"),
)


def export_otlp(
    args: argparse.Namespace, context: CommandContext, filters: Mapping[str, Any]
) -> int:
    """Send the ended runs that match ``filters`` as spans, and print what was sent.

    ``filters`` contains agent_name, status, since and until, as _runs._filters returns them.

    Raises:
        UsageError: a file option is given too, or ENDPOINT is not an http(s) URL.
        CommandError: OpenTelemetry is not installed, or the collector did not accept a
            batch of spans; the message names the endpoint with credentials masked.
    """
    for name, option in _FILE_OPTIONS:
        if getattr(args, name):
            raise UsageError(f"{option} writes a file, so it cannot go with --otlp: pass only one")
    try:
        from telemetry.otel._replay import ReplayError, replay_journal
        from telemetry.otel._setup import build_exporter, traces_endpoint
    except ImportError as exc:
        raise CommandError(
            f"--otlp needs OpenTelemetry, which cannot be imported ({exc}): install it with "
            f"{INSTALL_HINT}"
        ) from None

    endpoint = traces_endpoint(args.otlp or None)
    shown_endpoint = mask_url(endpoint)
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(
            f"the OTLP endpoint {shown_endpoint!r} is not an http:// or https:// URL: pass "
            "one such as http://127.0.0.1:4318"
        )

    with _collected_otel_errors() as errors:
        try:
            exporter = build_exporter(endpoint)
        except Exception as exc:
            raise CommandError(
                f"cannot create the OTLP exporter for {shown_endpoint}: "
                f"{_masked(f'{type(exc).__name__}: {exc}', endpoint)}. Check the "
                "OTEL_EXPORTER_OTLP_* settings"
            ) from None
        try:
            # A bar on a terminal only, so that piped output keeps one line per outcome.
            with context.progress("sending", 0, lines=False) as progress:
                result = replay_journal(
                    context.journal(),
                    exporter,
                    select=_selector(filters),
                    limit=args.limit,
                    progress=progress.update,
                )
        except ReplayError as exc:
            reason = _masked(exc.reason or (errors[-1] if errors else "no reason given"), endpoint)
            raise CommandError(
                f"the collector at {shown_endpoint} did not accept the spans ({reason}); "
                f"{exc.done.runs} of {plural(exc.total, 'run')} were sent before. Check that "
                "the collector runs and that the OTEL_EXPORTER_OTLP_* settings are right, then "
                "run the command again: runs sent twice keep their span ids"
            ) from None
        finally:
            shutdown: Callable[[], object] = exporter.shutdown  # declared without types
            shutdown()

    # The summary goes to stdout: unlike a file export, this command writes no data there.
    if args.json:
        print_json({"endpoint": shown_endpoint, **result._asdict()}, context.out)
    else:
        print(
            f"exported {plural(result.runs, 'run')} with {plural(result.events, 'event')} as "
            f"spans to {shown_endpoint}",
            file=context.out,
        )
        if result.skipped_running:
            print(
                f"skipped {plural(result.skipped_running, 'run')} still running, which have "
                "no end yet",
                file=context.out,
            )
        if result.skipped_invalid:
            print(
                f"skipped {plural(result.skipped_invalid, 'ended run')} without a valid end time",
                file=context.out,
            )
        if result.skipped_events:
            print(
                f"skipped {plural(result.skipped_events, 'invalid event line')}",
                file=context.out,
            )
    return EXIT_OK


def _selector(filters: Mapping[str, Any]) -> Callable[[RunRecord], bool]:
    """Return a function that returns whether a run matches the filters of export."""
    agent = filters.get("agent_name")
    status = filters.get("status")
    since = parse_timestamp(filters["since"]) if filters.get("since") else None
    until = parse_timestamp(filters["until"]) if filters.get("until") else None

    def select(run: RunRecord) -> bool:
        if agent is not None and run.agent_name != agent:
            return False
        if status is not None and run.status != status:
            return False
        if since is None and until is None:
            return True
        try:
            start = parse_timestamp(run.start_time)
        except ValueError:
            return False
        return (since is None or start >= since) and (until is None or start < until)

    return select


def _masked(message: str, endpoint: str) -> str:
    """Return ``message`` with the endpoint's credentials and the OTLP header values masked.

    An invalid header entry, such as ``Authorization: Bearer TOKEN``, is masked whole.
    """
    from telemetry.otel._setup import HEADERS_VARIABLES

    secrets = url_secrets(endpoint)
    for name in HEADERS_VARIABLES:
        for entry in os.environ.get(name, "").split(","):
            _, separator, value = entry.partition("=")
            secret = value.strip() if separator else entry.strip()
            if secret:
                secrets.extend((secret, unquote(secret)))
    for secret in sorted(set(secrets), key=len, reverse=True):
        message = message.replace(secret, "***")
    return " ".join(message.split())


class _ListHandler(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _collected_otel_errors() -> Iterator[list[str]]:
    """Collect the OpenTelemetry SDK's warnings and errors instead of printing them.

    The SDK logs each failed export on its own loggers, which would print the reason
    unmasked and once per retry. The command prints one line with the last reason instead.
    """
    messages: list[str] = []
    handler = _ListHandler(messages)
    otel_logger = logging.getLogger("opentelemetry")
    propagate = otel_logger.propagate
    otel_logger.addHandler(handler)
    otel_logger.propagate = False
    try:
        yield messages
    finally:
        otel_logger.removeHandler(handler)
        otel_logger.propagate = propagate
