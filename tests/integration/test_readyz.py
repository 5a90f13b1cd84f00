"""/readyz follows its dependencies: 503 naming PostgreSQL while it is down, 200 after."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from confluent_kafka.admin import AdminClient

from eventsched.core.kafka import ensure_topics
from eventsched.core.operations.devpostgres import PostgresServer
from tests.support.proc import AppProcess
from tests.support.servers import Names


def _poll_ready(port: int, want: int, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        last = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        if last.status_code == want:
            return last
        time.sleep(0.2)
    raise AssertionError(f"/readyz never answered {want}; last: {last and last.text}")


def test_readyz_tracks_postgres_outage(own_postgres: PostgresServer) -> None:
    app = AppProcess(
        ["run", "--role", "consumer", "--port", "0"],
        env={
            "EVENTSCHED_PLUGINS__CONSUMER": "tests.support.roles:PostgresRole",
            "EVENTSCHED_POSTGRES__DSN": own_postgres.url,
            "EVENTSCHED_POSTGRES__CONNECT_TIMEOUT": "1s",
        },
    )
    try:
        port = app.wait_event("http_listening")["port"]
        body = _poll_ready(port, 200).json()
        assert body["dependencies"] == {"postgres": "ok"}
        assert body["roles"] == {"consumer": True}

        own_postgres.stop()
        down = _poll_ready(port, 503)
        assert down.json()["failing"] == ["postgres"]
        assert "postgres" in down.json()["dependencies"]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'eventsched_dependency_up{dependency="postgres"} 0.0' in metrics
        app.wait_event("dependency_down")

        own_postgres.start()
        up = _poll_ready(port, 200)
        assert up.json()["dependencies"] == {"postgres": "ok"}
        app.wait_event("dependency_recovered")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'eventsched_dependency_up{dependency="postgres"} 1.0' in metrics
    finally:
        app.stop()


def test_a_role_started_while_redis_is_down_waits_for_it(tmp_path: Path) -> None:
    """Start-up rides out a dependency that is not there yet (it used to exit 1)."""
    from eventsched.core.operations.devbrokers import RedisServer

    server = RedisServer(tmp_path / "redis", fast=True)
    server.start()
    url = server.url
    server.stop()
    app = AppProcess(
        ["run", "--role", "executor", "--port", "0"],
        env={
            "EVENTSCHED_PLUGINS__EXECUTOR": "tests.support.roles:RedisRole",
            "EVENTSCHED_REDIS__URL": url,
        },
    )
    try:
        port = app.wait_event("http_listening")["port"]
        down = _poll_ready(port, 503)
        assert "redis" in down.json()["failing"]
        time.sleep(1.5)
        assert app.proc.poll() is None, app.tail()
        server.start()  # same port
        up = _poll_ready(port, 200)
        assert up.json()["roles"] == {"executor": True}
        app.wait_event("dependency_recovered")
    finally:
        app.stop()
        server.stop()


def test_a_role_whose_topics_are_missing_is_not_ready_and_creates_none(
    kafka_bootstrap: str, names: Names
) -> None:
    """No client creates a topic by naming it (the dev broker made `events` with its own
    partition count that way): /readyz names the command that creates them."""
    app = AppProcess(
        ["run", "--role", "producer", "--port", "0"],
        env={
            "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
            "EVENTSCHED_KAFKA__TOPIC": names.topic,
            "EVENTSCHED_KAFKA__DLQ_TOPIC": names.dlq_topic,
            "EVENTSCHED_PRODUCER__INTERVAL": "100ms",
        },
    )
    try:
        port = app.wait_event("http_listening")["port"]
        deadline = time.monotonic() + 20
        while True:  # past "not checked yet": the first check's answer
            down = _poll_ready(port, 503).json()
            problem = down["dependencies"]["kafka"]
            if problem != "not checked yet" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert down["failing"] == ["kafka"]
        assert names.topic in problem and names.dlq_topic in problem
        assert "eventsched topics ensure" in problem
        app.wait_event("producer_started", timeout=30)
        # 20 sends in 2 s: with auto-creation, the first send's metadata request would have
        # created the topic (it did on the dev broker).
        time.sleep(2)
        listed = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
        assert not {names.topic, names.dlq_topic} & set(listed.topics)
        ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
        assert _poll_ready(port, 200).json()["dependencies"] == {"kafka": "ok"}
    finally:
        app.stop()
