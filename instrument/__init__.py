"""Instrumentation for agent-telemetry: record an agent's runs with one decorator.

::

    from instrument import current_run, tracked_run

    @tracked_run(agent_name="invoice-sync", job_type="sync")
    def sync_invoices() -> list[str]:
        current_run().log_event("fetched", {"count": 3})
        ...

Every call of ``sync_invoices`` is one run, recorded by the default client (settings
from the ``TELEMETRY_*`` variables) unless ``client=`` names another.

The names below are imported on first access. The launcher's sitecustomize imports this
package in every Python process it starts, and most of them never record a run, so they
should not pay for importing the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from instrument._client import get_default_client, set_default_client
    from instrument.autopatch import install, uninstall
    from instrument.decorators import tracked_run, wrap_entry_point
    from telemetry.context import current_run

__all__ = [
    "current_run",
    "get_default_client",
    "install",
    "set_default_client",
    "tracked_run",
    "uninstall",
    "wrap_entry_point",
]

_MODULE_OF_EXPORT = {
    "current_run": "telemetry.context",
    "get_default_client": "instrument._client",
    "install": "instrument.autopatch",
    "uninstall": "instrument.autopatch",
    "set_default_client": "instrument._client",
    "tracked_run": "instrument.decorators",
    "wrap_entry_point": "instrument.decorators",
}


def __getattr__(name: str) -> Any:
    """Import an exported name on first access, and keep it in the package's namespace."""
    module_name = _MODULE_OF_EXPORT.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
