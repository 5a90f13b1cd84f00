"""CPU and memory of the processes under test, sampled on a thread of the harness.

Memory from ``/proc/<pid>/status`` (``VmHWM`` and sampled ``VmRSS``), CPU (user + system)
from each role's and each server's whole process tree, and the whole machine's busy time,
so that a window's "foreign" CPU (everything not ours) can be reported.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import psutil


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in kB from /proc/<pid>/status (empty once the process is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def _tree_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of ``pid`` and its live descendants; None if gone."""
    try:
        main = psutil.Process(pid)
        procs = [main, *main.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


_MACHINE = "__machine__"


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, not idle or iowait)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


class Sampler:
    """Samples VmRSS/VmHWM of processes and CPU of process trees on a thread.

    ``mark(name)`` records every tracked CPU counter, so a window's CPU is the difference of
    two marks (e.g. from the first to the last completion).
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.t0 = time.time()
        self.rss: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self.hwm: dict[str, int] = {}
        self._mem: dict[str, int] = {}
        self._cpu: dict[str, int] = {}
        self.marks: dict[str, tuple[float, dict[str, float]]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def track_memory(self, name: str, pid: int) -> None:
        with self._lock:
            self._mem[name] = pid

    def track_cpu(self, name: str, pid: int) -> None:
        with self._lock:
            self._cpu[name] = pid

    def track_servers(self, pids: Mapping[str, int]) -> None:
        """Track the CPU of each server's process tree (:meth:`bench.stack.Stack.server_pids`)."""
        for name, pid in pids.items():
            self.track_cpu(name, pid)

    def track(self, name: str, pid: int) -> None:
        """Track memory and CPU of ``name`` (a new pid under a used name starts afresh)."""
        with self._lock:
            if self._mem.get(name) not in (None, pid):
                self.rss.pop(name, None)
                self.hwm.pop(name, None)
        self.track_memory(name, pid)
        self.track_cpu(name, pid)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()

    def _sample(self) -> None:
        now = time.time()
        with self._lock:
            mem = dict(self._mem)
        for name, pid in mem.items():
            status = _proc_status(pid)
            if "VmRSS" in status:
                self.rss[name].append((now, status["VmRSS"]))
            if "VmHWM" in status:
                self.hwm[name] = max(self.hwm.get(name, 0), status["VmHWM"])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def mark(self, label: str) -> None:
        """Record CPU seconds of every tracked tree now (and a memory sample)."""
        with self._lock:
            cpu = dict(self._cpu)
        values = {name: _tree_cpu(pid) for name, pid in cpu.items()}
        values[_MACHINE] = machine_busy()
        self.marks[label] = (time.time(), {k: v for k, v in values.items() if v is not None})
        self._sample()

    def cpu_between(
        self, start: str, end: str, exited: Mapping[str, float] | None = None
    ) -> dict[str, Any]:
        """CPU seconds and share of one core per tracked tree between two marks.

        Trees gone at either mark are left out; processes that exited inside the window
        report their own CPU seconds in ``exited`` (else it would count as foreign).
        """
        t0, a = self.marks[start]
        t1, b = self.marks[end]
        wall = max(1e-9, t1 - t0)
        per = {name: round(b[name] - a[name], 3) for name in b if name in a and b[name] >= a[name]}
        for name, seconds in (exited or {}).items():
            per[name] = round(seconds, 3)
        machine = per.pop(_MACHINE, 0.0)
        ours = sum(per.values())
        return {
            "wall_s": round(wall, 3),
            "cpu_s": per,
            "cores": {name: round(v / wall, 3) for name, v in per.items()},
            "total_cores": round(ours / wall, 3),
            # Everything else that ran on the machine meanwhile (other users, the harness,
            # helpers that exited): the noise this window had to live with.
            "machine_busy_cores": round(machine / wall, 3),
            "foreign_cores": round(max(0.0, machine - ours) / wall, 3),
        }

    def memory(self) -> dict[str, dict[str, float]]:
        """Per process: peak VmHWM and sampled VmRSS (MB)."""
        out: dict[str, dict[str, float]] = {}
        for name, series in self.rss.items():
            values = [kb for _, kb in series]
            out[name] = {
                "hwm_mb": round(self.hwm.get(name, 0) / 1024, 1),
                "rss_max_mb": round(max(values) / 1024, 1),
                "rss_last_mb": round(values[-1] / 1024, 1),
                "samples": len(values),
            }
        return out

    def rss_series(self, name: str) -> tuple[list[float], list[float]]:
        series = self.rss.get(name, [])
        return [t - self.t0 for t, _ in series], [kb / 1024 for _, kb in series]
