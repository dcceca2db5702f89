"""``telemetry flush``: post the runs that are waiting for the API."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from telemetry.cli._args import parse_count, parse_duration
from telemetry.cli._context import EXIT_OK, EXIT_PROBLEM, CommandContext, CommandError
from telemetry.cli._output import plural, print_json

__all__ = ["register"]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)

# Wrapped by hand, because RawDescriptionHelpFormatter keeps the line breaks.
_DESCRIPTION = """\
Post the runs that are waiting for the API (TELEMETRY_API_URL), with a progress bar on
a terminal, and print how many were posted, failed and are still pending.
"""
_EPILOG = """\
examples:
  TELEMETRY_API_URL=https://telemetry.example.com/runs telemetry flush
  telemetry flush --limit 100 --timeout 1m

Posts each pending run (an ended run that the API has not accepted yet), oldest first,
with the retries of the library's API client. No post starts after --timeout; the runs
not tried by then stay pending. Flush stops early when the API rejects the token (HTTP
401 or 403), or when 3 posts in a row cannot reach it (connection refused, DNS failure,
timeout). Posting works even when TELEMETRY_ENABLED is false, which only stops agents
from recording. Exit code 1 when a post failed, or runs were left untried.
"""


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``flush`` subcommand's parser to ``commands``."""
    parser = commands.add_parser(
        "flush",
        parents=[common],
        help="post pending runs to the API",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--limit", type=parse_count, metavar="N", help="post at most N runs (default: all)"
    )
    parser.add_argument(
        "--timeout",
        type=_parse_timeout,
        default=DEFAULT_TIMEOUT,
        metavar="DURATION",
        help=(
            "start no post after this long, such as 90s or 10m; a plain number is seconds "
            "(default: 5m)"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=flush)


def flush(args: argparse.Namespace, context: CommandContext) -> int:
    """Post the pending runs and print the summary. Exit code 1: a post failed or was not tried.

    Raises:
        CommandError: TELEMETRY_API_URL is not set or invalid, posting is switched off,
            or the client posted nothing while runs stay pending.
    """
    config = context.config
    if config.api_url is None:
        raise CommandError(_missing_url_message(context))
    if not config.api_enabled:
        raise CommandError(
            "TELEMETRY_API_ENABLED is false, so posting is switched off: set it to true "
            "to post runs"
        )

    index = context.open_index()
    pending = index.count_pending_api_posts()
    to_post = pending if args.limit is None else min(pending, args.limit)
    posted = failed = not_tried = 0
    stopped_reason = None
    if to_post:
        with context.progress("posting", to_post) as progress:
            result = context.client().flush_pending(
                limit=args.limit,
                progress=progress.update,
                timeout=args.timeout.total_seconds(),
            )
        posted, failed, not_tried = result.posted, result.failed, result.remaining
        stopped_reason = result.stopped_reason
    still_pending = index.count_pending_api_posts()
    if to_post and posted + failed + not_tried == 0 and still_pending:
        # The client found nothing to post, yet runs are still pending, so it did not
        # post at all: it could not open the index or the API. Its log line above gives
        # the reason. With nothing pending, another process posted the runs meanwhile.
        # NOTE: a run that ends after another process posted the others, and before the
        # count above, also lands here, although nothing failed.
        raise CommandError(
            f"no run was posted, and {plural(still_pending, 'run')} still "
            f"{'waits' if still_pending == 1 else 'wait'} for the API: see the message above"
        )

    summary: dict[str, Any] = {
        "posted": posted,
        "failed": failed,
        "not_tried": not_tried,
        "still_pending": still_pending,
        "stopped_reason": stopped_reason,
    }
    if args.json:
        print_json(summary, context.out)
    else:
        _print_summary(summary, args.timeout, context)
    return EXIT_PROBLEM if failed or not_tried or stopped_reason else EXIT_OK


def _print_summary(
    summary: dict[str, Any], timeout: datetime.timedelta, context: CommandContext
) -> None:
    line = (
        f"posted {summary['posted']}, failed {summary['failed']}, "
        f"still pending {summary['still_pending']}"
    )
    tried = summary["posted"] + summary["failed"]
    if summary["stopped_reason"] is not None:
        line += (
            f"; stopped after {tried} of {tried + summary['not_tried']} runs, "
            f"because {summary['stopped_reason']}"
        )
    elif summary["not_tried"]:
        line += f" ({summary['not_tried']} not tried before the {_seconds(timeout)} timeout)"
    print(line, file=context.out)


def _missing_url_message(context: CommandContext) -> str:
    """Return why there is no API URL: the variable is invalid, or it is not set."""
    for error in context.ignored_settings:
        if error.key == "TELEMETRY_API_URL":
            # The error shows the URL with its credentials masked, as config.mask_url does.
            return f"TELEMETRY_API_URL is invalid, so there is no API to post to ({error})"
    return (
        "TELEMETRY_API_URL is not set, so there is no API to post to: set it to the "
        "URL that runs are posted to, such as https://telemetry.example.com/runs"
    )


def _seconds(duration: datetime.timedelta) -> str:
    return f"{duration.total_seconds():g} s"


def _parse_timeout(text: str) -> datetime.timedelta:
    """Parse --timeout: a duration such as 90s or 10m, or a plain number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        return parse_duration(text)
    if not 0 < seconds < 1e9:
        raise argparse.ArgumentTypeError(
            f"invalid timeout {text!r}: expected a positive number of seconds, or a "
            "duration such as 90s or 10m"
        )
    return datetime.timedelta(seconds=seconds)
