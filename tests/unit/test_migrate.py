"""Migration files and errors that need no database (the migrations themselves run in
tests/integration/test_migrate.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from eventsched.core.runtime.errors import DependencyError, MigrationError
from eventsched.core.store import migrations
from tests.support.migrations import REPO_SQL_DIR, write_migrations


def test_repo_sql_dir_holds_a_valid_first_migration() -> None:
    found = migrations.list_migrations(REPO_SQL_DIR)
    assert [(m.version, m.name) for m in found][:1] == [(1, "init")]
    assert found[0].up_path.name == "000001_init.up.sql"
    assert found[0].down_path.name == "000001_init.down.sql"


def test_default_sql_dir_is_the_repo_sql_dir_unless_the_env_var_says_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(migrations.SQL_DIR_ENV, raising=False)
    assert migrations.default_sql_dir() == REPO_SQL_DIR
    monkeypatch.setenv(migrations.SQL_DIR_ENV, str(tmp_path))
    assert migrations.default_sql_dir() == tmp_path


def test_non_sql_files_are_ignored(tmp_path: Path) -> None:
    write_migrations(
        tmp_path,
        {"README.md": "notes", "000001_a.up.sql": "SELECT 1;", "000001_a.down.sql": "SELECT 1;"},
    )
    assert [m.version for m in migrations.list_migrations(tmp_path)] == [1]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param(
            {"000001_a.up.sql": ""}, "has no matching 000001_a.down.sql", id="missing-down"
        ),
        pytest.param({"000001_a.down.sql": ""}, "has no matching 000001_a.up.sql", id="missing-up"),
        pytest.param(
            {"000001_a.up.sql": "", "000001_a.down.sql": "", "init.up.sql": ""},
            "bad migration file name 'init.up.sql'",
            id="no-version",
        ),
        pytest.param(
            {"000001_a.up.sql": "", "000001_a.down.sql": "", "000002_b.upp.sql": ""},
            "bad migration file name '000002_b.upp.sql'",
            id="bad-direction",
        ),
        pytest.param(
            {"000001_a b.up.sql": "", "000001_a b.down.sql": ""},
            "bad migration file name",
            id="space-in-name",
        ),
        pytest.param(
            {
                "000001_a.up.sql": "",
                "000001_a.down.sql": "",
                "1_b.up.sql": "",
                "1_b.down.sql": "",
            },
            "duplicate migration version 1",
            id="duplicate-version",
        ),
        pytest.param(
            {"000001_a.up.sql": "", "000001_b.down.sql": ""},
            "duplicate migration version 1",
            id="up-and-down-names-differ",
        ),
        pytest.param({}, "no migration files", id="empty-dir"),
    ],
)
def test_malformed_sql_dir_is_rejected(tmp_path: Path, files: dict[str, str], message: str) -> None:
    write_migrations(tmp_path, files)
    with pytest.raises(MigrationError, match=message):
        migrations.list_migrations(tmp_path)


def test_missing_sql_dir_is_rejected_before_connecting(tmp_path: Path) -> None:
    # The DSN points nowhere: the directory must be checked first.
    with pytest.raises(MigrationError, match="does not exist"):
        migrations.up("postgresql://nobody@127.0.0.1:1/none", tmp_path / "nope")


def test_unreachable_postgres_is_a_dependency_error_without_the_password() -> None:
    dsn = "postgresql://postgres:s3cr3t-pw@127.0.0.1:1/eventsched"
    with pytest.raises(DependencyError) as failure:
        migrations.version(dsn)
    assert failure.value.dependency == "postgres"
    assert '"eventsched" on 127.0.0.1:1' in str(failure.value)
    assert "s3cr3t-pw" not in str(failure.value)


def test_invalid_dsn_is_reported_without_the_password() -> None:
    with pytest.raises(DependencyError) as failure:
        migrations.version("host=127.0.0.1 password=s3cr3t-pw dbname")
    assert "invalid DSN" in str(failure.value)
    assert "s3cr3t-pw" not in str(failure.value)
