"""Running the real ``telemetry`` command in a subprocess, for the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

COMMAND_TIMEOUT = 60.0


def command_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return os.environ without TELEMETRY_* variables, plus ``extra``."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("TELEMETRY_")}
    environ["PYTHONUNBUFFERED"] = "1"
    environ.update(extra or {})
    return environ


def run_cli(
    *args: str | os.PathLike[str],
    data_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m telemetry ARGS`` and return its exit code and output.

    ``data_dir`` is passed as ``--data-dir`` after the arguments.
    """
    argv = [sys.executable, "-m", "telemetry", *(os.fspath(arg) for arg in args)]
    if data_dir is not None:
        argv += ["--data-dir", os.fspath(data_dir)]
    return subprocess.run(
        argv,
        env=command_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def run_json(*args: str | os.PathLike[str], data_dir: Path, **kwargs: Any) -> Any:
    """Run the command with ``--json``, check that it succeeded, and return the parsed output."""
    result = run_cli(*args, "--json", data_dir=data_dir, **kwargs)
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)
