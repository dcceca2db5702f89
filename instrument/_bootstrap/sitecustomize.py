"""Start auto-instrumentation in each Python process that has this directory on PYTHONPATH.

telemetry-instrument puts this directory first on PYTHONPATH, so the site module imports
this file at startup, before the program's main module runs. It imports ``instrument.auto``,
which patches the entry points named in the environment, and then runs the sitecustomize
module that Python would have imported without this directory, if there is one.

Only the standard library is imported at the top, so the second step also works under a
Python that cannot import agent-telemetry.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys

__all__: list[str] = []

_BOOTSTRAP_DIR = os.path.dirname(os.path.realpath(__file__))


def _start_instrumentation() -> None:
    logger = logging.getLogger("telemetry.instrument")
    try:
        import instrument.auto  # noqa: F401
    except ImportError as exc:
        logger.warning(
            "telemetry-instrument: agent-telemetry cannot be imported by %s (%s); the "
            "program runs without auto-instrumentation",
            sys.executable,
            exc,
        )
    except Exception:
        logger.exception("telemetry-instrument: auto-instrumentation failed to start")


def _run_next_sitecustomize() -> None:
    """Find sitecustomize on sys.path without this directory, and execute it in its place.

    The module executed here replaces this one in ``sys.modules``, so ``import
    sitecustomize`` in the program returns it as it would without telemetry-instrument. An
    exception it raises propagates, and the site module reports it as usual.
    """
    search_path = [
        entry for entry in sys.path if os.path.realpath(entry or os.curdir) != _BOOTSTRAP_DIR
    ]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", search_path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_start_instrumentation()
_run_next_sitecustomize()
