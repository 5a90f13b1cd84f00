"""Running the operator CLI: in the test process (click's runner), or as a child process
whose dependencies are all unreachable (start-up and usage errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from eventsched.cli import cli
from tests.support.proc import REPO, free_port


def run(settings: Path | None, *args: str) -> Result:
    """``eventsched [--settings FILE] ARGS...``; its exit code and output, nothing caught."""
    prefix = ["--settings", str(settings)] if settings else []
    return CliRunner().invoke(cli, [*prefix, *args], catch_exceptions=False)


def offline(*args: str, timeout: float = 30.0, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m eventsched ARGS`` with every dependency unreachable."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "EVENTSCHED_LOGGING__FORMAT": "json",
        "EVENTSCHED_POSTGRES__DSN": f"postgresql://postgres@127.0.0.1:{free_port()}/none",
        "EVENTSCHED_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0",
        "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "eventsched", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit code 2, no traceback, and one line on stderr that starts with ``message``."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-2000:]
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"eventsched: error: {message}"), result.stderr
