"""Running the operator CLI in the test process (click's runner)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from eventsched.cli import cli


def run(settings: Path | None, *args: str) -> Result:
    """``eventsched [--settings FILE] ARGS...``; its exit code and output, nothing caught."""
    prefix = ["--settings", str(settings)] if settings else []
    return CliRunner().invoke(cli, [*prefix, *args], catch_exceptions=False)
