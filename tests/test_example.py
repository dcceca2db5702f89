"""The audit agent in examples/ and the telemetry command that shows its runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from telemetry.ndjson import NDJSONWriter

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stdlib_audit.py"

GOOD_SOURCES = {
    "one.py": "def f():\n    pass\n",
    "two.py": "class A:\n    def m(self):\n        pass\n",
    "pkg/three.py": "async def g():\n    pass\n\nclass B:\n    pass\n",
    "pkg/four.py": "x = 1\n",
    "pkg/sub/five.py": "def h():\n    def inner():\n        pass\n",
}
BAD_SOURCES = {
    "broken.py": b"def broken(:\n",
    "pkg/latin1.py": b"name = '\xe9'\n",
}


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stdlib_audit", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses looks the module up in sys.modules while the class is created.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def run(args: list[str], store: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TELEMETRY_DATA_DIR": str(store)}
    env.pop("TELEMETRY_API_URL", None)
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    """A tree of five parsable files, two that fail, and one under site-packages."""
    root = tmp_path / "tree"
    for name, text in GOOD_SOURCES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for name, data in BAD_SOURCES.items():
        (root / name).write_bytes(data)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skipped.py").write_text("def skipped(): pass\n")
    return root


def test_audit_records_run(source_tree: Path, tmp_path: Path) -> None:
    """The agent's run is indexed as partial with its counts, metrics and events."""
    store = tmp_path / "store"
    result = run([str(EXAMPLE), "--root", str(source_tree), "--progress-every", "2"], store)
    assert result.returncode == 0, result.stderr

    listed = run(["-m", "telemetry", "runs", "--json", "--data-dir", str(store)], store)
    assert listed.returncode == 0, listed.stderr
    runs = orjson.loads(listed.stdout)
    assert len(runs) == 1
    audit: dict[str, Any] = runs[0]
    assert audit["agent_name"] == "stdlib-audit"
    assert audit["status"] == "partial"
    assert audit["items_discovered"] == 7
    assert audit["items_succeeded"] == 5
    assert audit["items_failed"] == 2
    assert audit["metrics_json"]["functions"] == 5
    assert audit["metrics_json"]["classes"] == 2

    reader = NDJSONWriter(store / "journal")
    records = [
        record
        for path in reader.list_files()
        for record in reader.read_file(path.name[len("events_") : -len(".ndjson")])
    ]
    kinds = Counter(record.get("event_type", record["record_type"]) for record in records)
    assert kinds == {"run_start": 1, "discovered": 1, "file_failed": 2, "progress": 3, "run_end": 1}


def test_stdlib_has_over_1000_files() -> None:
    """The default root, this Python's standard library, has more than 1000 files to audit."""
    example = load_example()

    files = example.find_python_files(Path(sysconfig.get_paths()["stdlib"]))

    assert len(files) > 1000
    assert not any("site-packages" in path.parts for path in files)


def test_stats_command(source_tree: Path, tmp_path: Path) -> None:
    """telemetry stats counts the agent's run by status and by agent."""
    store = tmp_path / "store"
    run([str(EXAMPLE), "--root", str(source_tree)], store)

    table = run(["-m", "telemetry", "stats", "--data-dir", str(store)], store)
    stats = run(["-m", "telemetry", "stats", "--json", "--data-dir", str(store)], store)

    assert table.returncode == 0, table.stderr
    assert "stdlib-audit" in table.stdout
    assert orjson.loads(stats.stdout)["by_status"]["partial"] == 1
    assert orjson.loads(stats.stdout)["by_agent"]["stdlib-audit"]["runs"] == 1


def test_command_without_store(tmp_path: Path) -> None:
    """Reading a store that does not exist exits 1 with one line naming the path."""
    result = run(["-m", "telemetry", "runs", "--data-dir", str(tmp_path / "none")], tmp_path)

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert str(tmp_path / "none") in result.stderr


def test_command_usage_error(tmp_path: Path) -> None:
    """An invalid option value exits 2 with argparse's usage message."""
    result = run(["-m", "telemetry", "runs", "--limit", "0"], tmp_path)

    assert result.returncode == 2
    assert "--limit" in result.stderr
