"""`eventsched dev`: the Docker-free stack as a newcomer runs it."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil
import psycopg
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.support.cli import offline
from tests.support.proc import AppProcess


def _children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _wait_gone(procs: list[psutil.Process], timeout: float = 15.0) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}


def test_infra_only_starts_servers_writes_env_and_cleans_up(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    app = AppProcess(["dev", "--infra-only", "--data-dir", str(data_dir)])
    try:
        app.wait_event("dev_stack_ready", timeout=60)
        env = _read_env(data_dir / "env")
        assert set(env) == {
            "EVENTSCHED_POSTGRES__DSN",
            "EVENTSCHED_REDIS__URL",
            "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS",
            # Roles started by hand against the dev broker recover from a wedged group.
            "EVENTSCHED_CONSUMER__REJOIN_AFTER",
        }
        assert env["EVENTSCHED_CONSUMER__REJOIN_AFTER"] == "30s"
        with psycopg.connect(env["EVENTSCHED_POSTGRES__DSN"]) as conn:
            # Ready for roles started by hand: the schema is migrated ...
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
        # ... and the topics exist with the configured partitions (no role creates them).
        admin = AdminClient({"bootstrap.servers": env["EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS"]})
        topics = admin.list_topics(timeout=10).topics
        assert {name: len(topics[name].partitions) for name in ("events", "events-dlq")} == {
            "events": 3,
            "events-dlq": 3,
        }
        client = redis.Redis.from_url(env["EVENTSCHED_REDIS__URL"])
        assert client.ping()
        client.close()
        ready = next(line for line in app.lines if line.get("event") == "dev_stack_ready")
        assert ready["log_dir"] == str(data_dir / "logs")
        assert ready["broker"].startswith("in memory only")
        children = _children(app.proc.pid)
        assert len(children) >= 3
        app.proc.send_signal(signal.SIGTERM)
        assert app.wait(30) == 0
    finally:
        app.kill()
    assert _wait_gone(children) == []
    assert not (data_dir / "env").exists()


def test_kill_9_of_dev_takes_its_servers_along(tmp_path: Path) -> None:
    app = AppProcess(["dev", "--infra-only", "--data-dir", str(tmp_path / "dev")])
    try:
        app.wait_event("dev_stack_ready", timeout=60)
        children = _children(app.proc.pid)
        assert len(children) >= 3
    finally:
        app.kill()
    assert _wait_gone(children) == []


def test_dev_runs_the_pipeline_end_to_end(tmp_path: Path) -> None:
    """Within seconds, produced events are consumed, scheduled and run (the first minute)."""
    data_dir = tmp_path / "dev"
    app = AppProcess(
        ["dev", "--data-dir", str(data_dir), "--duration", "60s", "--port", "0"],
        env={
            "EVENTSCHED_PRODUCER__INTERVAL": "200ms",
            "EVENTSCHED_PRODUCER__DELAY_MIN": "500ms",
            "EVENTSCHED_PRODUCER__DELAY_MAX": "1s",
            "EVENTSCHED_EXECUTOR__SIMULATE__ERROR_RATE": "0",
        },
    )
    try:
        app.wait_event("dev_stack_ready", timeout=60)
        env = _read_env(data_dir / "env")
        deadline = time.monotonic() + 45
        succeeded = 0
        while time.monotonic() < deadline and succeeded < 5:
            time.sleep(1)
            with psycopg.connect(env["EVENTSCHED_POSTGRES__DSN"]) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM events WHERE status = 'succeeded'"
                ).fetchone()
            succeeded = row[0] if row else 0
        assert succeeded >= 5, "no events flowed through the pipeline"
        app.proc.send_signal(signal.SIGTERM)
        assert app.wait(60) == 0
    finally:
        app.kill()
    assert any(line.get("event") == "shutdown_complete" for line in app.lines)
    # Not on a terminal, the live summary is a log line: the counts of this run, the totals
    # from PostgreSQL, and the HTTP port, each named.
    summaries = [line["summary"] for line in app.lines if line.get("event") == "dev_summary"]
    assert summaries, "no summary line"
    assert "this run: produced" in summaries[-1]
    assert "PostgreSQL totals (every run): scheduled" in summaries[-1]
    assert re.search(r"http http://127\.0\.0\.1:\d+ \(/metrics, /readyz\)", summaries[-1])


def test_a_command_that_finds_no_server_names_the_running_stacks_env_file(
    tmp_path: Path,
) -> None:
    """`status`, `dlq list`, `send` at other addresses than the running dev stack's: each
    says which env file to source; once it is sourced, no hint."""
    data_dir = tmp_path / "dev"
    app = AppProcess(["dev", "--infra-only", "--data-dir", str(data_dir)])
    hint = f"point this shell at it with: set -a; . {data_dir / 'env'}; set +a"
    try:
        app.wait_event("dev_stack_ready", timeout=60)
        for args in (["status"], ["dlq", "list"]):
            result = offline(*args, EVENTSCHED_DEV__DATA_DIR=str(data_dir))
            assert result.returncode == 1, result.stderr
            assert result.stderr.rstrip().endswith(hint), result.stderr
        sourced = offline(
            "status", EVENTSCHED_DEV__DATA_DIR=str(data_dir), **_read_env(data_dir / "env")
        )
        assert sourced.returncode == 0, sourced.stdout + sourced.stderr
        assert "hint" not in sourced.stderr
    finally:
        app.kill()
    # The stack is gone: the same failure, no hint.
    result = offline("status", EVENTSCHED_DEV__DATA_DIR=str(data_dir))
    assert result.returncode == 1
    assert "hint" not in result.stderr


def test_every_start_creates_the_topics_anew_on_the_memory_only_broker(tmp_path: Path) -> None:
    """The broker forgets its topics and messages when the stack stops; the next start
    creates both topics again (empty), while PostgreSQL keeps its rows."""
    data_dir = tmp_path / "dev"

    def start() -> tuple[AppProcess, dict[str, str]]:
        app = AppProcess(["dev", "--infra-only", "--data-dir", str(data_dir)])
        app.wait_event("dev_stack_ready", timeout=60)
        return app, _read_env(data_dir / "env")

    def ends(bootstrap: str) -> dict[str, int]:
        """Messages on each topic (sum of its partitions' high watermarks)."""
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "dev-test-probe"})
        try:
            metadata = consumer.list_topics(timeout=10).topics
            return {
                name: sum(
                    consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1]
                    for p in metadata[name].partitions
                )
                for name in ("events", "events-dlq")
            }
        finally:
            consumer.close()

    app, env = start()
    try:
        producer = Producer({"bootstrap.servers": env["EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS"]})
        producer.produce("events", b"not an event")
        assert producer.flush(10) == 0
        assert ends(env["EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS"])["events"] == 1
        with psycopg.connect(env["EVENTSCHED_POSTGRES__DSN"], autocommit=True) as conn:
            conn.execute("CREATE TABLE kept_across_runs (n int)")
        app.proc.send_signal(signal.SIGTERM)
        assert app.wait(30) == 0
    finally:
        app.kill()

    app, env = start()
    try:
        assert ends(env["EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS"]) == {"events": 0, "events-dlq": 0}
        admin = AdminClient({"bootstrap.servers": env["EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS"]})
        topics = admin.list_topics(timeout=10).topics
        assert {name: len(topics[name].partitions) for name in ("events", "events-dlq")} == {
            "events": 3,
            "events-dlq": 3,
        }
        with psycopg.connect(env["EVENTSCHED_POSTGRES__DSN"]) as conn:
            assert conn.execute("SELECT count(*) FROM kept_across_runs").fetchone() == (0,)
        app.proc.send_signal(signal.SIGTERM)
        assert app.wait(30) == 0
    finally:
        app.kill()
