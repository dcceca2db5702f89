"""Instrumentation for agent-telemetry: decorators and auto-patching of agent entry points.

Empty for now; the decorator and the import-time patching build on the ``telemetry`` package.
"""

__all__: list[str] = []
