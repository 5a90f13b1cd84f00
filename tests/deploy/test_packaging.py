"""A wheel install works on its own: it finds its migrations and default settings as package
data (no ``EVENTSCHED_SQL_DIR``/``EVENTSCHED_SETTINGS``, no checkout beside it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import psycopg
import pytest

from tests.support.proc import REPO


def _run(
    args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)]
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("eventsched-*.whl")
    return path


def test_the_wheel_ships_its_data_its_types_and_its_license(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped_sql = {n.rsplit("/", 1)[1] for n in names if n.startswith("eventsched/_data/sql/")}
    assert shipped_sql == {p.name for p in (REPO / "sql").glob("*.sql")}
    assert "eventsched/_data/settings.toml" in names
    assert "eventsched/py.typed" in names
    # The web console's templates and static files (plugins/api/console.py reads them from
    # beside the module): every one of the checkout's, htmx with its licence.
    api = REPO / "eventsched" / "plugins" / "api"
    for folder in ("templates", "static"):
        shipped = {n for n in names if n.startswith(f"eventsched/plugins/api/{folder}/")}
        expected = {f"eventsched/plugins/api/{folder}/{p.name}" for p in (api / folder).iterdir()}
        assert shipped == expected, folder
    assert "eventsched/plugins/api/static/htmx.LICENSE" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert wheel.name.startswith(f"eventsched-{version}-")


def test_a_wheel_install_migrates_a_fresh_database(
    wheel: Path, tmp_path: Path, empty_database: str
) -> None:
    venv = tmp_path / "venv"
    # Without pip of its own (bootstrapping one takes ~3 s): this pip installs into it.
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert made.returncode == 0, made.stderr
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q"]
    installed = _run([*pip, "-c", str(REPO / "constraints.txt"), str(wheel)])
    assert installed.returncode == 0, installed.stderr
    # Run from an empty directory with nothing of the checkout in the environment.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "EVENTSCHED_ENV": "production",
        "EVENTSCHED_POSTGRES__DSN": empty_database,
    }
    work = tmp_path / "elsewhere"
    work.mkdir()
    eventsched = str(venv / "bin" / "eventsched")
    up = _run([eventsched, "migrate", "up"], cwd=work, env=env)
    assert up.returncode == 0, up.stderr
    latest = max(int(p.name.split("_", 1)[0]) for p in (REPO / "sql").glob("*.up.sql"))
    version = _run([eventsched, "migrate", "version"], cwd=work, env=env)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == str(latest)
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT to_regclass('events') IS NOT NULL").fetchone() == (True,)
    shown = _run(
        [str(venv / "bin" / "python"), "-c", "import eventsched; print(eventsched.__version__)"],
        cwd=work,
        env=env,
    )
    assert shown.stdout.strip() == wheel.name.split("-")[1]
    # The console's templates load from the installed package (not from a checkout).
    templates = _run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from eventsched.plugins.api.console import STATIC, _environment\n"
            "env = _environment()\n"
            "for name in env.list_templates(): env.get_template(name)\n"
            "print(len(env.list_templates()), (STATIC / 'htmx.min.js').is_file(),"
            " env.loader.searchpath[0])",
        ],
        cwd=work,
        env=env,
    )
    assert templates.returncode == 0, templates.stderr
    count, htmx, where = templates.stdout.split()
    assert int(count) >= 7 and htmx == "True" and where.startswith(str(venv)), templates.stdout
