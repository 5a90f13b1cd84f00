"""The benchmark harness: stack, role processes, sampling, profiling, statistics, reports.

Every benchmark script (``python -m bench.<name>``) follows the same shape::

    args = parse_args(...)                    # --quick, --out-dir, --profile, ...
    run = BenchRun("lateness", args)           # waits for a quiet machine (full runs)
    with Stack(run) as stack:                  # embedded PostgreSQL/Redis/Tansu, migrated
        role = stack.role("executor", settings)  # `python -m eventsched run --role ...`
        ...                                    # feeders, samplers, py-spy
    run.finish(results, table, plot)           # JSON, RESULTS.md, PNG

Design choices worth knowing:

* **One fresh stack per run.** :class:`Stack` starts :class:`~eventsched.core.operations.devstack.DevStack`
  (the code behind ``eventsched dev --infra-only``) in a temporary data dir and removes it
  afterwards: no state leaks between runs, and the servers' CPU is measured per run. The
  first start pays for ``initdb`` (~2 s). ``--fast-stack`` turns off PostgreSQL fsync.
* **Roles are real processes**, started exactly as an operator would
  (``python -m eventsched --settings bench.toml run --role X --port 0``) with the stack's
  connection variables. Their JSON logs go to a file, not a pipe: the ``log`` handler writes
  a line per event, and parsing thousands of lines a second in the harness would steal CPU
  from the system under test on a 2-core machine. The harness only tails the file for the
  few lines it waits for.
* **Children never outlive the harness**: each gets ``PR_SET_PDEATHSIG`` (the harness
  spawns them from its main thread) and every script stops them in ``finally``.
* **Numbers come from the system's own records**: lateness from ``event_attempts``
  (``lateness_ms`` and ``started_at >= scheduled_for``), throughput from ``finished_at``,
  memory from ``/proc/<pid>/status`` (``VmHWM`` and sampled ``VmRSS``), CPU from
  ``/proc/<pid>/stat`` of each role and each server's whole process tree.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil
import psycopg

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"
DEFAULT_OUT = BENCH_DIR / "out"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
PYTHON = sys.executable

#: Kafka client settings for quick group joins on Tansu (its defaults take 20+ s).
FAST_GROUP_CONFIG: Mapping[str, int] = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    "max.poll.interval.ms": 10000,
}
#: Handler of every benchmark event: logs one line and succeeds.
LOG_HANDLER = "eventsched.plugins.handlers:log"
#: Event type of the events the feeders create.
EVENT_TYPE = "bench.event"
#: Stock SAQ's slots, as in the peers' table (one worker process, concurrency 10).
PEER_CONCURRENCY = 10
#: Our executor's slots in the benchmarks: what config/settings.toml recommends for load
#: (each job waits a few ms for its PostgreSQL claim: rate x latency, 256 at 1,000/s).
RECOMMENDED_CONCURRENCY = 256

_PR_SET_PDEATHSIG = 1


def log(message: str) -> None:
    """Progress on stderr, with a timestamp (stdout stays free for the summary)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- arguments


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


# --------------------------------------------------------------------------- machine


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
    before = _machine_busy()
    time.sleep(seconds)
    return (_machine_busy() - before) / seconds


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


# --------------------------------------------------------------------------- the run


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


def markdown_section(
    doc: Mapping[str, Any], table: Sequence[Sequence[str]], notes: Sequence[str]
) -> str:
    m, g, load = doc["machine"], doc["git"], doc["load"]
    lines = [
        f"### {doc['benchmark']} — {doc['date']}",
        "",
        f"- command: `{doc['command']}`",
        f"- commit: `{g['label']}` · machine: {m['nproc']} CPUs ({m['cpu_model']}), "
        f"{m['memory_gb']} GB, Python {m['python']}",
        f"- load average (1/5/15 min) at start {load.get('at_start')}, at end {load.get('at_end')}"
        + (" — **machine was busy**" if load.get("quiet") is False else ""),
    ]
    lines += [f"- {note}" for note in notes]
    if table:
        lines += ["", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    if doc.get("plot"):
        lines += [
            "",
            f"Plot: `{Path(doc['plot']).relative_to(REPO) if str(doc['plot']).startswith(str(REPO)) else doc['plot']}`",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- child processes


def _die_with_parent() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The harness's environment without any EVENTSCHED_* (a test run's service addresses
    must not leak into the roles), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSCHED_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


class Child:
    """A child process with stdout/stderr in a file; killed with the harness."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], logdir: Path
    ) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        n = 1
        while self.log_path.exists():  # a role started again (throughput's 2nd phase)
            n += 1
            self.log_path = logdir / f"{name}.{n}.log"
        self._log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            list(argv),
            cwd=REPO,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(),
        )
        self._offset = 0
        self._partial = b""
        self.lines: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_lines(self) -> list[dict[str, Any]]:
        """Parse the JSON lines written since the last call (others are skipped)."""
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        new: list[dict[str, Any]] = []
        for raw in complete:
            if raw.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    new.append(json.loads(raw))
        self.lines += new
        return new

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if predicate(line):
                return line
        while True:
            for line in self.read_lines():
                if predicate(line):
                    return line
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: line not seen in {timeout} s:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in {timeout} s: killing it")
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()
        return self.proc.returncode

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(5)
            raise TimeoutError(
                f"{self.name} still running after {timeout} s:\n{self.tail()}"
            ) from None
        self._log_file.close()
        if code != 0:
            raise RuntimeError(f"{self.name} failed with exit code {code}:\n{self.tail()}")
        return code


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Role(Child):
    """``python -m eventsched --settings FILE run --role ROLE --port N``.

    The harness picks the HTTP port (not ``--port 0``, whose answer is only in the log) so
    that readiness can be read from ``/readyz`` whatever the role's log level.
    """

    def __init__(
        self, role: str, settings_file: Path, env: Mapping[str, str], logdir: Path, index: int = 0
    ) -> None:
        name = role if index == 0 else f"{role}-{index + 1}"
        self.port: int | None = _free_port()
        argv = [PYTHON, "-m", "eventsched", "--settings", str(settings_file)]
        super().__init__(
            name, [*argv, "run", "--role", role, "--port", str(self.port)], env, logdir
        )
        self.role = role

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the role logs ``role_ready`` or ``/readyz`` answers 200 (at a log level above
        info only the latter comes)."""
        deadline = time.monotonic() + timeout
        while True:
            if any(line.get("event") == "role_ready" for line in self.read_lines()):
                return
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:  # not listening yet, or 503 (HTTPError is an OSError)
                pass
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: not ready in {timeout} s:\n{self.tail()}")
            time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        """``name{label="v",...}`` -> value from the role's /metrics (empty if unreachable)."""
        if self.port is None:
            return {}
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out


def metric_sum(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of a metric over its label sets (those having ``labels``, if given)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v
        for k, v in samples.items()
        if (k == name or k.startswith(name + "{")) and all(w in k for w in wanted)
    )


def executions_done(executors: Sequence[Role]) -> int:
    """Attempts whose outcome (succeeded or dead) is committed, from the executors' /metrics.

    Polling this instead of ``SELECT status, count(*) FROM events`` keeps the harness from
    scanning the whole table twice a second (a million-row scan with the memory backlog).
    """
    total = 0.0
    for ex in executors:
        samples = ex.metrics()
        total += metric_sum(samples, "eventsched_executions_total", outcome="succeeded")
        total += metric_sum(samples, "eventsched_executions_total", outcome="dead")
    return int(total)


class Helper(Child):
    """A bench helper module (``python -m bench.X ...``) that writes a JSON result file."""

    def __init__(self, name: str, module: str, args: Sequence[str], logdir: Path) -> None:
        self.result_path = logdir / f"{name}.json"
        argv = [PYTHON, "-m", module, *args, "--result", str(self.result_path)]
        super().__init__(name, argv, clean_env({}), logdir)

    def result(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.result_path.read_text())
        return data


def write_toml(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """A settings file layered over config/settings.toml; ``sections`` are dotted names under
    ``[default]`` (e.g. ``"kafka.client"``). Values: str, int, float, bool."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[default.{section}]")
        lines += [f"{json.dumps(k)} = {value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _overrides(items: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``SECTION:KEY=VALUE`` strings as (section, {key: typed value})."""
    out: list[tuple[str, dict[str, Any]]] = []
    for item in items:
        section, sep, rest = item.partition(":")
        key, eq, raw = rest.partition("=")
        if not (sep and eq and section and key):
            raise SystemExit(f"--set {item!r}: expected SECTION:KEY=VALUE")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        out.append((section, {key: value}))
    return out


# --------------------------------------------------------------------------- the stack


class Stack:
    """A fresh embedded stack (PostgreSQL, Redis, Tansu) with the schema and topics."""

    def __init__(self, run: BenchRun, *, kafka: bool = True) -> None:
        self.run = run
        self.dir = run.workdir / "stack"
        self.logdir = run.workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.kafka_enabled = kafka
        self.children: list[Child] = []
        self._stack: Any = None

    def __enter__(self) -> Self:
        from eventsched.core.operations.devstack import DevStack
        from eventsched.core.store import migrations

        # Started on the main thread: the servers get SIGKILL when the thread that forked
        # them ends (PR_SET_PDEATHSIG), see eventsched/core/operations/devstack.py.
        self._stack = DevStack(self.dir, fast=self.run.args.fast_stack)
        try:
            info = self._stack.start()
            assert info.postgres_dsn and info.redis_url and info.kafka_bootstrap
            self.dsn: str = info.postgres_dsn
            self.redis_url: str = info.redis_url
            self.kafka: str = info.kafka_bootstrap
            self.env = info.as_env()
            migrations.up(self.dsn, migrations.default_sql_dir())
            if self.kafka_enabled:
                from eventsched.core.kafka import ensure_topics

                ensure_topics(self.kafka, {"events": 3, "events-dlq": 3})
        except BaseException:
            self._stack.stop()
            raise
        log(f"stack up in {self._stack.timings.get('total', 0):.1f} s: {self.env}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop(15)
        if exc is not None:
            for child in self.children:
                log(f"--- last lines of {child.name}:\n{child.tail(15)}")
        self._stack.stop()

    # -- servers

    def server_pids(self) -> dict[str, int]:
        """Main pid of each server (their trees are sampled for CPU)."""
        out: dict[str, int] = {}
        for server in self._stack.servers:
            if server.pid is not None:
                out[server.name] = server.pid
        return out

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[Any]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url)

    def server_stats(self) -> dict[str, float]:
        """Cumulative PostgreSQL and Redis work counters (diff two with :func:`stats_delta`)."""
        out: dict[str, float] = {}
        row = self.sql(
            "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted,"
            " tup_updated, tup_deleted, blks_hit, blks_read"
            " FROM pg_stat_database WHERE datname = current_database()"
        )[0]
        names = ("commits", "rollbacks", "tup_returned", "tup_fetched", "tup_inserted",
                 "tup_updated", "tup_deleted", "blks_hit", "blks_read")  # fmt: skip
        out.update({f"pg.{n}": float(v or 0) for n, v in zip(names, row, strict=True)})
        hot = self.sql("SELECT coalesce(sum(n_tup_hot_upd), 0) FROM pg_stat_user_tables")[0][0]
        out["pg.tup_hot_updated"] = float(hot)
        # Who reads the tuples: sequential scans per table, index reads per index.
        for table, seq_scan, seq_read in self.sql(
            "SELECT relname, seq_scan, seq_tup_read FROM pg_stat_user_tables"
        ):
            out[f"scan.seq_scans.{table}"] = float(seq_scan or 0)
            out[f"scan.seq_tup_read.{table}"] = float(seq_read or 0)
        for index, idx_scan, idx_read in self.sql(
            "SELECT indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes"
        ):
            out[f"scan.idx_scans.{index}"] = float(idx_scan or 0)
            out[f"scan.idx_tup_read.{index}"] = float(idx_read or 0)
        with contextlib.suppress(psycopg.Error):
            wal = self.sql("SELECT wal_records, wal_bytes, wal_fpi FROM pg_stat_wal")[0]
            out.update({"pg.wal_records": float(wal[0]), "pg.wal_bytes": float(wal[1]),
                        "pg.wal_fpi": float(wal[2])})  # fmt: skip
        with self.redis() as r:
            for command, stats in r.info("commandstats").items():
                name = command.removeprefix("cmdstat_")
                out[f"redis.{name}.calls"] = float(stats["calls"])
                out[f"redis.{name}.usec"] = float(stats["usec"])
        return out

    # -- processes

    def settings(self, name: str, **sections: Mapping[str, Any]) -> Path:
        """Write a role settings file: the bench defaults, overridden by ``sections``.

        ``--log-level`` applies to executors only (it decides what the ``log`` handler
        costs); the other roles log at info, which the harness reads some lines of.
        """
        level = self.run.args.log_level if name.startswith("executor") else "info"
        base: dict[str, dict[str, Any]] = {
            "kafka": {"partitions": 3},
            "handlers": {"default": LOG_HANDLER},
            "executor": {"concurrency": RECOMMENDED_CONCURRENCY},
            "logging": {"format": "json", "level": level},
            "shutdown": {"grace": "10s"},
        }
        for section, values in [*sections.items(), *_overrides(self.run.args.overrides)]:
            base[section.replace("__", ".")] = {
                **base.get(section.replace("__", "."), {}),
                **values,
            }
        return write_toml(self.run.workdir / f"{name}.toml", base)

    def role(self, role: str, settings_file: Path, index: int = 0) -> Role:
        child = Role(role, settings_file, clean_env(self.env), self.logdir, index)
        self.children.append(child)
        return child

    def helper(self, name: str, module: str, args: Sequence[str]) -> Helper:
        child = Helper(name, module, args, self.logdir)
        self.children.append(child)
        return child


# --------------------------------------------------------------------------- sampling


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


def _machine_busy() -> float:
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
        values[_MACHINE] = _machine_busy()
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


# --------------------------------------------------------------------------- profiling


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
            preexec_fn=_die_with_parent(),
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


# --------------------------------------------------------------------------- statistics


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """count, min, mean, p50, p90, p99, p99.9, max (nearest-rank), rounded to 0.01."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))]

    return {
        "count": n,
        "min": round(ordered[0], 2),
        "mean": round(sum(ordered) / n, 2),
        "p50": round(rank(50), 2),
        "p90": round(rank(90), 2),
        "p99": round(rank(99), 2),
        "p99.9": round(rank(99.9), 2),
        "max": round(ordered[-1], 2),
    }


def rate_series(
    times: Iterable[float], t0: float, bucket: float = 1.0
) -> tuple[list[float], list[float]]:
    """Events per second in ``bucket``-second bins from ``t0`` (x = bin start)."""
    bins: Counter[int] = Counter(int((t - t0) // bucket) for t in times)
    if not bins:
        return [], []
    xs = list(range(min(bins), max(bins) + 1))
    return [x * bucket for x in xs], [bins.get(x, 0) / bucket for x in xs]


def throughput(finished: Sequence[float]) -> dict[str, float]:
    """First-to-last completion rate."""
    if len(finished) < 2:
        return {"count": len(finished), "per_s": 0.0, "span_s": 0.0}
    first, last = min(finished), max(finished)
    span = max(1e-9, last - first)
    return {
        "count": len(finished),
        "span_s": round(span, 3),
        "per_s": round((len(finished) - 1) / span, 1),
    }


@dataclass(frozen=True)
class Attempts:
    """The ``event_attempts`` rows of a run, as columns (epoch seconds)."""

    scheduled: list[float]
    started: list[float]
    finished: list[float]
    lateness_ms: list[float]
    outcomes: Counter[str]
    early_by_timestamps: int  # started_at < scheduled_for
    pg_updated: list[float]  # events.updated_at of succeeded events (outcome commit time)
    service_ms: list[float]  # finished_at - started_at: claim round trip + handler


def read_attempts(stack: Stack, where: str = "TRUE") -> Attempts:
    rows = stack.sql(
        "SELECT extract(epoch FROM a.scheduled_for)::float8, extract(epoch FROM a.started_at)::float8,"
        " extract(epoch FROM a.finished_at)::float8, a.lateness_ms, coalesce(a.outcome, 'none'),"
        " a.started_at < a.scheduled_for, extract(epoch FROM e.updated_at)::float8"
        f" FROM event_attempts a JOIN events e ON e.id = a.event_id WHERE {where}"
    )
    return Attempts(
        scheduled=[r[0] for r in rows],
        started=[r[1] for r in rows],
        finished=[r[2] for r in rows if r[2] is not None],
        lateness_ms=[r[3] for r in rows],
        outcomes=Counter(r[4] for r in rows),
        early_by_timestamps=sum(1 for r in rows if r[5]),
        pg_updated=[r[6] for r in rows if r[4] == "succeeded"],
        service_ms=[(r[2] - r[1]) * 1000 for r in rows if r[2] is not None],
    )


def stats_delta(
    before: Mapping[str, float], after: Mapping[str, float], per: int
) -> dict[str, Any]:
    """Server work between two :meth:`Stack.server_stats` snapshots, per event (``per``).

    PostgreSQL's counters are flushed by its backends about once a second: take the
    snapshots a second or more after the work they bracket.
    """
    n = max(1, per)
    pg = {
        k.removeprefix("pg."): round((after.get(k, 0.0) - before.get(k, 0.0)) / n, 3)
        for k in after
        if k.startswith("pg.")
    }
    redis_usec: dict[str, float] = {}
    redis_calls: dict[str, float] = {}
    for key in after:
        if key.startswith("redis.") and key.endswith(".usec"):
            name = key[len("redis.") : -len(".usec")]
            usec = after[key] - before.get(key, 0.0)
            if usec > 0:
                redis_usec[name] = round(usec / n, 2)
                calls = after.get(f"redis.{name}.calls", 0.0)
                redis_calls[name] = round((calls - before.get(f"redis.{name}.calls", 0.0)) / n, 3)
    top = sorted(redis_usec, key=lambda k: -redis_usec[k])[:8]
    scans = {
        k.removeprefix("scan."): round((after.get(k, 0.0) - before.get(k, 0.0)) / n, 3)
        for k in after
        if k.startswith("scan.") and after.get(k, 0.0) != before.get(k, 0.0)
    }
    return {
        "events": per,
        "postgres_per_event": pg,
        # seq_tup_read.<table> / idx_tup_read.<index> per event: where tup_returned comes from.
        "postgres_scans_per_event": dict(sorted(scans.items(), key=lambda kv: -kv[1])[:12]),
        "redis_usec_per_event": {k: redis_usec[k] for k in top},
        # EVALSHA's time includes the commands its script runs (listed on their own too).
        "redis_calls_per_event": {k: redis_calls[k] for k in top},
    }


def status_counts(stack: Stack) -> dict[str, int]:
    return {s: int(n) for s, n in stack.sql("SELECT status, count(*) FROM events GROUP BY status")}


def wait_for_count(
    count: Callable[[], int], target: int, *, stall: float, cap: float, what: str = ""
) -> bool:
    """Poll ``count()`` every 0.5 s until it reaches ``target``; give up when it has not
    moved for ``stall`` s or after ``cap`` s in all (an overloaded run still finishes)."""
    began = last_move = time.monotonic()
    last = -1
    while True:
        now_count = count()
        if now_count >= target:
            return True
        now = time.monotonic()
        if now_count != last:
            last, last_move = now_count, now
        if now - last_move > stall or now - began > cap:
            log(f"gave up waiting ({what}): {now_count:,} of {target:,} after {now - began:.0f} s")
            return False
        time.sleep(0.5)


def lateness_timeline(
    scheduled: Sequence[float], lateness_ms: Sequence[float], t0: float, bucket: float = 1.0
) -> list[dict[str, float]]:
    """Lateness percentiles per ``bucket`` seconds of due time (shows warm-up and stalls)."""
    bins: dict[int, list[float]] = defaultdict(list)
    for due, late in zip(scheduled, lateness_ms, strict=True):
        bins[int((due - t0) // bucket)].append(late)
    out: list[dict[str, float]] = []
    for key in sorted(bins):
        p = percentiles(bins[key])
        out.append(
            {"t": key * bucket, "n": p["count"], "p50": p["p50"], "p99": p["p99"], "max": p["max"]}
        )
    return out


def lateness_summary(lateness_ms: Sequence[float], early: int | None = None) -> dict[str, Any]:
    summary: dict[str, Any] = percentiles(lateness_ms)
    summary["early"] = sum(1 for x in lateness_ms if x < 0) if early is None else early
    return summary


def fmt_ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def ratio(ours: float, theirs: float, higher_is_better: bool = True) -> str:
    """``x.yx`` in favour of eventsched (>1 = better), or - if undefined."""
    if ours <= 0 or theirs <= 0:
        return "-"
    r = ours / theirs if higher_is_better else theirs / ours
    return f"{r:,.1f}x" if r < 100 else f"{r:,.0f}x"


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


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


# --------------------------------------------------------------------------- plotting


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(
    ax: Any, series: Mapping[str, Sequence[float]], title: str, target: float | None = None
) -> None:
    """Lateness CDFs on a log x-axis (values below 0.01 ms are drawn at 0.01)."""
    for label, values in series.items():
        if not values:
            continue
        xs = sorted(max(0.01, v) for v in values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=f"{label} (n={len(xs):,})")
    if target is not None:
        ax.axvline(
            target, color="grey", linestyle="--", linewidth=1, label=f"target p99 ≤ {target:g} ms"
        )
    ax.set_xscale("log")
    ax.set_xlabel("start lateness (ms, log)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    began = time.monotonic()
    log(f"{what} ...")
    yield
    log(f"{what}: {time.monotonic() - began:.1f} s")
