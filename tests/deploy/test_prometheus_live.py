"""A real Prometheus scrapes the running roles: every target up, every dashboard query has data.

The configuration is derived from the shipped ``ops/prometheus/prometheus.yml`` (same jobs,
relabelling and alert rules) with the compose DNS targets rewritten to local ports. Debian
packages Prometheus and the PostgreSQL and Redis exporters; there is no Debian Kafka
exporter, so the ``kafka-exporter`` job is dropped and its panels are listed as empty below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from confluent_kafka import Producer

from eventsched.core.kafka import ensure_topics
from tests.support.clients import FAST_GROUP_CONFIG
from tests.support.proc import REPO, AppProcess, free_port
from tests.support.servers import Names

OPS = REPO / "ops"
DASHBOARDS = OPS / "grafana" / "dashboards"

# Panels that have no data in this run by design, with the reason.
EMPTY_BY_DESIGN = {
    ("eventsched-infrastructure.json", "Kafka brokers"): "no Kafka exporter package here",
    ("eventsched-infrastructure.json", "Messages in / s by topic"): "no Kafka exporter",
    ("eventsched-infrastructure.json", "Consumer group lag"): "no Kafka exporter",
    ("eventsched-infrastructure.json", "Partitions and under-replicated"): "no Kafka exporter",
    ("eventsched-infrastructure.json", "Deadlocks (1h)"): "increase() of a counter that is 0",
    ("eventsched-overview.json", "Reconciler re-enqueued"): "nothing is lost in a healthy run",
}


def _require(binary: str) -> str:
    """The tool's path; CI must have it (.ci/run installs it), elsewhere the test skips."""
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not installed (apt-get install --no-install-recommends {_PACKAGES})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


_PACKAGES = "prometheus prometheus-postgres-exporter prometheus-redis-exporter"


def _url_dsn(conninfo: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    host = params.get("host") or "127.0.0.1"
    port = params.get("port") or "5432"
    user = params.get("user") or "postgres"
    return f"postgresql://{user}@{host}:{port}/{params['dbname']}?sslmode=disable"


class Stack:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.apps: list[AppProcess] = []

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        handle = log.open("wb")
        self.procs.append(subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env))
        handle.close()

    def close(self) -> None:
        for app in self.apps:
            app.stop()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.close()


API_TOKEN = "live-test-token-0123456789"


def _prometheus_config(tmp_path: Path, ports: dict[str, int]) -> Path:
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["global"]["scrape_timeout"] = "900ms"
    config["rule_files"] = [str(OPS / "prometheus" / "rules" / "*.yml")]
    jobs = []
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name not in ports:
            assert name == "kafka-exporter", f"unexpected job {name}"
            continue
        job.pop("dns_sd_configs", None)
        labels = {}
        for static in job.get("static_configs") or []:
            labels.update(static.get("labels") or {})
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[name]}"], "labels": labels}]
        job["scrape_interval"] = "1s"
        job["scrape_timeout"] = "900ms"
        jobs.append(job)
    config["scrape_configs"] = jobs
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _role_settings(tmp_path: Path) -> Path:
    path = tmp_path / "roles.toml"
    client = "\n".join(f'"{k}" = {v}' for k, v in FAST_GROUP_CONFIG.items())
    path.write_text(f"[default.kafka.consumer_client]\n{client}\n")
    return path


def _panel_queries() -> Iterator[tuple[str, str, str]]:
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())

        def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            for panel in panels:
                yield panel
                yield from walk(panel.get("panels") or [])

        for panel in walk(dashboard["panels"]):
            for target in panel.get("targets") or []:
                uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
                # ${datasource}: the dashboards' Prometheus variable (default: the provisioned one)
                if uid in ("prometheus", "${datasource}") and target.get("expr"):
                    yield path.name, panel["title"], target["expr"]


def _substitute(expr: str, database: str) -> str:
    expr = re.sub(r"\$\{?__rate_interval\}?", "30s", expr)
    expr = re.sub(r"\$\{?__interval\}?", "5s", expr)
    expr = expr.replace("$database", database)
    return re.sub(r"\$\{?(role|level|service|instance|type)(:\w+)?\}?", ".*", expr)


def _query(port: int, expr: str) -> list[Any]:
    response = httpx.get(
        f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10
    )
    body = response.json()
    assert body.get("status") == "success", f"{expr}: {body}"
    return list(body["data"]["result"])


def test_prometheus_scrapes_every_target_and_every_panel_has_data(
    tmp_path: Path,
    database: str,
    redis_url: str,
    kafka_bootstrap: str,
    names: Names,
    stack: Stack,
) -> None:
    prometheus = _require("prometheus")
    pg_exporter = _require("prometheus-postgres-exporter")
    redis_exporter = _require("prometheus-redis-exporter")
    ensure_topics(kafka_bootstrap, {names.topic: 3, names.dlq_topic: 3})

    env = {
        "EVENTSCHED_POSTGRES__DSN": database,
        "EVENTSCHED_REDIS__URL": redis_url,
        "EVENTSCHED_REDIS__QUEUE": names.queue,
        "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "EVENTSCHED_KAFKA__TOPIC": names.topic,
        "EVENTSCHED_KAFKA__DLQ_TOPIC": names.dlq_topic,
        "EVENTSCHED_KAFKA__CONSUMER_GROUP": names.group,
        "EVENTSCHED_PRODUCER__RATE": "40",
        "EVENTSCHED_PRODUCER__DELAY_MIN": "500ms",
        "EVENTSCHED_PRODUCER__DELAY_MAX": "2s",
        "EVENTSCHED_EXECUTOR__CONCURRENCY": "32",
        "EVENTSCHED_EXECUTOR__MAX_RETRIES": "2",
        "EVENTSCHED_EXECUTOR__SIMULATE__DURATION": "5ms",
        "EVENTSCHED_EXECUTOR__SIMULATE__ERROR_RATE": "0.4",
        "EVENTSCHED_EXECUTOR__RETRY_BACKOFF__BASE": "100ms",
        "EVENTSCHED_RECONCILER__GAUGE_INTERVAL": "1s",
        "EVENTSCHED_API__PORT": str(api_port := free_port()),
        "EVENTSCHED_API__TOKENS": f'[{{name = "live", token = "{API_TOKEN}"}}]',
    }
    settings_file = _role_settings(tmp_path)
    ports: dict[str, int] = {}
    for role in ("producer", "consumer", "executor", "api"):
        port = free_port()
        ports[role] = port
        app = AppProcess(
            ["--settings", str(settings_file), "run", "--role", role, "--port", str(port)], env=env
        )
        stack.apps.append(app)
    for app in stack.apps:
        app.wait_event("role_ready", timeout=60)

    ports["postgres-exporter"] = free_port()
    stack.spawn(
        [pg_exporter, f"--web.listen-address=127.0.0.1:{ports['postgres-exporter']}"],
        tmp_path / "pg-exporter.log",
        env={"DATA_SOURCE_NAME": _url_dsn(database), "PATH": "/usr/bin:/bin"},
    )
    ports["redis-exporter"] = free_port()
    stack.spawn(
        [
            redis_exporter,
            f"-redis.addr={redis_url.rsplit('/', 1)[0]}",
            f"-web.listen-address=127.0.0.1:{ports['redis-exporter']}",
        ],
        tmp_path / "redis-exporter.log",
    )
    ports["prometheus"] = free_port()
    stack.spawn(
        [
            prometheus,
            f"--config.file={_prometheus_config(tmp_path, ports)}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
        ],
        tmp_path / "prometheus.log",
    )

    # Malformed messages, so the DLQ panels have something to show.
    bad = Producer({"bootstrap.servers": kafka_bootstrap})
    for value in (b"not json", b"[1, 2]", b"{}"):
        bad.produce(names.topic, value=value)
    assert bad.flush(10) == 0

    # Requests, so the api's request metrics have samples.
    for _ in range(5):
        stats = httpx.get(
            f"http://127.0.0.1:{api_port}/v1/stats",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            timeout=10,
        )
        assert stats.status_code == 200, stats.text

    # The load runs (retries and dead events included) until Prometheus has every target up
    # and every panel's query answers data: a few seconds of 1 s scrapes. Checked every
    # second rather than after a fixed sleep; the last check's gaps are the failure.
    dbname = str(psycopg.conninfo.conninfo_to_dict(database)["dbname"])
    deadline = time.monotonic() + 60
    while (gaps := _gaps(ports, dbname)) and time.monotonic() < deadline:
        time.sleep(1)
    assert gaps == {}, gaps


def _gaps(ports: dict[str, int], dbname: str) -> dict[str, Any]:
    """What Prometheus lacks: targets missing or down, panels whose query answers nothing;
    Prometheus itself, while it is not listening yet (it was just spawned)."""
    try:
        targets = httpx.get(
            f"http://127.0.0.1:{ports['prometheus']}/api/v1/targets", timeout=10
        ).json()
    except httpx.ConnectError as err:
        return {"prometheus": repr(err)}
    active = targets["data"]["activeTargets"]
    gaps: dict[str, Any] = {}
    if {t["labels"]["job"] for t in active} != set(ports):
        gaps["jobs"] = sorted(t["labels"]["job"] for t in active)
    down = {t["labels"]["job"]: t.get("lastError") for t in active if t["health"] != "up"}
    if down:
        gaps["down"] = down
    queries = list(_panel_queries())
    if len(queries) <= 50:
        gaps["dashboard queries found"] = [str(len(queries))]  # the queries were not read
    empty = [
        f"{dashboard} / {title}: {expr}"
        for dashboard, title, expr in queries
        if (dashboard, title) not in EMPTY_BY_DESIGN
        and not _query(ports["prometheus"], _substitute(expr, dbname))
    ]
    if empty:
        gaps["panels without data"] = empty
    return gaps
