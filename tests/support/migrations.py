"""Migration files for the migrate tests: the repository's and ones written by a test."""

from __future__ import annotations

from pathlib import Path

from tests.support.proc import REPO

REPO_SQL_DIR = REPO / "sql"


def write_migrations(directory: Path, files: dict[str, str]) -> Path:
    """Create ``directory`` holding ``{file name: SQL}``."""
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, body in files.items():
        (directory / file_name).write_text(body, encoding="utf-8")
    return directory
