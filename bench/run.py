"""One invocation of a benchmark script: its flags, the quiet-machine wait, the outputs.

:class:`BenchRun` records the machine, the commit and the load average, and at the end writes
the JSON, the plot and (full runs) the Markdown table in RESULTS.md; :func:`quietest` runs a
measured phase again when other processes were busy during it. Runs on the harness's main
thread.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.report import markdown_section
from bench.sampling import machine_busy
from tests.support.proc import REPO

BENCH_DIR = REPO / "bench"
DEFAULT_OUT = BENCH_DIR / "out"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def log(message: str) -> None:
    """Progress on stderr, with a timestamp (stdout stays free for the summary)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(
    description: str, add: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The common flags plus the script's own (``add``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for CI: checks the benchmark works, not its numbers; "
        "writes JSON and PNG under --out-dir only, never RESULTS.md",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="JSON/PNG output dir")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the roles with py-spy during the measured window (raw stacks + summary)",
    )
    parser.add_argument(
        "--no-record", action="store_true", help="do not append to bench/RESULTS.md"
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="start even if the machine is busy (the load average is still recorded)",
    )
    parser.add_argument(
        "--load-threshold",
        type=float,
        default=0.7,
        help="full runs wait (up to --max-wait s) for a 1-minute load average below this",
    )
    parser.add_argument("--max-wait", type=float, default=600.0)
    parser.add_argument(
        "--fast-stack",
        action="store_true",
        help="PostgreSQL without fsync/synchronous_commit (default: as `eventsched dev`)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="executors' log level (info: the `log` handler writes a line per event; "
        "warning: it costs nothing); the other roles always log at info",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        default=1,
        help="run a measured phase again (after waiting for a quiet machine) when other "
        "processes used more than 0.25 cores during it; the quietest attempt is kept",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION:KEY=VALUE",
        help="extra setting for every role, e.g. executor:concurrency=50 or "
        "kafka.client:queued.max.messages.kbytes=8192 (repeatable; wins over the script's)",
    )
    if add is not None:
        add(parser)
    return parser.parse_args()


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "eventsched", "sql"))
    untracked = bool(git("ls-files", "--others", "--exclude-standard", "--", "eventsched", "sql"))
    return {
        "commit": commit,
        "dirty": dirty or untracked,
        "label": commit + ("+dirty" if dirty or untracked else ""),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def busy_cores(seconds: float = 5.0) -> float:
    """Cores the whole machine keeps busy, measured over ``seconds``."""
    before = machine_busy()
    time.sleep(seconds)
    return (machine_busy() - before) / seconds


def wait_for_quiet(threshold: float, max_wait: float) -> dict[str, Any]:
    """Wait (at most ``max_wait`` s) until the 1-minute load average is below ``threshold``
    and the machine's CPU, measured over 5 s, is below ``threshold / 2`` cores (the load
    average lags a minute behind a test run that just started or ended). Re-checks every
    30 s. Never fails: a busy machine is recorded in the results."""
    began = time.monotonic()
    first = loadavg()
    while True:
        cores = busy_cores()
        quiet = os.getloadavg()[0] < threshold and cores < threshold / 2
        if quiet or time.monotonic() - began >= max_wait:
            break
        log(f"load average {loadavg()}, {cores:.2f} cores busy: waiting for a quiet window")
        time.sleep(min(25.0, max(1.0, max_wait - (time.monotonic() - began))))
    return {
        "threshold": threshold,
        "first_seen": first,
        "at_start": loadavg(),
        "busy_cores_at_start": round(cores, 2),
        "waited_s": round(time.monotonic() - began, 1),
        "quiet": quiet,
    }


@dataclass
class BenchRun:
    """One invocation of a benchmark script: arguments, machine, timing, outputs."""

    name: str
    args: argparse.Namespace
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    load: dict[str, Any] = field(default_factory=dict)
    workdir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.args.out_dir.mkdir(parents=True, exist_ok=True)
        self.stamp = self.started.strftime("%Y%m%d-%H%M%S")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"esbench-{self.name}-"))
        if self.args.quick or self.args.no_wait:
            self.load = {"at_start": loadavg(), "waited_s": 0.0, "quiet": None}
        else:
            self.load = wait_for_quiet(self.args.load_threshold, self.args.max_wait)
        self.command = " ".join(
            ["python -m", f"bench.{self.name}", *(shlex.quote(a) for a in sys.argv[1:])]
        )
        log(f"{self.name}: work dir {self.workdir}, load {self.load.get('at_start')}")

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    def out_path(self, suffix: str) -> Path:
        return Path(self.args.out_dir) / f"{self.name}-{self.stamp}{suffix}"

    def plot_path(self) -> Path:
        """Full runs replace the committed ``bench/<name>.png``; quick runs stay in out-dir."""
        if self.quick or self.args.no_record:
            return self.out_path(".png")
        return BENCH_DIR / f"{self.name}.png"

    def finish(
        self,
        results: dict[str, Any],
        table: Sequence[Sequence[str]],
        notes: Sequence[str] = (),
        plot: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write the JSON (and the plot); append the table to RESULTS.md for full runs."""
        load_end = loadavg()
        doc = {
            "benchmark": self.name,
            "date": self.started.isoformat(timespec="seconds"),
            "command": self.command,
            "quick": self.quick,
            "machine": machine_info(),
            "git": git_info(),
            "load": {**self.load, "at_end": load_end},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()},
            "results": results,
        }
        if self.args.overrides:
            notes = [
                *notes,
                "settings overrides: " + ", ".join(f"`{o}`" for o in self.args.overrides),
            ]
        path = self.out_path(".json")
        if plot is not None:
            png = self.plot_path()
            try:
                plot(png)
                doc["plot"] = str(png)
            except Exception as err:  # a plotting problem must not lose the numbers
                doc["plot_error"] = repr(err)
                log(f"plot failed: {err!r}")
        path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        log(f"results: {path}")
        print(markdown_section(doc, table, notes))
        if not self.quick and not self.args.no_record:
            with RESULTS_MD.open("a") as f:
                f.write("\n" + markdown_section(doc, table, notes))
            log(f"appended to {RESULTS_MD}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        return path


#: Foreign CPU (cores) above which a window is flagged as noisy.
NOISY_CORES = 0.25


def noise(cpu: Mapping[str, Any]) -> str:
    """One phrase on how busy the machine was besides us during a CPU window."""
    foreign = float(cpu.get("foreign_cores", 0.0))
    text = (
        f"machine busy {cpu.get('machine_busy_cores', 0.0):.2f} cores, "
        f"{foreign:.2f} of them not ours"
    )
    return text + (" (**noisy window**)" if foreign > NOISY_CORES else "")


def quietest(
    run: BenchRun,
    label: str,
    phase: Callable[[int], dict[str, Any]],
    window: Callable[[dict[str, Any]], Mapping[str, Any]],
) -> dict[str, Any]:
    """Run ``phase(attempt)``; while its CPU window (``window(result)``) was noisy and
    ``--noisy-retries`` allows, wait for a quiet machine and run it again. Returns the
    attempt with the least foreign CPU, with ``attempts`` (the foreign CPU of each)."""
    results: list[dict[str, Any]] = []
    retries = 0 if run.quick else max(0, run.args.noisy_retries)
    for attempt in range(retries + 1):
        result = phase(attempt)
        results.append(result)
        foreign = float(window(result).get("foreign_cores", 0.0))
        if foreign <= NOISY_CORES or attempt == retries:
            break
        log(f"{label}: {foreign:.2f} foreign cores during the run: waiting, then again")
        wait_for_quiet(run.args.load_threshold, min(300.0, run.args.max_wait))
    best = min(results, key=lambda r: float(window(r).get("foreign_cores", 0.0)))
    best["attempts_foreign_cores"] = [
        round(float(window(r).get("foreign_cores", 0.0)), 3) for r in results
    ]
    return best


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    began = time.monotonic()
    log(f"{what} ...")
    yield
    log(f"{what}: {time.monotonic() - began:.1f} s")
