"""A small agent package that the launcher tests run under telemetry-instrument."""
