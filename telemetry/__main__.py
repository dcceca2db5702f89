"""Run the ``telemetry`` command as ``python -m telemetry``."""

import sys

from telemetry.cli import main

sys.exit(main())
