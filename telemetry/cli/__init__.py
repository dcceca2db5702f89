"""The ``telemetry`` command: look at, repair and ship the runs in the local store.

    telemetry runs | show RUN_ID | stats | tail | flush | check | rebuild | export | prune | config

Also run as ``python -m telemetry``. ``--data-dir`` selects the store, as
``TELEMETRY_DATA_DIR`` does, and every listing takes ``--json``. Exit codes: 0 ok, 1 a
problem found or an operation failed, 2 a usage error. docs/cli.md describes each
subcommand.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from telemetry.cli import _check, _config, _flush, _prune, _rebuild, _runs, _stats, _tail
from telemetry.cli._args import CommandParser
from telemetry.cli._context import (
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    CommandContext,
    CommandError,
)
from telemetry.config import resolve_config
from telemetry.errors import ConfigError, TelemetryError

__all__ = ["main"]

# The order of the subcommands in --help.
_COMMAND_MODULES = (_runs, _stats, _tail, _flush, _check, _rebuild, _prune, _config)

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: sys.argv[1:]) and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    prog = f"telemetry {args.command}"
    _replace_unencodable_output()
    log_handler = _show_library_warnings()
    context: CommandContext | None = None
    try:
        config, ignored = resolve_config(data_dir=args.data_dir)
        context = CommandContext(config, ignored, sys.stdout, sys.stderr)
        if not getattr(args, "reports_settings", False):
            for error in ignored:
                print(f"{prog}: warning: {error}; the default is used", file=sys.stderr)
        code = int(args.handler(args, context))
        sys.stdout.flush()
        return code
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (TelemetryError, sqlite3.Error, OSError, ValueError) as exc:
        # ValueError: the library refused a value that the parser let through, such as
        # a cutoff that falls before year 1.
        if isinstance(exc, BrokenPipeError):
            return _quiet_broken_pipe()
        print(f"{prog}: {_describe(exc)}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if context is not None:
            context.close()
        logging.getLogger("telemetry").removeHandler(log_handler)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the command and all its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="the store to use (default: TELEMETRY_DATA_DIR, else the XDG data directory)",
    )

    parser = CommandParser(
        prog="telemetry",
        description="Look at, repair and ship the runs that agent-telemetry recorded.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for module in _COMMAND_MODULES:
        module.register(commands, common)
    return parser


def _show_library_warnings() -> logging.Handler:
    """Print the library's warnings and errors on stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("telemetry: %(levelname)s: %(message)s"))
    logger = logging.getLogger("telemetry")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.WARNING:
        logger.setLevel(logging.WARNING)
    return handler


def _replace_unencodable_output() -> None:
    # A terminal or pipe with a non-UTF-8 encoding cannot show every agent name or
    # payload; escape what it cannot hold instead of failing half-way through a table.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def _quiet_broken_pipe() -> int:
    # The reader of stdout went away (``telemetry runs | head``). Point stdout at
    # /dev/null so that the interpreter's final flush does not fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    text = str(exc)
    return text or type(exc).__name__
