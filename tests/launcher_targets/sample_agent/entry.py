"""The sample agent's main function, shaped like a console script's entry point.

The first argument picks what ``main`` does:

- ``ok``: print a line and return 0;
- ``return N``: print a line and return N, which ``sys.exit(main())`` makes the exit code;
- ``exit N``: print a line and raise ``SystemExit(N)``;
- ``spawn``: run ``run_sample_agent.py ok`` in a child Python process and return its
  exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the sample agent with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = sys.argv[1:] if argv is None else argv
    print(f"sample agent: {' '.join(args)}", flush=True)
    command = args[0] if args else "ok"
    if command == "return":
        return int(args[1])
    if command == "exit":
        raise SystemExit(int(args[1]))
    if command == "spawn":
        script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "run_sample_agent.py")
        return subprocess.run([sys.executable, script, "ok"], check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
