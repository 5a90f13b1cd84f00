"""`eventsched dev`: the newcomer's first minute, without Docker.

Starts the embedded servers (PostgreSQL, Redis, the Kafka-protocol broker) as children of
this process, writes their addresses to ``<data dir>/env``, migrates, ensures the topics,
then runs every role in this process with a live summary. ``--infra-only`` stops after the
servers are up, migrated and have their topics, and waits. The servers are started from the main thread on purpose: their
parent-death signal is tied to the thread that forked them (see devstack).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

import trio

from eventsched.core.kafka import ensure_topics
from eventsched.core.operations.devstack import DevStack, DevStackInfo
from eventsched.core.runtime.logs import configure_logging, get_logger
from eventsched.core.runtime.root import Runtime
from eventsched.core.runtime.settings import (
    ROLES,
    Settings,
    load_settings,
    require_kafka,
    require_postgres,
)
from eventsched.core.store import migrations

log = get_logger(__name__)

#: Settings of every role run against the dev stack (its own, and, through the env file,
#: those started by hand), unless the environment sets them. Tansu can wedge a consumer
#: group after members leave (a member that left stays its leader, so nobody gets
#: partitions): a consumer stalled that way rejoins after 30 s, having the broker forget
#: the group (docs/operations.md, "The dev broker's consumer group").
DEV_SETTINGS = {"EVENTSCHED_CONSUMER__REJOIN_AFTER": "30s"}

#: The dev broker (Tansu) keeps topics, messages and group offsets in memory only: said at
#: start-up and in the live summary, so that nobody expects them back after a restart.
BROKER_NOTE = (
    "in memory only: topics, their messages (DLQ included) and committed offsets are lost "
    "when eventsched dev stops; topics are created anew at every start, and PostgreSQL and "
    "Redis keep their data"
)


def run_dev(
    settings_path: str | None,
    data_dir: Path,
    *,
    infra_only: bool,
    duration: float | None,
    port: int | None,
) -> int:
    interactive = sys.stdout.isatty()
    log_file = _log_to(data_dir, interactive)
    base = load_settings(settings_path)
    configure_logging(
        base.logging.level, "json" if log_file else base.logging.format, stream=log_file
    )
    if interactive:
        print(
            f"eventsched dev: starting PostgreSQL, Redis and the broker in {data_dir} ...",
            flush=True,
        )
    dev_settings = {key: os.environ.get(key, value) for key, value in DEV_SETTINGS.items()}
    stack = DevStack(data_dir, settings_env=dev_settings)
    info = stack.start()
    try:
        # Schema and topics before anything is announced, with --infra-only too: roles
        # started by hand against these servers find them ready (no role creates topics).
        settings = load_settings(
            settings_path, environ={**os.environ, **dev_settings, **info.as_env()}
        )
        _prepare(settings)
        env_file = stack.env_path
        _announce(info, env_file, data_dir / "logs", interactive, stack.timings.get("total", 0.0))
        if infra_only:
            trio.run(_wait_for_stop, duration)
            return 0
        tasks = _extra_tasks(info, env_file, data_dir / "logs", duration)
        runtime = Runtime(settings, list(ROLES), port=port, extra_tasks=tasks)
        return trio.run(runtime.run).exit_code
    finally:
        stack.stop()
        if log_file is not None:
            log_file.close()
        if interactive:
            print("eventsched dev: stopped.", flush=True)


def _prepare(settings: Settings) -> None:
    """Migrate the schema and create the topics (the broker keeps them in memory only, so
    every start of the dev stack creates them anew)."""
    applied = migrations.up(require_postgres(settings), migrations.default_sql_dir())
    log.info("migrated", applied=applied)
    s = settings.kafka
    for line in ensure_topics(
        require_kafka(settings),
        {s.topic: s.partitions, s.dlq_topic: s.partitions},
        replication_factor=s.replication_factor,
        config=dict(s.client),
    ):
        log.info("topics", result=line)


def _log_to(data_dir: Path, interactive: bool) -> TextIO | None:
    """On a terminal the summary owns the screen: JSON logs go to a file in the data dir."""
    if not interactive:
        return None
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return (logs / "eventsched.log").open("a", buffering=1)


def _announce(
    info: DevStackInfo, env_file: Path, log_dir: Path, interactive: bool, seconds: float
) -> None:
    log.info(
        "dev_stack_ready",
        env_file=str(env_file),
        log_dir=str(log_dir),
        broker=BROKER_NOTE,
        seconds=round(seconds, 2),
        **info.as_env(),
    )
    if interactive:
        print(f"eventsched dev: servers up in {seconds:.1f}s", flush=True)
        for key, value in info.as_env().items():
            print(f"  {key}={value}")
        print(f"  logs: {log_dir}")
        print(f"  the broker: {BROKER_NOTE}")
        print(f"  use them from another shell: set -a; . {env_file}; set +a", flush=True)


def _extra_tasks(
    info: DevStackInfo, env_file: Path, log_dir: Path, duration: float | None
) -> list[Callable[[Runtime], Awaitable[None]]]:
    from eventsched.core.operations.summary import DevFacts, live_summary

    facts = DevFacts(env_file=str(env_file), log_dir=str(log_dir))

    stack = {
        "postgres": info.postgres_dsn or "-",
        "redis": info.redis_url or "-",
        "kafka": info.kafka_bootstrap or "-",
    }

    async def summary(runtime: Runtime) -> None:
        await live_summary(runtime, stack, facts=facts)

    async def stop_after(runtime: Runtime) -> None:
        assert duration is not None
        await trio.sleep(duration)
        log.info("duration_elapsed", seconds=duration)
        runtime.request_stop()

    return [summary, stop_after] if duration is not None else [summary]


async def _wait_for_stop(duration: float | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        with trio.move_on_after(duration if duration is not None else float("inf")):
            async for signum in signals:
                log.info("shutdown_requested", signal=signal.Signals(signum).name)
                return
        log.info("duration_elapsed", seconds=duration)
