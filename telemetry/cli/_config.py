"""The config subcommand: each resolved setting, where it came from, and invalid variables."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from telemetry.cli._context import EXIT_OK, EXIT_PROBLEM, CommandContext
from telemetry.cli._output import print_json, print_table
from telemetry.config import ENV_PREFIX, TelemetryConfig

__all__ = ["register"]

# Wrapped by hand, because RawDescriptionHelpFormatter keeps the line breaks.
_DESCRIPTION = """\
Show each setting's value, its source (argument, environment or default) and its
environment variable. The API token and any password in the API URL are masked.
Invalid TELEMETRY_* variables are listed with the error; their defaults are in use,
and the command exits with 1. TELEMETRY_* variables that name no setting are listed
too, without their values, but do not change the exit code.
"""
_EXAMPLE = """\
examples:
  telemetry config
  TELEMETRY_DATA_DIR=/srv/telemetry telemetry config --json
"""


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the config subcommand to ``commands``."""
    parser = commands.add_parser(
        "config",
        parents=[common],
        help="show the resolved settings and where each came from",
        description=_DESCRIPTION,
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the settings as JSON")
    parser.set_defaults(handler=show_config, reports_settings=True)


def show_config(args: argparse.Namespace, context: CommandContext) -> int:
    """Print the settings, the invalid variables and the unknown ones; exit 1 on invalid ones.

    The token is never printed: TelemetryConfig.describe and the ConfigError of an invalid
    token carry ``***`` in its place.
    """
    config = context.config
    settings = [
        {"name": name, "value": _jsonable(value), "source": source, "variable": variable}
        for name, variable, value, source in config.describe()
    ]
    invalid = [
        {"variable": error.key, "error": str(error), "expected": error.expected}
        for error in context.ignored_settings
    ]
    unknown = _unknown_variables(config)

    if args.json:
        print_json(
            {
                "settings": settings,
                "invalid_variables": invalid,
                "unknown_variables": unknown,
                "api_configured": config.api_configured,
            },
            context.out,
        )
    else:
        rows = [
            (item["name"], _format_value(item["value"]), item["source"], item["variable"])
            for item in settings
        ]
        print_table(("SETTING", "VALUE", "SOURCE", "VARIABLE"), rows, context.out)
        if invalid:
            print(file=context.out)
            print("invalid environment variables:", file=context.out)
            for item in invalid:
                print(f"  {item['error']}; default used", file=context.out)
        if unknown:
            print(file=context.out)
            print(
                f"{ENV_PREFIX}* variables that are not settings (ignored): {', '.join(unknown)}",
                file=context.out,
            )
    return EXIT_PROBLEM if invalid else EXIT_OK


def _unknown_variables(config: TelemetryConfig) -> list[str]:
    """Return the TELEMETRY_* variables in the environment that name no setting, sorted.

    These are often typos, such as TELEMETRY_DATADIR for TELEMETRY_DATA_DIR. Only the names
    are returned; the values may be secrets.
    """
    known = {variable for _, variable, _, _ in config.describe()}
    return sorted(name for name in os.environ if name.startswith(ENV_PREFIX) and name not in known)


def _jsonable(value: object) -> Any:
    if isinstance(value, Path):
        return str(value)
    return value


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
