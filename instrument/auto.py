"""Install auto-instrumentation from the environment when imported: ``import instrument.auto``.

The import patches the entry points named in ``TELEMETRY_INSTRUMENT`` and those that
installed packages register under ``agent_telemetry.entry_points``, as
``instrument.autopatch.install()`` does. Import it before the modules that use the entry
points, so that no module binds the original function under another name first. An
exception raised by ``install()`` is logged on ``telemetry.instrument``, and the import
still succeeds, so the program runs without instrumentation.
"""

from __future__ import annotations

import logging

from instrument.autopatch import install

__all__: list[str] = []


def _install_from_environment() -> None:
    try:
        install()
    except Exception:
        logging.getLogger("telemetry.instrument").exception(
            "auto-instrumentation failed to start; the program runs without it"
        )


_install_from_environment()
