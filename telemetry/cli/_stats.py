"""The stats subcommand: runs, success rate, durations and items per agent over a window."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from telemetry.cli._args import parse_since, parse_text
from telemetry.cli._context import EXIT_OK, CommandContext
from telemetry.cli._output import format_duration, format_time, print_json, print_table
from telemetry.config import TelemetryConfig
from telemetry.models import FINAL_STATUSES, STATUSES, get_iso8601_timestamp

__all__ = ["DEFAULT_WINDOW", "register"]

DEFAULT_WINDOW = "7d"
"""The --since of stats when neither --since nor --all is given."""

# Counts that are summed over the agents for the totals.
_SUMMED = (
    "runs",
    *STATUSES,
    "items_discovered",
    "items_succeeded",
    "items_failed",
    "pending_api_posts",
)

# Wrapped by hand, because RawDescriptionHelpFormatter keeps the line breaks.
_DESCRIPTION = """\
Show per agent, for the runs that started in a window: the number of runs, the
success rate of those that ended, the p50 and p95 duration, the items processed
(succeeded plus failed), the ended runs not yet posted to the API and the runs still
running, then the totals. Durations are nearest-rank percentiles over the runs that
have a duration.
"""
_EXAMPLE = f"""\
examples:
  telemetry stats                    # runs that started in the last {DEFAULT_WINDOW}
  telemetry stats --since 1d --agent stdlib-audit
  telemetry stats --all --json
"""


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the stats subcommand to ``commands``."""
    parser = commands.add_parser(
        "stats",
        parents=[common],
        help="runs, success rate and durations per agent",
        description=_DESCRIPTION,
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    window = parser.add_mutually_exclusive_group()
    window.add_argument(
        "--since",
        type=parse_since,
        metavar="WHEN",
        help=f"count runs that started at or after WHEN: a duration back from now (2h, 7d) "
        f"or a date or time such as 2026-12-01 (default: {DEFAULT_WINDOW})",
    )
    window.add_argument("--all", action="store_true", help="count every run in the index")
    parser.add_argument("--agent", type=parse_text, metavar="NAME", help="only this agent")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.set_defaults(handler=show_stats)


def show_stats(args: argparse.Namespace, context: CommandContext) -> int:
    """Print the statistics of the window per agent and in total, as a table or JSON."""
    since: datetime.datetime | None = args.since
    if since is None and not args.all:
        since = parse_since(DEFAULT_WINDOW)
    index = context.open_index(write=False)
    stats = index.get_run_stats(None if since is None else get_iso8601_timestamp(since))

    by_agent: dict[str, dict[str, Any]] = stats["by_agent"]
    if args.agent is not None:
        by_agent = {name: counts for name, counts in by_agent.items() if name == args.agent}
    for counts in by_agent.values():
        _add_rates(counts)
    totals = _totals(by_agent)

    if args.json:
        print_json(
            {
                "since": stats["since"],
                "agent": args.agent,
                "api_configured": context.config.api_configured,
                "total_runs": totals["runs"],
                "by_status": {status: totals[status] for status in STATUSES},
                "pending_api_posts": totals["pending_api_posts"],
                "items_processed": totals["items_processed"],
                "success_rate": totals["success_rate"],
                "by_agent": by_agent,
            },
            context.out,
        )
        return EXIT_OK

    window = _describe_window(stats["since"], args)
    if not by_agent:
        agent = f" of agent {args.agent!r}" if args.agent is not None else ""
        print(f"no runs{agent} {window}", file=context.out)
        return EXIT_OK
    print(f"runs {window}", file=context.out)
    print(file=context.out)
    header = ("AGENT", "RUNS", "SUCCESS RATE", "P50", "P95", "ITEMS", "PENDING POSTS", "RUNNING")
    rows = [_row(name, counts) for name, counts in by_agent.items()]
    if len(by_agent) > 1:
        rows.append(_row("total", totals))
    print_table(header, rows, context.out)
    api_note = _api_note(context.config)
    if api_note:
        print(file=context.out)
        print(api_note, file=context.out)
    return EXIT_OK


def _add_rates(counts: dict[str, Any]) -> None:
    """Add ``items_processed`` and ``success_rate`` to the counts of an agent or the total.

    The success rate is the share of ended runs that succeeded, from 0 to 1, or None when
    no run has ended. Runs still running are left out, because their outcome is unknown.
    """
    counts["items_processed"] = counts["items_succeeded"] + counts["items_failed"]
    ended = sum(counts[status] for status in FINAL_STATUSES)
    counts["success_rate"] = counts["success"] / ended if ended else None


def _totals(by_agent: dict[str, dict[str, Any]]) -> dict[str, Any]:
    # Percentiles of different agents cannot be combined from their own percentiles, so
    # the totals have none.
    totals: dict[str, Any] = {
        name: sum(counts[name] for counts in by_agent.values()) for name in _SUMMED
    }
    totals["p50_duration_ms"] = None
    totals["p95_duration_ms"] = None
    _add_rates(totals)
    return totals


def _row(name: str, counts: dict[str, Any]) -> tuple[str, ...]:
    ended = sum(counts[status] for status in FINAL_STATUSES)
    rate = counts["success_rate"]
    return (
        name,
        str(counts["runs"]),
        "-" if rate is None else f"{_percent(rate)} ({counts['success']}/{ended})",
        format_duration(counts["p50_duration_ms"]),
        format_duration(counts["p95_duration_ms"]),
        str(counts["items_processed"]),
        str(counts["pending_api_posts"]),
        str(counts["running"]),
    )


def _percent(rate: float) -> str:
    # Rounding must not show 100% while a run failed, or 0% while one succeeded.
    percent = round(rate * 100)
    if percent == 100 and rate < 1:
        percent = 99
    elif percent == 0 and rate > 0:
        percent = 1
    return f"{percent}%"


def _describe_window(since: str | None, args: argparse.Namespace) -> str:
    if since is None:
        return "in the index (--all)"
    start = f"that started since {format_time(since)} UTC"
    if args.since is None:
        return f"{start} (the last {DEFAULT_WINDOW}; change with --since or --all)"
    return start


def _api_note(config: TelemetryConfig) -> str | None:
    """Say why PENDING POSTS will not go down by itself, or None when the API is configured."""
    if config.api_configured:
        return None
    if config.api_url is None:
        reason = "TELEMETRY_API_URL is not set"
    else:
        reason = "TELEMETRY_API_ENABLED is false"
    return f"API posting is off ({reason}): the pending runs are posted once it is on"
