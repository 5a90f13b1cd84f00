"""What the dev stack tells its user without any server: the hint of a command that found
no server while a dev stack runs from this directory, and the live summary's wording (which
counts are this run's, which are PostgreSQL totals; the HTTP port, the logs, the env file,
the memory-only broker)."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from eventsched.core.operations.devstack import env_file_hint, running_stack_env
from eventsched.core.operations.summary import BROKER_MEMORY_ONLY, DevFacts, Snapshot

STACK_ENV = {
    "EVENTSCHED_POSTGRES__DSN": "postgresql://postgres@127.0.0.1:41234/eventsched",
    "EVENTSCHED_REDIS__URL": "redis://127.0.0.1:41235/0",
    "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:41236",
}
DEFAULTS = {
    "EVENTSCHED_POSTGRES__DSN": "postgresql://postgres@127.0.0.1:5432/eventsched",
    "EVENTSCHED_REDIS__URL": "redis://127.0.0.1:6379/0",
    "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": "localhost:9092",
}


@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _stack_files(data_dir: Path, pid: int, env: dict[str, str] = STACK_ENV) -> Path:
    data_dir.mkdir(parents=True)
    (data_dir / "lock").write_text(f"{pid}\n")
    (data_dir / "env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return data_dir


def test_a_command_at_the_defaults_is_told_to_source_the_running_stacks_env_file(
    tmp_path: Path, live_pid: int
) -> None:
    data_dir = _stack_files(tmp_path / ".eventsched" / "dev", live_pid)
    assert running_stack_env(data_dir) == STACK_ENV
    hint = env_file_hint(data_dir, DEFAULTS)
    assert hint is not None
    assert f"set -a; . {data_dir / 'env'}; set +a" in hint
    # It names the settings that differ, never their values (a DSN may carry a password).
    assert "EVENTSCHED_POSTGRES__DSN" in hint and "41234" not in hint


def test_no_hint_when_the_settings_already_point_at_the_stack(
    tmp_path: Path, live_pid: int
) -> None:
    data_dir = _stack_files(tmp_path / "dev", live_pid)
    assert env_file_hint(data_dir, STACK_ENV) is None


def test_no_hint_without_a_running_stack(tmp_path: Path) -> None:
    assert env_file_hint(tmp_path / "nothing-here", DEFAULTS) is None
    # A stack killed with kill -9 leaves its lock and env files behind: its pid is gone.
    dead = subprocess.Popen(["true"])
    dead.wait()
    data_dir = _stack_files(tmp_path / "dev", dead.pid)
    assert running_stack_env(data_dir) is None
    assert env_file_hint(data_dir, DEFAULTS) is None
    # A stack that stopped cleanly empties its lock file.
    (data_dir / "lock").write_text("")
    assert env_file_hint(data_dir, DEFAULTS) is None


def _rendered(snap: Snapshot) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(snap.table())
    return out.getvalue()


def test_the_summary_says_which_counts_are_this_runs_and_which_are_postgresql_totals() -> None:
    snap = Snapshot(
        stack={"postgres": "postgresql://...", "kafka": "127.0.0.1:9"},
        facts=DevFacts(env_file=".eventsched/dev/env", log_dir=".eventsched/dev/logs"),
        http_port=8765,
        produced=7,
        statuses={"succeeded": 41},
    )
    table = _rendered(snap)
    lines = table.splitlines()
    this_run = next(i for i, line in enumerate(lines) if "this run" in line)
    totals = next(i for i, line in enumerate(lines) if "PostgreSQL totals" in line)
    produced = next(i for i, line in enumerate(lines) if "produced" in line)
    succeeded = next(i for i, line in enumerate(lines) if "succeeded" in line)
    assert this_run < produced < totals < succeeded
    assert "7" in lines[produced] and "41" in lines[succeeded]
    assert "every run" in lines[totals]
    assert "http://127.0.0.1:8765" in table
    assert ".eventsched/dev/logs" in table
    assert "set -a; . .eventsched/dev/env; set +a" in table
    kafka = next(line for line in lines if "127.0.0.1:9" in line)
    assert "in memory only" in kafka and BROKER_MEMORY_ONLY.startswith("in memory only")
    line = snap.line()
    assert "this run: produced 7" in line
    assert "PostgreSQL totals (every run): scheduled 0 running 0 succeeded 41" in line
    assert "http://127.0.0.1:8765" in line


def test_the_summary_before_the_http_port_is_bound() -> None:
    assert "not bound yet" in Snapshot().line()
    assert "not bound yet" in _rendered(Snapshot())
