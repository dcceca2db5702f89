"""Patch agent entry points when their modules are imported.

An entry point is a program's main function, named by a spec ``module:qualname`` with an
optional ``=agent_name``, such as ``agents.entry:main=nightly-import`` or
``agents.entry:Agent.run``. Specs come from the ``TELEMETRY_INSTRUMENT`` environment
variable (comma-separated) and from installed packages that register them under the
entry-point group ``agent_telemetry.entry_points``.

``install()`` registers a post-import hook (``wrapt.register_post_import_hook``) for each
module, so an entry point is patched right after its module is imported, or at once when it
already was. The attribute is replaced by ``instrument.decorators.wrap_entry_point``, which
records each call as a run and treats a non-zero integer return as a failed exit code.
Module globals elsewhere that still hold the original function (``from agents.entry import
main`` run before patching) are rebound to the wrapper as well. ``uninstall()`` puts the
originals back where the wrapper is still in place.

Faults never reach the program: a malformed spec from the environment, a missing attribute,
or an error while patching is logged on ``telemetry.instrument`` and the entry point is
skipped. A spec whose module cannot be found is logged when the interpreter exits, because
before then the program may still add its directory to ``sys.path``.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import wrapt

from instrument._specs import (
    ENTRY_POINT_GROUP,
    INSTRUMENT_ENV,
    EntryPointSpec,
    configured_entry_points,
)

if TYPE_CHECKING:
    from telemetry.client import TelemetryClient

__all__ = [
    "ENTRY_POINT_GROUP",
    "INSTRUMENT_ENV",
    "EntryPointSpec",
    "configured_entry_points",
    "install",
    "uninstall",
]

logger = logging.getLogger("telemetry.instrument")


def install(
    entry_points: Iterable[str | EntryPointSpec] | None = None,
    *,
    client: TelemetryClient | None = None,
) -> None:
    """Patch each entry point when its module is imported, or now if it already is.

    A target that is already installed is left as it is, so installing twice patches once.
    A target that cannot be patched is logged on ``telemetry.instrument`` and skipped.

    Args:
        entry_points: specs or spec strings; None installs ``configured_entry_points()``.
        client: the TelemetryClient that records the runs. None uses the process-wide
            default client (``instrument.get_default_client()``), created from the
            environment on the first call.

    Raises:
        TypeError: ``entry_points`` is a string, or an item is neither a string nor a spec.
        ValueError: an item of ``entry_points`` is a malformed spec.
    """
    if entry_points is None:
        specs = configured_entry_points()
    elif isinstance(entry_points, str):
        raise TypeError(
            f"install() takes a list of specs, not the string {entry_points!r}; "
            f"pass [{entry_points!r}]"
        )
    else:
        specs = [_as_spec(item) for item in entry_points]

    added: list[str] = []
    with _lock:
        for spec in specs:
            installed = _patches.get(spec.target)
            if installed is not None:
                if installed.spec.agent_name != spec.agent_name:
                    logger.warning(
                        "entry point %s from %s is already installed as %s; kept that one",
                        spec,
                        spec.source,
                        installed.spec,
                    )
                continue
            _patches[spec.target] = _Patch(spec, client)
            if spec.module not in added:
                added.append(spec.module)
        _register_exit_report()

    for module_name in added:
        module = sys.modules.get(module_name)
        if module is not None:
            _patch_module(module_name, module, imported_before=True)
            continue
        with _lock:
            if module_name in _hooked_modules:
                continue  # a hook from an earlier install() is still waiting for the import
            _hooked_modules.add(module_name)
        # Registered outside the lock: wrapt calls the hook at once when another thread
        # has imported the module since the check above, and the hook takes the lock.
        wrapt.register_post_import_hook(_make_import_hook(module_name), module_name)


def uninstall() -> None:
    """Restore every patched entry point and forget the installed specs.

    An attribute is restored only while its value is still our wrapper. One that was
    replaced since is left alone. Hooks for modules not imported yet stay registered with wrapt,
    which has no way to remove them, but they patch nothing until ``install()`` names their
    module again. References to the wrapper that were taken while it was installed keep
    recording runs.
    """
    with _lock:
        patches = list(_patches.values())
        _patches.clear()
        for patch in patches:
            if patch.state == "patched":
                _restore(patch)


# -- state ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Patch:
    """One installed spec, and what patching it changed, for uninstall."""

    spec: EntryPointSpec
    client: TelemetryClient | None
    state: str = "pending"  # pending, then patched or failed
    owner: Any = None  # the module or class whose attribute is patched
    attribute: str = ""
    original: Any = None
    wrapper: Any = None
    owned_before: bool = True  # the attribute was in owner.__dict__, not inherited
    aliases: list[tuple[ModuleType, str]] = field(default_factory=list)


_lock = threading.RLock()


def _reset_lock_in_child() -> None:
    # A fork while a hook in another thread holds the lock would leave it held forever in
    # the child, which then hangs in its next hook or in the report at exit.
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)

_patches: dict[str, _Patch] = {}  # by target, module:qualname
_hooked_modules: set[str] = set()  # modules with a hook that wrapt has not called yet
_reported: set[tuple[str, str]] = set()  # (target, reason) already logged in this process
_exit_report_registered = False


def _as_spec(item: str | EntryPointSpec) -> EntryPointSpec:
    if isinstance(item, EntryPointSpec):
        return item
    return EntryPointSpec.parse(item)


# -- patching -------------------------------------------------------------------------------


def _make_import_hook(module_name: str) -> Callable[[ModuleType], None]:
    def hook(module: ModuleType) -> None:
        with _lock:
            _hooked_modules.discard(module_name)
        _patch_module(module_name, module, imported_before=False)

    return hook


def _patch_module(module_name: str, module: ModuleType, *, imported_before: bool) -> None:
    """Patch the pending entry points of ``module``; log every fault instead of raising.

    Called by the post-import hook, where an exception would fail the program's import,
    and by install() for a module imported before it (``imported_before``).
    """
    try:
        with _lock:
            pending = [
                patch
                for patch in _patches.values()
                if patch.spec.module == module_name and patch.state == "pending"
            ]
            for patch in pending:
                _apply(patch, module, imported_before)
    except Exception:
        logger.exception("failed to patch the entry points of module %s", module_name)


def _apply(patch: _Patch, module: ModuleType, imported_before: bool) -> None:
    spec = patch.spec
    try:
        _patch_attribute(patch, module, imported_before)
    except _SkipEntryPoint as exc:
        patch.state = "failed"
        _log_once(spec, str(exc), logging.ERROR, "entry point %s from %s is not patched: %s")
        return
    except Exception as exc:
        patch.state = "failed"
        _log_once(
            spec,
            f"{type(exc).__name__}: {exc}",
            logging.ERROR,
            "entry point %s from %s is not patched: %s",
            exc_info=True,
        )
        return
    patch.state = "patched"
    logger.debug("patched entry point %s from %s", spec, spec.source)


class _SkipEntryPoint(Exception):
    """The target cannot be patched. The message gives the reason, for the log."""


def _patch_attribute(patch: _Patch, module: ModuleType, imported_before: bool) -> None:
    spec = patch.spec
    # The import system keeps __spec__._initializing true until the module's code has run.
    # A post-import hook runs just before that flag is cleared, so only install() checks it.
    module_spec = getattr(module, "__spec__", None)
    if imported_before and getattr(module_spec, "_initializing", False):
        raise _SkipEntryPoint(
            f"module {spec.module} was still being imported when install() ran (from "
            "inside the module, a circular import or another thread); call install() "
            "before the import, for example from the main script, or use telemetry-instrument"
        )

    *class_path, attribute = spec.qualname.split(".")
    owner: Any = module
    for name in class_path:
        owner = getattr(owner, name, _MISSING)
        if owner is _MISSING:
            raise _SkipEntryPoint(f"module {spec.module} has no attribute {spec.qualname}")
        if not isinstance(owner, type):
            raise _SkipEntryPoint(
                f"{name} in {spec.qualname} is a {type(owner).__name__}, not a class; a "
                "qualname names a module attribute or a method of a class"
            )

    original, owned_before = _lookup_raw(owner, attribute)
    if original is _MISSING:
        raise _SkipEntryPoint(f"module {spec.module} has no attribute {spec.qualname}")
    if not (callable(original) or isinstance(original, (classmethod, staticmethod))):
        raise _SkipEntryPoint(f"{spec.qualname} is a {type(original).__name__}, not callable")

    patch.owner = owner
    patch.attribute = attribute
    patch.owned_before = owned_before
    shared = _patch_with_wrapper(original, patch)
    if shared is not None:
        # The attribute already refers to another entry point's wrapper, as when a package
        # re-exports its module's main. Each call is then recorded once, under that entry
        # point, and uninstall() restores this attribute to the function as well.
        patch.original = shared.original
        patch.wrapper = shared.wrapper
        return

    wrap_entry_point = _load_wrap_entry_point()
    wrapper = wrap_entry_point(
        original, agent_name=spec.run_agent_name, job_type=spec.module, client=patch.client
    )
    patch.original = original
    patch.wrapper = wrapper
    if wrapper is original:
        return  # telemetry is disabled and the decorator left the function as it is
    setattr(owner, attribute, wrapper)
    if isinstance(owner, ModuleType):
        # Only module-level functions, because a global that refers to a method may mean a
        # base class's method, whose calls a spec naming a subclass must not record.
        patch.aliases = _rebind_aliases(original, wrapper)


_MISSING: Any = object()


def _patch_with_wrapper(value: Any, patch: _Patch) -> _Patch | None:
    """Return the installed patch, other than ``patch``, whose wrapper is ``value``."""
    for other in _patches.values():
        if other is not patch and other.wrapper is value and other.wrapper is not other.original:
            return other
    return None


def _lookup_raw(owner: Any, attribute: str) -> tuple[Any, bool]:
    """Return the attribute as stored, without binding, and whether ``owner`` itself has it.

    A class attribute is looked up through the MRO, so a classmethod or staticmethod comes
    back as that object and is wrapped as the decorator would wrap it in the class body.
    """
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if attribute in klass.__dict__:
                return klass.__dict__[attribute], klass is owner
        return _MISSING, False
    namespace = owner.__dict__
    if attribute in namespace:
        return namespace[attribute], True
    # A module-level __getattr__ (PEP 562) may provide it; setting the attribute then
    # shadows __getattr__ until uninstall deletes it again.
    return getattr(owner, attribute, _MISSING), False


def _load_wrap_entry_point() -> Callable[..., Any]:
    # Imported when the first entry point is patched, so that importing this module, as
    # the launcher's sitecustomize does in every Python process, does not import the client.
    from instrument.decorators import wrap_entry_point

    return wrap_entry_point


def _rebind_aliases(original: object, wrapper: object) -> list[tuple[ModuleType, str]]:
    """Point module globals that hold ``original`` at ``wrapper``; return what was changed.

    Only globals of loaded modules are rebound; references held in other objects (class
    attributes, closures, default arguments, containers) keep the original.
    """
    rebound = []
    for module in list(sys.modules.values()):
        if not isinstance(module, ModuleType):
            continue
        # object.__getattribute__ reads the namespace without running a module subclass's
        # __getattribute__, which in a lazy module (importlib.util.LazyLoader) would load it.
        namespace = object.__getattribute__(module, "__dict__")
        for name, value in list(namespace.items()):
            if value is original:
                namespace[name] = wrapper
                rebound.append((module, name))
    return rebound


def _restore(patch: _Patch) -> None:
    spec = patch.spec
    if patch.wrapper is patch.original:
        return
    try:
        if patch.owner.__dict__.get(patch.attribute) is patch.wrapper:
            if patch.owned_before:
                setattr(patch.owner, patch.attribute, patch.original)
            else:
                delattr(patch.owner, patch.attribute)
        else:
            logger.info(
                "entry point %s was replaced after patching; left the replacement in place",
                spec,
            )
        for module, name in patch.aliases:
            namespace = object.__getattribute__(module, "__dict__")
            if namespace.get(name) is patch.wrapper:
                namespace[name] = patch.original
    except Exception:
        logger.exception("failed to restore entry point %s", spec)


# -- reporting ------------------------------------------------------------------------------


def _log_once(
    spec: EntryPointSpec,
    reason: str,
    level: int,
    message: str,
    *,
    exc_info: bool = False,
) -> None:
    key = (spec.target, reason)
    if key in _reported:
        logger.debug(message, spec, spec.source, reason)
        return
    _reported.add(key)
    logger.log(level, message, spec, spec.source, reason, exc_info=exc_info)


def _register_exit_report() -> None:
    global _exit_report_registered
    if not _exit_report_registered:
        atexit.register(_report_unpatched)
        _exit_report_registered = True


def _report_unpatched() -> None:
    """Log the installed entry points whose module was never imported in this process.

    A module that cannot be found, or that ran as ``__main__`` (``python -m``), is logged as
    a warning, once per target. A module that exists but that this process did not import
    is logged at debug level, because a child process of the program may well not use it.
    Runs at interpreter exit.
    """
    with _lock:
        pending = [patch.spec for patch in _patches.values() if patch.state == "pending"]
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    for spec in pending:
        if spec.module in sys.modules:
            continue
        if getattr(main_spec, "name", None) == spec.module:
            _log_once(
                spec,
                "module ran as __main__",
                logging.WARNING,
                "entry point %s from %s was not patched: %s (python -m), and a module run "
                "that way is not imported under its name; run it through a console script "
                "or a script that imports it",
            )
        elif _module_exists(spec.module) is False:
            _log_once(
                spec,
                "module not found",
                logging.WARNING,
                "entry point %s from %s was not patched: %s; check the spelling and sys.path",
            )
        else:
            logger.debug("entry point %s: module %s was not imported", spec, spec.module)


def _module_exists(name: str) -> bool | None:
    """Return whether module ``name`` can be found, or None when finding out would import it.

    ``find_spec`` of a dotted name imports its parent package, which would run the
    program's code at exit. So only the first part of the name that is not imported yet
    is looked up: when it is missing, so is the module.
    """
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if prefix in sys.modules:
            continue
        if not _find_spec(prefix):
            return False
        return True if depth == len(parts) else None
    return True


def _find_spec(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
