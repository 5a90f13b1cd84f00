"""Command line: thin. Parses flags, loads settings, calls core.

Exit codes: 0 success, 1 a dependency or operation failed, 2 bad usage or bad settings
(one line on stderr naming the key, no traceback), 130 forced shutdown (second signal).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from eventsched.core.config import Settings, load_settings, validate_for_roles
from eventsched.core.errors import (
    ConfigError,
    DependencyError,
    DevStackError,
    EventschedError,
    MigrationError,
    PluginError,
)

F = TypeVar("F", bound=Callable[..., Any])


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"eventsched: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    """Turn our errors into one clear line and the documented exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, PluginError) as err:
            _fail(2, f"error: {err}")
        except (DependencyError, MigrationError, DevStackError) as err:
            _fail(1, f"error: {err}")
        except EventschedError as err:
            _fail(1, f"error: {err}")

    return wrapper  # type: ignore[return-value]  # same signature as fn


class State:
    def __init__(self, settings_path: str | None) -> None:
        self.settings_path = settings_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.settings_path)
        return self._settings


pass_state = click.make_pass_decorator(State)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--settings",
    "settings_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="An extra settings file layered over config/settings.toml.",
)
@click.version_option(package_name="eventsched")
@click.pass_context
def cli(ctx: click.Context, settings_path: str | None) -> None:
    """eventsched: deferred events from Kafka, recorded in PostgreSQL, run on time from Redis."""
    ctx.obj = State(settings_path)


def _configure_logging(settings: Settings) -> None:
    from eventsched.core.logging import configure_logging

    configure_logging(settings.logging.level, settings.logging.format)


@cli.command()
@click.option(
    "--role",
    "roles",
    multiple=True,
    required=True,
    type=click.Choice(["producer", "consumer", "executor", "all"]),
    help="Role to run in this process (repeatable; 'all' runs every role).",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=None, help="HTTP port (overrides http.port)."
)
@pass_state
@handle_errors
def run(state: State, roles: tuple[str, ...], port: int | None) -> None:
    """Run producer, consumer and/or executor roles until SIGTERM/SIGINT."""
    import structlog
    import trio

    from eventsched.core.runtime import Runtime, expand_roles

    settings = state.settings
    wanted = expand_roles(roles)
    validate_for_roles(settings, set(wanted))
    _configure_logging(settings)
    structlog.contextvars.bind_contextvars(role="+".join(wanted))
    runtime = Runtime(settings, wanted, port=port)
    result = trio.run(runtime.run)
    sys.exit(result.exit_code)


@cli.group()
def migrate() -> None:
    """Apply the sql/ migrations (golang-migrate compatible bookkeeping)."""


@migrate.command("up")
@click.argument("steps", type=click.IntRange(min=1), required=False)
@pass_state
@handle_errors
def migrate_up(state: State, steps: int | None) -> None:
    """Apply all pending migrations, or the next STEPS."""
    from eventsched.core import migrate as m
    from eventsched.core.config import require_postgres

    applied = m.up(require_postgres(state.settings), m.default_sql_dir(), steps)
    click.echo(f"applied: {', '.join(map(str, applied))}" if applied else "no change")


@migrate.command("down")
@click.argument("steps", type=click.IntRange(min=1), required=False, default=1)
@click.option("--all", "all_", is_flag=True, help="Revert every migration.")
@pass_state
@handle_errors
def migrate_down(state: State, steps: int, all_: bool) -> None:
    """Revert the last STEPS migrations (default 1)."""
    from eventsched.core import migrate as m
    from eventsched.core.config import require_postgres

    reverted = m.down(
        require_postgres(state.settings), m.default_sql_dir(), None if all_ else steps
    )
    click.echo(f"reverted: {', '.join(map(str, reverted))}" if reverted else "no change")


@migrate.command("version")
@pass_state
@handle_errors
def migrate_version(state: State) -> None:
    """Print the current schema version (and whether it is dirty)."""
    from eventsched.core import migrate as m
    from eventsched.core.config import require_postgres

    version, dirty = m.version(require_postgres(state.settings))
    if version is None:
        click.echo("no migration applied")
    else:
        click.echo(f"{version}{' (dirty)' if dirty else ''}")


@migrate.command("force", context_settings={"ignore_unknown_options": True})
@click.argument("version", type=int)
@pass_state
@handle_errors
def migrate_force(state: State, version: int) -> None:
    """Set the version without running migrations and clear the dirty flag (-1: none)."""
    from eventsched.core import migrate as m
    from eventsched.core.config import require_postgres

    m.force(require_postgres(state.settings), version)
    click.echo(f"forced version {version}")


@cli.group()
def topics() -> None:
    """Kafka topics."""


@topics.command("ensure")
@pass_state
@handle_errors
def topics_ensure(state: State) -> None:
    """Create the events and DLQ topics if missing; grow partitions to kafka.partitions."""
    from eventsched.core.config import require_kafka
    from eventsched.core.kafka import ensure_topics

    s = state.settings
    lines = ensure_topics(
        require_kafka(s),
        {s.kafka.topic: s.kafka.partitions, s.kafka.dlq_topic: s.kafka.partitions},
        replication_factor=s.kafka.replication_factor,
        config=dict(s.kafka.client),
    )
    for line in lines:
        click.echo(line)


@cli.command()
@click.option("--infra-only", is_flag=True, help="Start only the servers and wait.")
@click.option("--duration", default=None, help="Stop after this long (e.g. 30s, 5m).")
@click.option(
    "--data-dir", type=click.Path(file_okay=False), default=None, help="Default: dev.data_dir."
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=None, help="HTTP port for the roles."
)
@pass_state
@handle_errors
def dev(
    state: State, infra_only: bool, duration: str | None, data_dir: str | None, port: int | None
) -> None:
    """Run everything locally without Docker: embedded PostgreSQL, Redis, Kafka-protocol broker."""
    from eventsched.core.config import parse_duration
    from eventsched.core.devrun import run_dev

    seconds: float | None = None
    if duration is not None:
        try:
            seconds = parse_duration(duration)
        except ValueError as err:
            raise ConfigError("--duration", str(err)) from None
    directory = Path(data_dir or state.settings.dev.data_dir)
    sys.exit(
        run_dev(
            state.settings_path,
            directory,
            infra_only=infra_only,
            duration=seconds,
            port=port,
        )
    )


def main() -> None:
    cli(prog_name="eventsched")
