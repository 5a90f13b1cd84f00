"""Every benchmark's ``--quick`` mode completes and writes sane JSON.

These tests keep ``bench/`` working; they check what the benchmarks measured happened
(every event ran, rows and jobs are where they belong, nothing started early), never how
fast: numbers come from full runs recorded in ``bench/RESULTS.md``. Each script brings its
own embedded stack, so the suite's services are not involved.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.proc import REPO

pytestmark = pytest.mark.slow


def run_bench(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m bench.<name> --quick ARGS`` from the repository root; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_quick(name: str, out_dir: Path, timeout: float = 150.0) -> dict[str, Any]:
    proc = run_bench(name, "--out-dir", str(out_dir), timeout=timeout)
    (path,) = out_dir.glob(f"{name}-*.json")
    doc: dict[str, Any] = json.loads(path.read_text())
    assert doc["benchmark"] == name and doc["quick"] is True
    assert doc["machine"]["nproc"] >= 1 and doc["git"]["commit"]
    assert "plot_error" not in doc, doc.get("plot_error")
    assert Path(doc["plot"]).is_file() and Path(doc["plot"]).parent == out_dir
    # The summary table is printed for the log, and quick runs never touch RESULTS.md.
    assert f"### {name} " in proc.stdout
    return dict(doc["results"])


def test_lateness_quick(tmp_path: Path) -> None:
    r = run_quick("lateness", tmp_path)
    ours, stock = r["ours"], r["stock_saq"]
    fed = ours["fed"]["sent"]
    assert fed > 100
    assert ours["statuses"] == {"succeeded": fed}
    assert ours["attempt_rows"] == fed and ours["outcomes"] == {"succeeded": fed}
    assert ours["lateness_ms"]["count"] == fed
    assert ours["lateness_ms"]["early"] == 0 and ours["early_by_lateness_ms"] == 0
    assert ours["memory"]["hwm_mb"] > 0
    assert stock["finished"] == fed and stock["lateness_ms"]["count"] == fed
    assert stock["lateness_ms"]["min"] >= 0  # stock SAQ never starts early either


def test_throughput_quick(tmp_path: Path) -> None:
    r = run_quick("throughput", tmp_path)
    count = r["count"]
    assert [d["processes"] for d in r["ours"]] == [1, 2]
    for d in r["ours"]:
        assert d["all_finished"] and d["statuses"] == {"succeeded": count}
        assert d["throughput_finished"]["count"] == count and d["throughput_finished"]["per_s"] > 0
        assert d["load"]["enqueued"] == count
    assert r["targets"]["scaling"] > 0  # two executors' throughput over one's
    assert r["stock_saq"]["finished"] == count
    assert r["stock_saq"]["throughput_finished"]["per_s"] > 0


def test_ingest_quick(tmp_path: Path) -> None:
    r = run_quick("ingest", tmp_path)
    count = r["count"]
    assert r["rows"] == r["jobs"] == r["committed"] == count
    assert r["rate_commit_per_s"] > 0 and r["rate_recorded_at_per_s"] > 0
    assert r["consumer_metrics"]["consumed"] == count
    assert r["memory"]["hwm_mb"] > 0


def test_e2e_quick(tmp_path: Path) -> None:
    r = run_quick("e2e", tmp_path)
    generated = r["generated"]
    assert generated > 100 and r["all_ran"]
    assert r["outcomes"] == {"succeeded": generated}
    assert r["lateness_ms"]["count"] == generated and r["lateness_ms"]["early"] == 0
    assert r["ingest_latency_ms"]["count"] == generated
    assert r["lag_series"] and r["lag"]["after_drain"] == 0
    assert all(r["memory"][role]["hwm_mb"] > 0 for role in ("producer", "consumer", "executor"))


def test_memory_quick(tmp_path: Path) -> None:
    r = run_quick("memory", tmp_path)
    backlog, generated = r["backlog"], r["generated"]
    assert r["loaded"]["enqueued"] == backlog
    assert r["statuses"] == {"scheduled": backlog, "succeeded": generated}
    assert r["sizes_after"]["redis_jobs_incomplete"] == backlog
    assert r["lateness_ms"]["early"] == 0
    assert all(r["memory"][role]["hwm_mb"] > 0 for role in ("consumer", "executor"))
    assert r["rss_series"]["executor"][0]


def run_json(name: str) -> dict[str, Any]:
    """Run ``bench.<name> --quick`` (a script without the harness: it prints one JSON line)."""
    proc = run_bench(name, timeout=120)
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["benchmark"] == name and doc["quick"] is True
    return doc


def test_loop_quick() -> None:
    doc = run_json("loop")
    assert set(doc["us_per_wakeup"]) == {"asyncio", "trio-asyncio stock", "trio-asyncio batched"}
    assert all(v > 0 for v in doc["us_per_wakeup"].values())


def test_pg_statements_quick() -> None:
    doc = run_json("pg_statements")
    assert [r["batch"] for r in doc["rows"]] == [1, 5]
    assert all(r["events"] == 40 and r["backend_cpu_us_per_event"] >= 0 for r in doc["rows"])


def test_api_quick(tmp_path: Path) -> None:
    r = run_quick("api", tmp_path)
    assert r["acknowledged"] == r["in_topic"] > 0  # every 202 is an event in the topic
    closed, fixed = r["throughput"], r["fixed_rate"]
    assert closed["statuses"] == {"202": closed["acknowledged"]} and closed["events_per_s"] > 0
    assert fixed["statuses"] == {"202": fixed["requests"]}
    assert fixed["latency_ms"]["count"] == fixed["requests"]
