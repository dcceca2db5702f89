"""The ``telemetry-instrument`` command: run a Python program with its entry points patched.

``telemetry-instrument [--entry SPEC ...] [--] COMMAND [ARGS ...]`` prepends the directory
of ``instrument/_bootstrap/sitecustomize.py`` to PYTHONPATH, adds the ``--entry`` specs to
``TELEMETRY_INSTRUMENT``, and replaces itself with COMMAND (``os.execvpe``), so the
program's exit code and signals are its own. Every Python process started with that
environment, the program and its Python child processes, installs the entry points at
startup, before it imports any module of its own.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from instrument.autopatch import INSTRUMENT_ENV, EntryPointSpec

__all__ = ["BOOTSTRAP_DIR", "UsageError", "build_environment", "main", "parse_arguments"]

PROG = "telemetry-instrument"
USAGE = f"usage: {PROG} [--entry SPEC ...] [--] COMMAND [ARGS ...]"
HELP = f"""{USAGE}

Run COMMAND, a Python program, with the entry points named by SPEC recorded as runs.

options:
  --entry SPEC  an entry point to patch, module:qualname[=agent_name], such as
                agents.entry:main=nightly-import; repeat for more. Added to
                {INSTRUMENT_ENV}, which may name more, comma-separated.
  -h, --help    show this help and exit

Runs go to the store that the TELEMETRY_* variables configure. Packages can also
register entry points under the entry-point group agent_telemetry.entry_points.
"""

BOOTSTRAP_DIR = str(Path(__file__).resolve().parent / "_bootstrap")

# Exit statuses of a command that cannot be started, as POSIX shells and env(1) use them.
EXIT_USAGE = 2
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class UsageError(Exception):
    """The command line is invalid; the message is printed as one line."""


def parse_arguments(argv: Sequence[str]) -> tuple[list[EntryPointSpec], list[str]] | None:
    """Split ``argv`` (without the program name) into entry points and the command.

    Options are read up to ``--`` or the first argument that does not start with ``-``.

    Returns:
        The entry points and the command with its arguments, or None for ``--help``.

    Raises:
        UsageError: an unknown option, an invalid or missing SPEC, or no COMMAND.
    """
    entries: list[EntryPointSpec] = []
    position = 0
    while position < len(argv):
        argument = argv[position]
        if argument == "--":
            position += 1
            break
        if argument in ("-h", "--help"):
            return None
        if argument == "--entry" or argument.startswith("--entry="):
            if argument == "--entry":
                position += 1
                if position == len(argv):
                    raise UsageError("--entry needs a SPEC such as agents.entry:main")
                value = argv[position]
            else:
                value = argument.partition("=")[2]
            try:
                entries.append(EntryPointSpec.parse(value, "--entry"))
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            position += 1
            continue
        if argument.startswith("-"):
            raise UsageError(
                f"unknown option {argument!r}; put -- before a COMMAND that starts with -"
            )
        break

    command = list(argv[position:])
    if not command:
        raise UsageError("missing COMMAND, such as: python app.py")
    return entries, command


def build_environment(
    entries: Sequence[EntryPointSpec], environ: Mapping[str, str]
) -> dict[str, str]:
    """Return a copy of ``environ`` that turns auto-instrumentation on in Python processes.

    BOOTSTRAP_DIR becomes the first entry of PYTHONPATH (moved there if it already was
    in it). The ``entries`` go before the existing value of TELEMETRY_INSTRUMENT, so their
    agent names win over the variable's for the same target.
    """
    env = dict(environ)
    existing_path = env.get("PYTHONPATH", "")
    other_entries = [path for path in existing_path.split(os.pathsep) if path != BOOTSTRAP_DIR]
    if existing_path:
        env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, *other_entries])
    else:
        env["PYTHONPATH"] = BOOTSTRAP_DIR

    specs = [str(entry) for entry in entries]
    existing_specs = env.get(INSTRUMENT_ENV, "").strip()
    if existing_specs:
        specs.append(existing_specs)
    if specs:
        env[INSTRUMENT_ENV] = ",".join(specs)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return only on failure.

    Returns:
        0 after ``--help``, 2 for a usage error, 126 for a COMMAND that cannot be
        executed, 127 for one that is not found. On success the process becomes COMMAND.
    """
    arguments = sys.argv[1:] if argv is None else argv
    try:
        parsed = parse_arguments(arguments)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if parsed is None:
        print(HELP, end="")
        return 0

    entries, command = parsed
    env = build_environment(entries, os.environ)
    _restore_default_signals()
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        print(f"{PROG}: command not found: {command[0]}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except OSError as exc:
        print(f"{PROG}: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return EXIT_NOT_EXECUTABLE


def _restore_default_signals() -> None:
    # Python ignores SIGPIPE and SIGXFSZ at startup, and exec keeps ignored signals, so the
    # command would inherit them. subprocess resets them for the same reason.
    for name in ("SIGPIPE", "SIGXFSZ"):
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
