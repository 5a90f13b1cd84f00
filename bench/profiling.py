"""py-spy profiles of the roles during a measured window, and their summary.

The raw collapsed stacks go to ``bench/out/*.pyspy.txt`` (open them in speedscope.app); the
summary (self time by package and function, inclusive time, per thread) goes into the JSON.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from bench.run import BenchRun, log
from bench.stack import PYTHON
from eventsched.core.operations.devservers import die_with_parent_hook


class Profiler:
    """py-spy ``record`` of some processes for a window: raw (collapsed) stacks + a summary."""

    def __init__(self, run: BenchRun) -> None:
        self.run = run
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.binary = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")

    def start(self, name: str, pid: int, duration: float, rate: int = 100) -> None:
        if not Path(self.binary).exists():
            log("py-spy not installed (.venv/bin/pip install py-spy): not profiling")
            return
        out = self.run.out_path(f"-{name}.pyspy.txt")
        argv = [
            self.binary, "record", "--pid", str(pid), "--rate", str(rate),
            "--duration", str(max(1, int(duration))), "--format", "raw", "--threads",
            "--nonblocking", "--output", str(out),
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent_hook(),
        )
        self.procs[name] = (proc, out)
        log(f"py-spy recording {name} (pid {pid}) for {duration:.0f} s -> {out.name}")

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        summaries: dict[str, Any] = {}
        for name, (proc, out) in self.procs.items():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                if proc.poll() is None:
                    proc.kill()
            if out.exists():
                summaries[name] = {
                    "raw": str(out),
                    **summarize_stacks(out),
                    "main_thread": summarize_stacks(out, thread="MainThread"),
                }
        return summaries


# Where a leaf frame belongs, by file path fragment (first match wins).
_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("eventsched/core/jobqueue/", "eventsched queue adapter"),
    ("eventsched/core/store/", "eventsched store"),
    ("eventsched/core/domain/", "eventsched decode/encode"),
    ("eventsched/core/kafka/", "eventsched kafka adapter"),
    ("eventsched/plugins/executor/", "eventsched executor"),
    ("eventsched/plugins/consumer/", "eventsched consumer"),
    ("eventsched/plugins/handlers.py", "eventsched handlers"),
    ("eventsched/", "eventsched other"),
    ("trio_asyncio/", "trio-asyncio bridge"),
    ("trio/", "trio runtime"),
    ("asyncio/", "asyncio"),
    ("redis/", "redis-py"),
    ("psycopg_pool/", "psycopg"),
    ("psycopg/", "psycopg"),
    ("saq/", "saq"),
    ("structlog/", "structlog"),
    ("logging/", "logging"),
    ("prometheus_client/", "prometheus_client"),
    ("confluent_kafka/", "confluent-kafka"),
    ("msgspec/", "msgspec"),
    ("json/", "json"),
    ("uuid.py", "uuid"),
    ("datetime", "datetime"),
    ("selectors.py", "selectors"),
    ("socket.py", "socket"),
    ("ssl.py", "ssl"),
    ("tenacity/", "tenacity"),
    ("outcome/", "outcome"),
)


def _frame_parts(frame: str) -> tuple[str, str]:
    """``function (path:line)`` -> (function, short path)."""
    name, _, rest = frame.partition(" (")
    path = rest.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return name, path


def _category(path: str) -> str:
    for fragment, category in _CATEGORIES:
        if fragment in path:
            return category
    return "other" if path else "native/unknown"


def summarize_stacks(path: Path, top: int = 25, thread: str | None = None) -> dict[str, Any]:
    """Self time by function and by package, inclusive time by function, per thread.

    ``thread``: only samples of threads whose name contains it (e.g. "MainThread", where
    the event loop runs; blocking clients' threads mostly wait on sockets, which py-spy
    cannot always tell from work without ``--native``).
    """
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    category: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread (", "process ")):
            # --threads puts "thread (0x...)" (and maybe "process ...") at the root.
            roots = [f for f in frames if f.startswith(("thread (", "process "))]
            if thread is not None and thread not in roots[-1]:
                continue
            threads[roots[-1]] += count
            frames = [f for f in frames if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += count
        name, fpath = _frame_parts(frames[-1])
        self_time[f"{name} ({fpath})"] += count
        category[_category(fpath)] += count
        seen: set[str] = set()
        for frame in frames:
            fname, fp = _frame_parts(frame)
            key = f"{fname} ({fp})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += count

    def share(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / max(1, total), 1)) for k, v in counter.most_common(n)]

    return {
        "samples": total,
        "by_package_pct": share(category, 30),
        "self_pct": share(self_time, top),
        "inclusive_pct": share(inclusive, top),
        "threads": dict(threads.most_common(10)),
    }
