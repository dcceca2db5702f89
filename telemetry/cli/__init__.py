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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from telemetry import __version__
from telemetry.cli import _check, _config, _flush, _prune, _rebuild, _runs, _stats, _tail
from telemetry.cli._args import CommandParser
from telemetry.cli._context import (
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    CommandContext,
    CommandError,
    index_locked_message,
    is_lock_error,
)
from telemetry.cli._output import ProgressAwareHandler
from telemetry.config import resolve_config
from telemetry.errors import ConfigError, TelemetryError

__all__ = ["main"]

# The order of the subcommands in --help.
_COMMAND_MODULES = (_runs, _stats, _tail, _flush, _check, _rebuild, _prune, _config)

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: sys.argv[1:]) and return its exit code.

    While the command runs, the library's warnings are printed on stderr, and characters
    that stdout or stderr cannot encode are written escaped. Both changes are undone
    before main() returns, for callers that run it inside their own process.
    """
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # Reported by the subcommand's parser, so that the message names it.
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    with _escaped_unencodable_output(), _library_warnings_shown():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand that ``args`` selects and turn its expected faults into messages."""
    prog = f"telemetry {args.command}"
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
        print(f"{prog}: {_describe(exc, context)}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if context is not None:
            context.close()


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the command and all its subcommands.

    --data-dir is accepted before the subcommand and after it. The subcommands' option
    has no default, so that it replaces the main parser's value only when it is given.
    """
    data_dir_help = "the store to use (default: TELEMETRY_DATA_DIR, else the XDG data directory)"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir", type=Path, metavar="DIR", default=argparse.SUPPRESS, help=data_dir_help
    )

    parser = CommandParser(
        prog="telemetry",
        description="Look at, repair and ship the runs that agent-telemetry recorded.",
    )
    parser.add_argument("--version", action="version", version=f"telemetry {__version__}")
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help=data_dir_help)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for module in _COMMAND_MODULES:
        module.register(commands, common)
    for command_parser in commands.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


@contextmanager
def _library_warnings_shown() -> Iterator[None]:
    """Print the library's warnings and errors on stderr, one line each, within the block.

    The ``telemetry`` logger gets a handler, and the level WARNING when its level would
    hide warnings. Both are undone when the block ends.
    """
    handler = ProgressAwareHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("telemetry: %(levelname)s: %(message)s"))
    logger = logging.getLogger("telemetry")
    level = logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET or level > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def _escaped_unencodable_output() -> Iterator[None]:
    """Write what stdout and stderr cannot encode as escapes, within the block.

    A terminal or pipe with a non-UTF-8 encoding cannot show every agent name or payload.
    Escaping what it cannot hold is better than failing half-way through a table. Each
    stream's previous error handler is restored when the block ends.
    """
    changed: list[tuple[io.TextIOWrapper, str]] = []
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            changed.append((stream, stream.errors or "strict"))
            stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        for stream, errors in changed:
            # reconfigure flushes first, which fails on a closed stream or a broken pipe.
            with suppress(ValueError, OSError):
                stream.reconfigure(errors=errors)


def _quiet_broken_pipe() -> int:
    # The reader of stdout went away (``telemetry runs | head``). Point stdout at
    # /dev/null so that the interpreter's final flush does not fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


def _describe(exc: BaseException, context: CommandContext | None) -> str:
    if is_lock_error(exc) and context is not None:
        return index_locked_message(context.config.db_path)
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    text = str(exc)
    return text or type(exc).__name__
