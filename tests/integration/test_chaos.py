"""The short seeded chaos run (bench/chaos.py): nothing lost, run twice or stuck while every
kind of fault fires at least once. The long test of the suite (about a minute); deselect it
with ``-m "not slow"``. A failure prints the seed and the event histories to replay it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.chaos import FAULT_KINDS
from tests.support.proc import REPO

pytestmark = pytest.mark.slow

SEED = 7


def test_a_seeded_chaos_run_loses_nothing_and_runs_nothing_twice(tmp_path: Path) -> None:
    result_path = tmp_path / "chaos.json"
    # The schedule fires every kind of fault once before any second one, however short the
    # run: the nine take ~30 s of their own (restarts, pauses, kills); with 0.5-1.5 s between
    # them they are all done within the 40 s of load (4,000 events at 100/s).
    # fmt: off
    argv = [sys.executable, "-m", "bench.chaos", "--seed", str(SEED), "--duration", "40",
            "--fault-gap", "0.5-1.5", "--rate", "100", "--delay-max", "10",
            "--drain-timeout", "90", "--json", str(result_path)]
    # fmt: on
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result_path.exists(), proc.stderr[-4000:]
    result = json.loads(result_path.read_text())
    report = f"{proc.stdout}\n{proc.stderr[-3000:]}"
    assert result["problem_counts"] == dict.fromkeys(result["problem_counts"], 0), report
    assert proc.returncode == 0, report
    assert set(result["faults_by_kind"]) == set(FAULT_KINDS), report
    assert result["produced"] > 1000 and result["succeeded"] > 0 and result["dead"] > 0, report
    assert result["malformed_in_dlq"] == result["malformed_sent"] > 0, report
