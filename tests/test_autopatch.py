"""instrument.autopatch and instrument.auto against real modules, files and SQLite."""

from __future__ import annotations

import importlib
import logging
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from instrument import autopatch
from instrument._client import set_default_client
from instrument.autopatch import (
    ENTRY_POINT_GROUP,
    INSTRUMENT_ENV,
    EntryPointSpec,
    configured_entry_points,
    install,
    uninstall,
)
from telemetry import RunRecord, TelemetryClient, TelemetryConfig
from telemetry.database import DatabaseWriter

LOGGER = "telemetry.instrument"

ModuleWriter = Callable[[str, str], str]


@pytest.fixture(autouse=True)
def _uninstall_after_test() -> Iterator[None]:
    """Leave no entry point installed for the next test."""
    yield
    uninstall()


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleWriter]:
    """Yield a function that writes a module of a fresh package and returns its dotted name.

    Each test gets a package with a unique name, so modules and the post-import hooks
    that wrapt keeps by module name never carry over between tests.
    """
    package = f"ap_{uuid.uuid4().hex[:12]}"
    root = tmp_path / "modules"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(root))

    def write(name: str, source: str) -> str:
        (root / package / f"{name}.py").write_text(textwrap.dedent(source))
        return f"{package}.{name}"

    yield write
    for name in [name for name in sys.modules if name.split(".")[0] == package]:
        del sys.modules[name]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TelemetryClient]:
    """Yield a client on a store in tmp_path, without fsync and without an API."""
    with TelemetryClient(
        TelemetryConfig(environ={}, data_dir=tmp_path / "store", durability="none")
    ) as telemetry:
        yield telemetry


def recorded_runs(client: TelemetryClient) -> list[RunRecord]:
    index = DatabaseWriter(client.config.db_path)
    try:
        return index.list_runs(limit=None)
    finally:
        index.close()


def error_messages(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == LOGGER and record.levelno == level
    ]


MAIN_SOURCE = """
    def main(argv=None):
        return 0
"""


# -- specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "module", "qualname", "agent_name"),
    [
        ("agents.entry:main", "agents.entry", "main", None),
        ("agents:Agent.run", "agents", "Agent.run", None),
        (" agents.entry : main = nightly import ", "agents.entry", "main", "nightly import"),
        ("a:Outer.Inner.run=x=y", "a", "Outer.Inner.run", "x=y"),
    ],
)
def test_spec_parse_valid(text: str, module: str, qualname: str, agent_name: str | None) -> None:
    """A spec splits into module, qualname and optional agent name, spaces stripped."""
    spec = EntryPointSpec.parse(text)

    assert spec.module == module
    assert spec.qualname == qualname
    assert spec.agent_name == agent_name


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "missing ':'"),
        ("agents.entry", "missing ':'"),
        ("agents:", "dotted Python names"),
        (":main", "dotted Python names"),
        ("my agents:main", "dotted Python names"),
        ("a:1run", "dotted Python names"),
        ("a:A..run", "dotted Python names"),
        ("a:main=", "the agent name after '=' is empty"),
        ("a:main=x,y", "cannot contain one"),
    ],
)
def test_spec_parse_malformed(text: str, reason: str) -> None:
    """A malformed spec raises ValueError that quotes it and names the problem."""
    with pytest.raises(ValueError, match="invalid entry point spec") as raised:
        EntryPointSpec.parse(text)

    assert repr(text) in str(raised.value)
    assert reason in str(raised.value)


def test_spec_parse_not_string() -> None:
    """A spec that is not a string raises TypeError naming its type."""
    with pytest.raises(TypeError, match="not int"):
        EntryPointSpec.parse(3)  # type: ignore[arg-type]


def test_spec_text_and_agent_name() -> None:
    """str() gives the spec back, and the qualname is the agent name when none is given."""
    named = EntryPointSpec.parse("a.b:Agent.run=nightly")
    unnamed = EntryPointSpec.parse("a.b:main")

    assert str(named) == "a.b:Agent.run=nightly"
    assert named.run_agent_name == "nightly"
    assert unnamed.run_agent_name == "main"
    assert unnamed.target == "a.b:main"


def test_environment_malformed_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """A malformed item of TELEMETRY_INSTRUMENT is logged and skipped, and empty items ignored."""
    environ = {INSTRUMENT_ENV: "a.b:main, ,c:Agent.run=x,broken,"}

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        specs = configured_entry_points(environ)

    assert specs == [EntryPointSpec("a.b", "main"), EntryPointSpec("c", "Agent.run", "x")]
    errors = error_messages(caplog)
    assert len(errors) == 1
    assert "'broken'" in errors[0]


def test_environment_duplicate_first_wins(caplog: pytest.LogCaptureFixture) -> None:
    """Two specs of one target keep the first, with a warning naming both."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        specs = configured_entry_points({INSTRUMENT_ENV: "a:main=one,a:main=two"})

    assert specs == [EntryPointSpec("a", "main", "one")]
    warnings = error_messages(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert "a:main=two" in warnings[0]


def write_distribution(site: Path, entry_points: str) -> None:
    info = site / "demo_agents-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-agents\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_package_entry_points_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Entry points of the group become specs named after the entry point; bad ones are logged."""
    write_distribution(
        tmp_path / "site",
        f"[{ENTRY_POINT_GROUP}]\nnightly = demo_agents.cli:main\nno-attribute = demo_agents\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        specs = configured_entry_points({INSTRUMENT_ENV: "demo_agents.cli:main=from-env"})

    assert specs == [EntryPointSpec("demo_agents.cli", "main", "from-env")]
    assert EntryPointSpec("demo_agents.cli", "main", "nightly") not in specs
    errors = error_messages(caplog)
    assert len(errors) == 1
    assert "'no-attribute' of demo-agents" in errors[0]


def test_package_entry_point_installed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    write_module: ModuleWriter,
    client: TelemetryClient,
) -> None:
    """install() with no arguments patches an entry point that a package registers."""
    module_name = write_module("cli", MAIN_SOURCE)
    write_distribution(
        tmp_path / "site", f"[{ENTRY_POINT_GROUP}]\nnightly-report = {module_name}:main\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv(INSTRUMENT_ENV, raising=False)
    set_default_client(client)
    try:
        install()
        importlib.import_module(module_name).main()
    finally:
        set_default_client(None)

    runs = recorded_runs(client)
    assert [run.agent_name for run in runs] == ["nightly-report"]


# -- install and uninstall ------------------------------------------------------------------


def test_install_imported_module(write_module: ModuleWriter, client: TelemetryClient) -> None:
    """An entry point whose module is already imported is patched at once and records runs."""
    module = importlib.import_module(write_module("entry", MAIN_SOURCE))
    original = module.main

    install([f"{module.__name__}:main=importer"], client=client)

    assert module.main is not original
    assert module.main.__wrapped__ is original
    assert module.main() == 0
    runs = recorded_runs(client)
    assert len(runs) == 1
    assert runs[0].agent_name == "importer"
    assert runs[0].job_type == module.__name__
    assert runs[0].status == "success"


def test_install_before_import(write_module: ModuleWriter, client: TelemetryClient) -> None:
    """An entry point is patched by the post-import hook when its module is imported later."""
    module_name = write_module("entry", MAIN_SOURCE)

    install([f"{module_name}:main"], client=client)
    assert module_name not in sys.modules
    module = importlib.import_module(module_name)
    module.main()

    assert hasattr(module.main, "__wrapped__")
    assert [run.agent_name for run in recorded_runs(client)] == ["main"]


def test_install_twice_patches_once(
    write_module: ModuleWriter, client: TelemetryClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A second install of a target keeps the first wrapper, and warns about another name."""
    module = importlib.import_module(write_module("entry", MAIN_SOURCE))
    original = module.main

    install([f"{module.__name__}:main=first"], client=client)
    wrapper = module.main
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        install([f"{module.__name__}:main=second"], client=client)
    module.main()

    assert module.main is wrapper
    assert module.main.__wrapped__ is original
    assert [run.agent_name for run in recorded_runs(client)] == ["first"]
    assert len(error_messages(caplog, logging.WARNING)) == 1


def test_uninstall_restores_original(write_module: ModuleWriter, client: TelemetryClient) -> None:
    """uninstall() puts the original back, and calls record nothing after it."""
    module = importlib.import_module(write_module("entry", MAIN_SOURCE))
    original = module.main
    install([f"{module.__name__}:main"], client=client)

    uninstall()
    module.main()

    assert module.main is original
    assert recorded_runs(client) == []


def test_uninstall_keeps_replacement(write_module: ModuleWriter, client: TelemetryClient) -> None:
    """An attribute replaced after patching is left as the replacement by uninstall()."""
    module = importlib.import_module(write_module("entry", MAIN_SOURCE))
    install([f"{module.__name__}:main"], client=client)

    def replacement() -> str:
        return "replaced"

    module.__dict__["main"] = replacement
    uninstall()

    assert module.main is replacement


def test_uninstall_disarms_pending_hook(
    write_module: ModuleWriter, client: TelemetryClient
) -> None:
    """After uninstall(), a module imported later is left unpatched."""
    module_name = write_module("entry", MAIN_SOURCE)
    install([f"{module_name}:main"], client=client)

    uninstall()
    module = importlib.import_module(module_name)

    assert not hasattr(module.main, "__wrapped__")


def test_reinstall_reuses_pending_hook(write_module: ModuleWriter, client: TelemetryClient) -> None:
    """install(), uninstall(), install() before the import patches the module once."""
    module_name = write_module("entry", MAIN_SOURCE)
    install([f"{module_name}:main=old"], client=client)
    uninstall()
    install([f"{module_name}:main=new"], client=client)

    module = importlib.import_module(module_name)
    module.main()

    assert not hasattr(module.main.__wrapped__, "__wrapped__")
    assert [run.agent_name for run in recorded_runs(client)] == ["new"]


def test_install_rejects_bad_argument(client: TelemetryClient) -> None:
    """A malformed spec passed to install() raises at once, as API misuse."""
    with pytest.raises(ValueError, match="'no-colon'"):
        install(["no-colon"], client=client)
    with pytest.raises(TypeError, match="not int"):
        install([42], client=client)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"pass \['a:main'\]"):
        install("a:main", client=client)


def test_spec_rejects_wrong_types() -> None:
    """EntryPointSpec built directly checks its field types and the agent name."""
    with pytest.raises(TypeError, match="module must be a string"):
        EntryPointSpec(None, "main")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the agent name is empty"):
        EntryPointSpec("a", "main", " ")


def test_disabled_client_leaves_function(write_module: ModuleWriter, tmp_path: Path) -> None:
    """With a disabled client the function stays as it is, before and after uninstall()."""
    module = importlib.import_module(write_module("entry", MAIN_SOURCE))
    original = module.main
    disabled = TelemetryClient(TelemetryConfig(environ={}, enabled=False, data_dir=tmp_path))

    install([f"{module.__name__}:main"], client=disabled)
    patched = module.main
    uninstall()

    assert patched is original
    assert module.main is original


# -- what an entry point records ------------------------------------------------------------


EXIT_CODE_SOURCE = """
    def main(code):
        return code

    def leave(code):
        raise SystemExit(code)
"""


@pytest.mark.parametrize(
    ("function", "code", "status"),
    [
        ("main", 0, "success"),
        ("main", None, "success"),
        ("main", 3, "failed"),
        ("leave", 0, "success"),
        ("leave", 4, "failed"),
    ],
)
def test_entry_point_exit_codes(
    write_module: ModuleWriter,
    client: TelemetryClient,
    function: str,
    code: int | None,
    status: str,
) -> None:
    """A returned non-zero int or SystemExit with a non-zero code records the run as failed."""
    module = importlib.import_module(write_module("entry", EXIT_CODE_SOURCE))
    install([f"{module.__name__}:{function}"], client=client)

    try:
        result = getattr(module, function)(code)
    except SystemExit as exc:
        result = exc.code

    assert result == code
    assert [run.status for run in recorded_runs(client)] == [status]


CLASS_SOURCE = """
    class Agent:
        def run(self):
            return self

        @classmethod
        def build(cls):
            return cls

        @staticmethod
        def check(value):
            return value


    class NightlyAgent(Agent):
        pass
"""


def test_class_methods_patched(write_module: ModuleWriter, client: TelemetryClient) -> None:
    """Instance, class and static methods are patched, and bind as before on a subclass."""
    module = importlib.import_module(write_module("agents", CLASS_SOURCE))
    originals = dict(module.Agent.__dict__)
    names = ["Agent.run", "Agent.build", "Agent.check"]

    install([f"{module.__name__}:{name}" for name in names], client=client)
    agent = module.NightlyAgent()

    assert agent.run() is agent
    assert module.NightlyAgent.build() is module.NightlyAgent
    assert agent.build() is module.NightlyAgent
    assert module.Agent.check(7) == 7
    runs = recorded_runs(client)
    assert sorted(run.agent_name for run in runs) == sorted([*names, "Agent.build"])

    uninstall()
    for name in ("run", "build", "check"):
        assert module.Agent.__dict__[name] is originals[name]


def test_inherited_method_patched_on_subclass(
    write_module: ModuleWriter, client: TelemetryClient
) -> None:
    """A spec naming an inherited method patches the subclass only, and uninstall removes it."""
    module = importlib.import_module(write_module("agents", CLASS_SOURCE))

    install([f"{module.__name__}:NightlyAgent.run"], client=client)
    module.Agent().run()
    module.NightlyAgent().run()
    uninstall()

    assert [run.agent_name for run in recorded_runs(client)] == ["NightlyAgent.run"]
    assert "run" not in module.NightlyAgent.__dict__


def test_method_in_class_body_after_import(
    write_module: ModuleWriter, client: TelemetryClient
) -> None:
    """A classmethod patched by the post-import hook still gets the subclass as cls."""
    module_name = write_module("agents", CLASS_SOURCE)
    install([f"{module_name}:Agent.build"], client=client)

    module = importlib.import_module(module_name)

    assert module.NightlyAgent.build() is module.NightlyAgent
    assert isinstance(module.Agent.__dict__["build"].__wrapped__, classmethod)


# -- aliases bound before patching ----------------------------------------------------------


def test_alias_rebound_in_loaded_module(
    write_module: ModuleWriter, client: TelemetryClient
) -> None:
    """A module global bound to the original before install() is rebound, and restored."""
    entry = importlib.import_module(write_module("entry", MAIN_SOURCE))
    original = entry.main
    runner = importlib.import_module(
        write_module("runner", f"from {entry.__name__} import main as start\n")
    )

    install([f"{entry.__name__}:main"], client=client)
    runner.start()

    assert runner.start is entry.main
    assert len(recorded_runs(client)) == 1

    uninstall()
    assert runner.start is original


def test_base_method_alias_not_rebound(write_module: ModuleWriter, client: TelemetryClient) -> None:
    """A global holding an inherited method is left alone: base-class calls record nothing."""
    source = """
        class Importer:
            def run(self):
                return "ran"

        class Nightly(Importer):
            pass

        base_run = Importer.run
    """
    entry = importlib.import_module(write_module("jobs", source))

    install([f"{entry.__name__}:Nightly.run"], client=client)

    assert entry.base_run(entry.Importer()) == "ran"
    assert recorded_runs(client) == []
    assert entry.Nightly().run() == "ran"
    assert len(recorded_runs(client)) == 1


def test_alias_replaced_since_left_alone(
    write_module: ModuleWriter, client: TelemetryClient
) -> None:
    """uninstall() leaves an alias that was rebound to something else after patching."""
    entry = importlib.import_module(write_module("entry", MAIN_SOURCE))
    runner = importlib.import_module(write_module("runner", f"from {entry.__name__} import main\n"))
    install([f"{entry.__name__}:main"], client=client)

    def replacement() -> None:
        return None

    runner.__dict__["main"] = replacement
    uninstall()

    assert runner.main is replacement


def test_alias_in_object_not_rebound(write_module: ModuleWriter, client: TelemetryClient) -> None:
    """A reference held in a container keeps calling the original: only globals are rebound."""
    entry = importlib.import_module(write_module("entry", MAIN_SOURCE))
    runner = importlib.import_module(
        write_module("runner", f"from {entry.__name__} import main\nCOMMANDS = {{'run': main}}\n")
    )

    install([f"{entry.__name__}:main"], client=client)
    runner.COMMANDS["run"]()

    assert recorded_runs(client) == []


# -- faults ---------------------------------------------------------------------------------


def test_missing_attribute_logged_once(
    write_module: ModuleWriter, client: TelemetryClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A spec naming a missing attribute is logged once, however often it is installed."""
    module = importlib.import_module(write_module("entry", MAIN_SOURCE))
    target = f"{module.__name__}:no_such_function"

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        install([target], client=client)
        uninstall()
        install([target], client=client)

    errors = error_messages(caplog)
    assert len(errors) == 1
    assert "has no attribute no_such_function" in errors[0]


def test_missing_attribute_import_succeeds(
    write_module: ModuleWriter, client: TelemetryClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing attribute found by the post-import hook is logged; the import still works."""
    module_name = write_module("entry", MAIN_SOURCE)
    install([f"{module_name}:Missing.run", f"{module_name}:main"], client=client)

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        module = importlib.import_module(module_name)
    module.main()

    assert len(error_messages(caplog)) == 1
    assert len(recorded_runs(client)) == 1


@pytest.mark.parametrize(
    ("qualname", "message"),
    [
        ("LIMIT", "is a int, not callable"),
        ("LIMIT.bit_length", "LIMIT in LIMIT.bit_length is a int, not a class"),
    ],
)
def test_unpatchable_target_logged(
    write_module: ModuleWriter,
    client: TelemetryClient,
    caplog: pytest.LogCaptureFixture,
    qualname: str,
    message: str,
) -> None:
    """A target that is not callable, or a path through a non-class, is logged and skipped."""
    module = importlib.import_module(write_module("entry", "LIMIT = 3\n"))

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        install([f"{module.__name__}:{qualname}"], client=client)

    assert module.LIMIT == 3
    errors = error_messages(caplog)
    assert len(errors) == 1
    assert message in errors[0]


FROZEN_SOURCE = """
    class Frozen(type):
        def __setattr__(cls, name, value):
            raise RuntimeError("class attributes are read-only")


    class Agent(metaclass=Frozen):
        def run(self):
            return "ran"
"""


def test_patch_error_import_succeeds(
    write_module: ModuleWriter, client: TelemetryClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception while patching in the post-import hook is logged, not raised into import."""
    module_name = write_module("agents", FROZEN_SOURCE)
    install([f"{module_name}:Agent.run"], client=client)

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        module = importlib.import_module(module_name)

    assert module.Agent().run() == "ran"
    errors = error_messages(caplog)
    assert len(errors) == 1
    assert "class attributes are read-only" in errors[0]


def test_install_inside_module_logged(
    write_module: ModuleWriter, client: TelemetryClient, caplog: pytest.LogCaptureFixture
) -> None:
    """install() called by the module that defines the entry point logs why it cannot patch."""
    source = """
        from instrument.autopatch import install

        install([__name__ + ":main"])

        def main():
            return "done"
    """
    module_name = write_module("entry", source)

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        module = importlib.import_module(module_name)

    assert module.main() == "done"
    errors = error_messages(caplog)
    assert len(errors) == 1
    assert "still being imported" in errors[0]


def test_missing_module_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    """A module that was never imported and cannot be found is logged as a warning once."""
    install(["no_such_package_3f1a.entry:main"])

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        autopatch._report_unpatched()
        autopatch._report_unpatched()

    warnings = error_messages(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert "no_such_package_3f1a.entry:main" in warnings[0]
    assert "module not found" in warnings[0]


def test_unused_module_not_reported(
    write_module: ModuleWriter, caplog: pytest.LogCaptureFixture
) -> None:
    """A module that exists but was not imported is not warned about, and is not imported."""
    module_name = write_module("entry", MAIN_SOURCE)
    package = module_name.partition(".")[0]
    install([f"{module_name}:main"])

    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        autopatch._report_unpatched()

    assert error_messages(caplog, logging.WARNING) == []
    assert package not in sys.modules


# -- import instrument.auto ------------------------------------------------------------------


def test_auto_installs_from_environment(
    write_module: ModuleWriter, client: TelemetryClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Importing instrument.auto installs the entry points that TELEMETRY_INSTRUMENT names."""
    module_name = write_module("entry", MAIN_SOURCE)
    monkeypatch.setenv(INSTRUMENT_ENV, f"{module_name}:main=from-env")
    monkeypatch.delitem(sys.modules, "instrument.auto", raising=False)
    set_default_client(client)
    try:
        importlib.import_module("instrument.auto")
        importlib.import_module(module_name).main()
    finally:
        set_default_client(None)

    assert [run.agent_name for run in recorded_runs(client)] == ["from-env"]


def test_malformed_package_entry_point_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A package entry point whose value is not module:qualname is logged and skipped."""
    dist_info = tmp_path / "site" / "broken_agents-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-agents\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[agent_telemetry.entry_points]\nbad one = not a spec\ngood = json:dumps\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    specs = configured_entry_points(environ={})

    assert [spec.target for spec in specs if spec.module == "json"] == ["json:dumps"]
    assert "not a spec" in caplog.text


@pytest.mark.parametrize("facade_first", [True, False])
def test_reexported_entry_point_recorded_once(
    write_module: ModuleWriter, client: TelemetryClient, facade_first: bool
) -> None:
    """An entry point re-exported by another module is wrapped once and fully restored."""
    cli = importlib.import_module(write_module("cli", MAIN_SOURCE))
    original = cli.main
    facade = importlib.import_module(write_module("facade", f"from {cli.__name__} import main\n"))
    specs = [f"{facade.__name__}:main=via-facade", f"{cli.__name__}:main=via-cli"]

    install(specs if facade_first else specs[::-1], client=client)
    facade.main()

    assert len(recorded_runs(client)) == 1
    uninstall()
    assert facade.main is original
    assert cli.main is original
