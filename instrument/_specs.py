"""Entry point specs: ``module:qualname[=agent_name]``, from the environment and from packages."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["ENTRY_POINT_GROUP", "INSTRUMENT_ENV", "EntryPointSpec", "configured_entry_points"]

logger = logging.getLogger("telemetry.instrument")

ENTRY_POINT_GROUP = "agent_telemetry.entry_points"
INSTRUMENT_ENV = "TELEMETRY_INSTRUMENT"

_SPEC_FORM = "module:qualname or module:qualname=agent_name, such as 'agents.entry:main=importer'"


@dataclass(frozen=True)
class EntryPointSpec:
    """An entry point to patch: the attribute ``qualname`` of ``module``.

    Attributes:
        module: the dotted name of the module that defines the entry point.
        qualname: a module attribute (``main``) or a method of a class (``Agent.run``).
        agent_name: the agent name of the recorded runs; None records ``qualname``.
        source: where the spec came from, for log messages; not part of equality.
    """

    module: str
    qualname: str
    agent_name: str | None = None
    source: str = field(default="install()", compare=False)

    def __post_init__(self) -> None:
        for name in ("module", "qualname", "agent_name", "source"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (name == "agent_name" and value is None):
                raise TypeError(
                    f"EntryPointSpec {name} must be a string, not {type(value).__name__}: {value!r}"
                )
        if not _is_dotted_name(self.module) or not _is_dotted_name(self.qualname):
            raise ValueError(
                f"invalid entry point {self.module}:{self.qualname} from {self.source}: "
                f"module and qualname must be dotted Python names; expected {_SPEC_FORM}"
            )
        if self.agent_name is not None and not self.agent_name.strip():
            raise ValueError(
                f"invalid entry point {self.module}:{self.qualname} from {self.source}: "
                "the agent name is empty; pass None to record the qualname"
            )

    @classmethod
    def parse(cls, text: str, source: str = "install()") -> EntryPointSpec:
        """Parse one spec, ``module:qualname[=agent_name]``; spaces around the parts are ignored.

        Raises:
            TypeError: ``text`` is not a string.
            ValueError: ``text`` is malformed; the message quotes it and shows the form.
        """
        if not isinstance(text, str):
            raise TypeError(f"an entry point spec must be a string, not {type(text).__name__}")
        target, has_name, agent_name = text.partition("=")
        module, has_colon, qualname = target.strip().partition(":")
        if not has_colon:
            raise ValueError(
                f"invalid entry point spec {text!r} from {source}: missing ':' between "
                f"module and qualname; expected {_SPEC_FORM}"
            )
        if has_name and not agent_name.strip():
            raise ValueError(
                f"invalid entry point spec {text!r} from {source}: the agent name after '=' "
                "is empty; leave out '=' to record the qualname"
            )
        if "," in text:
            raise ValueError(
                f"invalid entry point spec {text!r} from {source}: ',' separates specs in "
                f"{INSTRUMENT_ENV}, so a spec cannot contain one; pass each spec separately"
            )
        try:
            return cls(
                module.strip(),
                qualname.strip(),
                agent_name.strip() if has_name else None,
                source,
            )
        except ValueError:
            raise ValueError(
                f"invalid entry point spec {text!r} from {source}: module and qualname must "
                f"be dotted Python names; expected {_SPEC_FORM}"
            ) from None

    @property
    def target(self) -> str:
        """The patched attribute as ``module:qualname``."""
        return f"{self.module}:{self.qualname}"

    @property
    def run_agent_name(self) -> str:
        """The agent name recorded for calls: ``agent_name``, else ``qualname``."""
        return self.agent_name or self.qualname

    def __str__(self) -> str:
        suffix = f"={self.agent_name}" if self.agent_name is not None else ""
        return self.target + suffix


def configured_entry_points(environ: Mapping[str, str] | None = None) -> list[EntryPointSpec]:
    """Return the entry points named in ``TELEMETRY_INSTRUMENT`` and by installed packages.

    The variable comes first, so its agent name wins when both name the same target. Each
    target appears once. A malformed spec is logged as an error and skipped; empty items
    between commas are ignored.

    Args:
        environ: read instead of ``os.environ``.
    """
    env = os.environ if environ is None else environ
    specs = _parse_spec_list(env.get(INSTRUMENT_ENV, ""), INSTRUMENT_ENV)
    specs.extend(_specs_from_packages(ENTRY_POINT_GROUP))
    return _unique_targets(specs)


def _is_dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _parse_spec_list(text: str, source: str) -> list[EntryPointSpec]:
    specs = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            specs.append(EntryPointSpec.parse(item, source))
        except ValueError as exc:
            logger.error("%s; the spec is skipped", exc)
    return specs


def _specs_from_packages(group: str) -> list[EntryPointSpec]:
    try:
        found = importlib.metadata.entry_points(group=group)
    except Exception as exc:
        logger.error("cannot read the entry points of group %s: %s; none installed", group, exc)
        return []

    specs = []
    for entry_point in found:
        distribution = getattr(entry_point, "dist", None)
        source = f"entry point {entry_point.name!r} of {getattr(distribution, 'name', '?')}"
        try:
            # EntryPoint.module raises AttributeError on a value that is not module:attr.
            specs.append(
                EntryPointSpec(entry_point.module, entry_point.attr or "", entry_point.name, source)
            )
        except (ValueError, AttributeError) as exc:
            logger.error(
                "%s: invalid value %r (%s); expected module:qualname, the entry point is skipped",
                source,
                entry_point.value,
                exc,
            )
    return specs


def _unique_targets(specs: list[EntryPointSpec]) -> list[EntryPointSpec]:
    unique: dict[str, EntryPointSpec] = {}
    for spec in specs:
        first = unique.setdefault(spec.target, spec)
        if first.agent_name != spec.agent_name:
            logger.warning(
                "entry point %s from %s is also named %s by %s; kept the first",
                spec,
                spec.source,
                first,
                first.source,
            )
    return list(unique.values())
