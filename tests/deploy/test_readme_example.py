"""The README's handler example type-checks under ``mypy --strict`` against the package
(its ``py.typed`` and ``__all__``), as a user's code would be checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.readme import handler_example


def test_the_readme_handler_example_type_checks_strictly(tmp_path: Path) -> None:
    example = tmp_path / "myapp_handlers.py"
    example.write_text(handler_example())
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(example)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
