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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.proc import REPO

pytestmark = pytest.mark.slow

#: The scripts that take the harness's ``--out-dir`` and write their JSON and plot there;
#: the others print one JSON line.
HARNESSED = ("lateness", "throughput", "ingest", "e2e", "memory", "api", "limits")
#: Seconds one quick run may take while the others run beside it.
TIMEOUT = 300.0


class QuickRun:
    """``python -m bench.<name> --quick`` from the repository root, output in files (a pipe
    nobody reads while it runs could fill up)."""

    def __init__(self, name: str, work: Path) -> None:
        self.out_dir = work / name
        self.out_dir.mkdir()
        args = ["--out-dir", str(self.out_dir)] if name in HARNESSED else []
        self._stdout = work / f"{name}.stdout"
        self._stderr = work / f"{name}.stderr"
        with self._stdout.open("wb") as out, self._stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"bench.{name}", "--quick", *args],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    def stdout(self) -> str:
        """Its output once it has exited 0."""
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {TIMEOUT:g} s: {self._tail()}") from None
        assert self.proc.returncode == 0, self._tail()
        return self._stdout.read_text()

    def _tail(self) -> str:
        return self._stderr.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def quick_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, QuickRun]]:
    """Every selected benchmark's quick run, all started at once.

    Each brings its own stack and mostly waits (feeders at a fixed rate, due times, drains,
    group joins): one after another they took ~110 s, side by side about as long as the
    slowest. No test checks a number, only what happened, so sharing the cores is fine.
    """
    wanted = {
        item.name.removeprefix("test_").removesuffix("_quick")
        for item in request.session.items
        if item.module is request.module
    }
    work = tmp_path_factory.mktemp("bench-quick")
    runs = {name: QuickRun(name, work) for name in sorted(wanted)}
    try:
        yield runs
    finally:
        for run in runs.values():
            if run.proc.poll() is None:
                run.proc.kill()  # its servers and roles die with it (PDEATHSIG)
                run.proc.wait()


def run_quick(runs: dict[str, QuickRun], name: str) -> dict[str, Any]:
    run = runs[name]
    stdout = run.stdout()
    (path,) = run.out_dir.glob(f"{name}-*.json")
    doc: dict[str, Any] = json.loads(path.read_text())
    assert doc["benchmark"] == name and doc["quick"] is True
    assert doc["machine"]["nproc"] >= 1 and doc["git"]["commit"]
    assert "plot_error" not in doc, doc.get("plot_error")
    assert Path(doc["plot"]).is_file() and Path(doc["plot"]).parent == run.out_dir
    # The summary table is printed for the log, and quick runs never touch RESULTS.md.
    assert f"### {name} " in stdout
    return dict(doc["results"])


def test_lateness_quick(quick_runs: dict[str, QuickRun]) -> None:
    r = run_quick(quick_runs, "lateness")
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


def test_limits_quick(quick_runs: dict[str, QuickRun]) -> None:
    r = run_quick(quick_runs, "limits")
    fed = r["fed"]["sent"]
    assert fed > 100
    assert r["lateness_ms"]["count"] == fed and r["lateness_ms"]["early"] == 0
    # The limits held while the unlimited type ran beside them.
    assert r["slow"]["attempts"] > 0 and r["slow"]["max_overlap"] <= 2
    assert r["rated"]["attempts"] > 0 and r["rated"]["max_per_second"] <= 6


def test_throughput_quick(quick_runs: dict[str, QuickRun]) -> None:
    r = run_quick(quick_runs, "throughput")
    count = r["count"]
    assert [d["processes"] for d in r["ours"]] == [1, 2]
    for d in r["ours"]:
        assert d["all_finished"] and d["statuses"] == {"succeeded": count}
        assert d["throughput_finished"]["count"] == count and d["throughput_finished"]["per_s"] > 0
        assert d["load"]["enqueued"] == count
        # Read from the handler's journal: every start was observed, none before it was due.
        assert d["unobserved"] == 0 and d["burst_lateness_ms"]["early"] == 0
        starts = d["first_starts"]
        assert starts["first_ms"] >= 0 and starts["first_1000"]["count"] == min(1000, count)
        assert starts["first_64"]["p50"] <= starts["first_1000"]["p50"]
    assert r["targets"]["scaling"] > 0  # two executors' throughput over one's
    assert r["stock_saq"]["finished"] == count
    assert r["stock_saq"]["throughput_finished"]["per_s"] > 0
    assert r["stock_saq"]["first_starts"]["first_ms"] >= 0


def test_ingest_quick(quick_runs: dict[str, QuickRun]) -> None:
    r = run_quick(quick_runs, "ingest")
    count = r["count"]
    assert r["rows"] == r["jobs"] == r["committed"] == count
    assert r["rate_commit_per_s"] > 0 and r["rate_recorded_at_per_s"] > 0
    assert r["consumer_metrics"]["consumed"] == count
    assert r["memory"]["hwm_mb"] > 0


def test_e2e_quick(quick_runs: dict[str, QuickRun]) -> None:
    r = run_quick(quick_runs, "e2e")
    generated = r["generated"]
    assert generated > 100 and r["all_ran"]
    assert r["outcomes"] == {"succeeded": generated}
    assert r["lateness_ms"]["count"] == generated and r["lateness_ms"]["early"] == 0
    assert r["ingest_latency_ms"]["count"] == generated
    assert r["lag_series"] and r["lag"]["after_drain"] == 0
    assert all(r["memory"][role]["hwm_mb"] > 0 for role in ("producer", "consumer", "executor"))


def test_memory_quick(quick_runs: dict[str, QuickRun]) -> None:
    r = run_quick(quick_runs, "memory")
    backlog, generated = r["backlog"], r["generated"]
    assert r["loaded"]["enqueued"] == backlog
    assert r["statuses"] == {"scheduled": backlog, "succeeded": generated}
    assert r["sizes_after"]["redis_jobs_incomplete"] == backlog
    assert r["lateness_ms"]["early"] == 0
    assert all(r["memory"][role]["hwm_mb"] > 0 for role in ("consumer", "executor"))
    assert r["rss_series"]["executor"][0]


def run_json(runs: dict[str, QuickRun], name: str) -> dict[str, Any]:
    """The JSON line a script without the harness prints."""
    doc: dict[str, Any] = json.loads(runs[name].stdout().strip().splitlines()[-1])
    assert doc["benchmark"] == name and doc["quick"] is True
    return doc


def test_loop_quick(quick_runs: dict[str, QuickRun]) -> None:
    doc = run_json(quick_runs, "loop")
    assert set(doc["us_per_wakeup"]) == {"asyncio", "trio-asyncio stock", "trio-asyncio batched"}
    assert all(v > 0 for v in doc["us_per_wakeup"].values())


def test_pg_statements_quick(quick_runs: dict[str, QuickRun]) -> None:
    doc = run_json(quick_runs, "pg_statements")
    assert [r["batch"] for r in doc["rows"]] == [1, 5]
    assert all(r["events"] == 40 and r["backend_cpu_us_per_event"] >= 0 for r in doc["rows"])


def test_api_quick(quick_runs: dict[str, QuickRun]) -> None:
    r = run_quick(quick_runs, "api")
    assert r["acknowledged"] == r["in_topic"] > 0  # every 202 is an event in the topic
    closed, fixed = r["throughput"], r["fixed_rate"]
    assert closed["statuses"] == {"202": closed["acknowledged"]} and closed["events_per_s"] > 0
    assert fixed["statuses"] == {"202": fixed["requests"]}
    assert fixed["latency_ms"]["count"] == fixed["requests"]
