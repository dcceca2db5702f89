"""Sessions for contributors and CI: ``nox -s tests lint typecheck``.

``nox -s demo`` runs the main job, and ``nox -s bench`` the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite; arguments after -- go to pytest."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Check types with mypy in strict mode."""
    session.install("-e", ".[otel]", "mypy")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the standard library audit agent, then show what it recorded."""
    session.install("-e", ".")
    session.run("python", "examples/stdlib_audit.py", *session.posargs)
    session.run("telemetry", "runs", "--agent", "stdlib-audit", "--limit", "5")
    session.run("telemetry", "stats", "--agent", "stdlib-audit")


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmarks/bench_*.py script and print its table; nothing is asserted.

    bench_write.py also rewrites docs/benchmarks.md, keeping its hand-written end. Each
    script takes its own options (rounds, sizes); run it directly to pass them.
    """
    session.install("-e", ".[bench]")
    for script in sorted(Path("benchmarks").glob("bench_*.py")):
        arguments = ["--markdown", "docs/benchmarks.md"] if script.name == "bench_write.py" else []
        session.run("python", str(script), *arguments)
