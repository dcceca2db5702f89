"""telemetry-instrument, run in subprocesses on a script of ours and on a real click tool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from instrument.autopatch import INSTRUMENT_ENV, EntryPointSpec
from instrument.launcher import BOOTSTRAP_DIR, build_environment, main
from telemetry import RunRecord
from telemetry.database import DatabaseWriter

TARGETS = Path(__file__).parent / "launcher_targets"
SAMPLE_SCRIPT = str(TARGETS / "run_sample_agent.py")
SAMPLE_ENTRY = "sample_agent.entry:main=sample-agent"

# python-dotenv's console script, a click command: a test dependency in pyproject.toml.
DOTENV_SCRIPT = str(Path(sysconfig.get_path("scripts")) / "dotenv")
DOTENV_ENTRY = "dotenv.__main__:cli=dotenv"

TIMEOUT_SECONDS = 60


def clean_environment(store: Path, **extra: str) -> dict[str, str]:
    """Return os.environ without TELEMETRY_* and PYTHONPATH, recording into ``store``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TELEMETRY_") and name != "PYTHONPATH"
    }
    env.update(TELEMETRY_DATA_DIR=str(store), TELEMETRY_DURABILITY="none", **extra)
    return env


def run(
    command: list[str], env: Mapping[str, str], cwd: Path = TARGETS
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )


def launch(
    arguments: list[str], env: Mapping[str, str], cwd: Path = TARGETS
) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "instrument.launcher", *arguments], env, cwd)


def recorded_runs(store: Path) -> list[RunRecord]:
    db_path = store / "telemetry.db"
    if not db_path.exists():
        return []
    index = DatabaseWriter(db_path)
    try:
        return list(reversed(index.list_runs(limit=None)))
    finally:
        index.close()


# -- the test suite's own script -------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "exit_code", "status", "error_summary"),
    [
        (["ok"], 0, "success", None),
        (["return", "3"], 3, "failed", "exit code 3"),
        (["exit", "4"], 4, "failed", "SystemExit: 4"),
    ],
)
def test_script_exit_codes_recorded(
    tmp_path: Path,
    arguments: list[str],
    exit_code: int,
    status: str,
    error_summary: str | None,
) -> None:
    """The script keeps its output and exit code, and its run is recorded with the status."""
    env = clean_environment(tmp_path / "store")
    plain = run([sys.executable, SAMPLE_SCRIPT, *arguments], env)

    launched = launch(["--entry", SAMPLE_ENTRY, sys.executable, SAMPLE_SCRIPT, *arguments], env)

    assert launched.returncode == exit_code
    assert plain.returncode == exit_code
    assert launched.stdout == plain.stdout
    assert launched.stderr == plain.stderr
    runs = recorded_runs(tmp_path / "store")
    assert len(runs) == 1
    assert runs[0].agent_name == "sample-agent"
    assert runs[0].job_type == "sample_agent.entry"
    assert runs[0].status == status
    assert runs[0].error_summary == error_summary


def test_entry_from_environment(tmp_path: Path) -> None:
    """A spec in TELEMETRY_INSTRUMENT works without --entry, and the option goes before it."""
    env = clean_environment(tmp_path / "store", **{INSTRUMENT_ENV: "sample_agent.entry:main=env"})

    launched = launch(["--", sys.executable, SAMPLE_SCRIPT, "ok"], env)

    assert launched.returncode == 0
    assert [run.agent_name for run in recorded_runs(tmp_path / "store")] == ["env"]


def test_child_process_instrumented(tmp_path: Path) -> None:
    """A Python child process of the program inherits the setting and records its own run."""
    env = clean_environment(tmp_path / "store")

    launched = launch(["--entry", SAMPLE_ENTRY, sys.executable, SAMPLE_SCRIPT, "spawn"], env)

    assert launched.returncode == 0
    assert launched.stdout == "sample agent: spawn\nsample agent: ok\n"
    runs = recorded_runs(tmp_path / "store")
    assert [run.status for run in runs] == ["success", "success"]
    assert runs[0].pid != runs[1].pid


def test_missing_targets_logged(tmp_path: Path) -> None:
    """A missing module and a missing attribute are logged once each; the program runs."""
    env = clean_environment(
        tmp_path / "store",
        **{INSTRUMENT_ENV: "no_such_module_7c2e.entry:main,sample_agent.entry:no_such_function"},
    )
    plain = run([sys.executable, SAMPLE_SCRIPT, "return", "5"], env)

    launched = launch(["--entry", SAMPLE_ENTRY, sys.executable, SAMPLE_SCRIPT, "return", "5"], env)

    assert launched.returncode == 5
    assert launched.stdout == plain.stdout
    lines = launched.stderr.splitlines()
    assert len(lines) == 2
    assert "sample_agent.entry:no_such_function" in lines[0]
    assert "has no attribute no_such_function" in lines[0]
    assert "no_such_module_7c2e.entry:main" in lines[1]
    assert "module not found" in lines[1]
    assert [run.status for run in recorded_runs(tmp_path / "store")] == ["failed"]


def test_module_run_as_main_logged(tmp_path: Path) -> None:
    """An entry module run with python -m cannot be patched, and that is logged at exit."""
    env = clean_environment(tmp_path / "store")

    launched = launch(
        ["--entry", SAMPLE_ENTRY, sys.executable, "-m", "sample_agent.entry", "return", "3"], env
    )

    assert launched.returncode == 3
    assert launched.stdout == "sample agent: return 3\n"
    assert "ran as __main__ (python -m)" in launched.stderr
    assert recorded_runs(tmp_path / "store") == []


def test_existing_sitecustomize_runs(tmp_path: Path) -> None:
    """A sitecustomize already on PYTHONPATH still runs, and the program imports it as before."""
    own_site = tmp_path / "own_site"
    own_site.mkdir()
    marker = tmp_path / "marker"
    (own_site / "sitecustomize.py").write_text(
        textwrap.dedent(f"""
            import pathlib

            pathlib.Path({str(marker)!r}).write_text("ran")
            ORIGIN = "own"
        """)
    )
    env = clean_environment(tmp_path / "store", PYTHONPATH=str(own_site))
    program = (
        "import sys, sitecustomize\n"
        "print(sitecustomize.ORIGIN)\n"
        "from sample_agent.entry import main\n"
        "sys.exit(main(['ok']))\n"
    )

    launched = launch(["--entry", SAMPLE_ENTRY, sys.executable, "-c", program], env)

    assert launched.returncode == 0
    assert launched.stdout == "own\nsample agent: ok\n"
    assert marker.read_text() == "ran"
    assert [run.status for run in recorded_runs(tmp_path / "store")] == ["success"]


def test_signal_is_program_own(tmp_path: Path) -> None:
    """A program killed by a signal is seen so by the caller: the launcher exec'd it."""
    env = clean_environment(tmp_path / "store")
    program = "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n"

    launched = launch([sys.executable, "-c", program], env)

    assert launched.returncode == -signal.SIGTERM


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_command_signals_not_ignored(tmp_path: Path) -> None:
    """The command starts with SIGPIPE and SIGXFSZ at their defaults, not ignored by Python."""
    env = clean_environment(tmp_path / "store")

    launched = launch(["sh", "-c", "grep SigIgn /proc/self/status"], env)
    ignored = int(launched.stdout.split()[1], 16)

    assert launched.returncode == 0, launched.stderr
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert not ignored & (1 << (signal.SIGXFSZ - 1))


# -- a third-party click tool ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "exit_code", "status"),
    [(["list"], 0, "success"), (["get", "MISSING"], 1, "failed")],
)
def test_click_tool_recorded(
    tmp_path: Path, arguments: list[str], exit_code: int, status: str
) -> None:
    """python-dotenv's click CLI keeps its output and exit code, and its run is recorded."""
    env_file = tmp_path / "settings.env"
    env_file.write_text("GREETING=hello\nTARGET=world\n")
    command = [DOTENV_SCRIPT, "--file", str(env_file), *arguments]
    env = clean_environment(tmp_path / "store")
    plain = run(command, env, cwd=tmp_path)

    launched = launch(["--entry", DOTENV_ENTRY, *command], env, cwd=tmp_path)

    assert plain.returncode == exit_code
    assert launched.returncode == exit_code
    assert launched.stdout == plain.stdout
    assert launched.stderr == plain.stderr
    runs = recorded_runs(tmp_path / "store")
    assert len(runs) == 1
    assert runs[0].agent_name == "dotenv"
    assert runs[0].status == status


# -- the command line, in this process ---------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "missing COMMAND"),
        (["--entry", "a:main"], "missing COMMAND"),
        (["--entry"], "--entry needs a SPEC"),
        (["--entry", "no-colon", "python"], "invalid entry point spec 'no-colon'"),
        (["--entry=a:", "python"], "invalid entry point spec 'a:'"),
        (["--verbose", "python"], "unknown option '--verbose'"),
    ],
)
def test_usage_error(
    capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    """A usage error exits 2 with one line on stderr that names the problem."""
    exit_code = main(arguments)

    output = capsys.readouterr()
    assert exit_code == 2
    assert output.out == ""
    assert output.err.count("\n") == 1
    assert output.err.startswith("telemetry-instrument: ")
    assert message in output.err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints the usage and the --entry option to stdout and exits 0."""
    exit_code = main(["--help"])

    output = capsys.readouterr()
    assert exit_code == 0
    assert output.out.startswith("usage: telemetry-instrument [--entry SPEC ...]")
    assert "--entry SPEC" in output.out


def test_command_not_found(capsys: pytest.CaptureFixture[str]) -> None:
    """A COMMAND that is not on PATH exits 127, as a shell does."""
    exit_code = main(["no-such-command-5b7d"])

    assert exit_code == 127
    assert "command not found: no-such-command-5b7d" in capsys.readouterr().err


def test_environment_pythonpath_first() -> None:
    """The bootstrap directory goes first on PYTHONPATH, once, before the existing entries."""
    existing = os.pathsep.join(["/opt/lib", BOOTSTRAP_DIR, ""])

    env = build_environment([], {"PYTHONPATH": existing})
    empty = build_environment([], {})

    assert env["PYTHONPATH"] == os.pathsep.join([BOOTSTRAP_DIR, "/opt/lib", ""])
    assert empty["PYTHONPATH"] == BOOTSTRAP_DIR
    assert INSTRUMENT_ENV not in empty


def test_environment_entries_first() -> None:
    """--entry specs go before the specs already in TELEMETRY_INSTRUMENT."""
    entries = [EntryPointSpec.parse("a:main=cli"), EntryPointSpec.parse("b:Agent.run")]

    env = build_environment(entries, {INSTRUMENT_ENV: "a:main=env", "HOME": "/home/x"})

    assert env[INSTRUMENT_ENV] == "a:main=cli,b:Agent.run,a:main=env"
    assert env["HOME"] == "/home/x"
