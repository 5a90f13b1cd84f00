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

from eventsched.core.runtime import bootstrap
from eventsched.core.runtime.errors import (
    ConfigError,
    DependencyError,
    DevStackError,
    EventschedError,
    MigrationError,
    PluginError,
)
from eventsched.core.runtime.settings import Settings, load_settings, validate_for_roles

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
        #: False for `run` and `dev`, which configure logging for their processes themselves.
        self.command_logging = True

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.settings_path)
            if self.command_logging:
                # Operator commands print their results on stdout; their log lines (at
                # logging.level) go to stderr, so the two never mix.
                _configure_logging(self._settings, stream=sys.stderr)
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


def _configure_logging(settings: Settings, stream: Any = None) -> None:
    from eventsched.core.runtime.logs import configure_logging

    configure_logging(settings.logging.level, settings.logging.format, stream=stream)


@cli.command()
@click.option(
    "--role",
    "roles",
    multiple=True,
    required=True,
    type=click.Choice(["producer", "consumer", "executor", "api", "all"]),
    help="Role to run in this process (repeatable; 'all' runs producer, consumer, executor).",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=None, help="HTTP port (overrides http.port)."
)
@pass_state
@handle_errors
def run(state: State, roles: tuple[str, ...], port: int | None) -> None:
    """Run producer, consumer, executor and/or api roles until SIGTERM/SIGINT."""
    import structlog
    import trio

    from eventsched.core.runtime.root import Runtime, expand_roles

    state.command_logging = False  # the roles log to stdout, configured below
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
    from eventsched.core.runtime.settings import require_postgres
    from eventsched.core.store import migrations

    applied = migrations.up(require_postgres(state.settings), migrations.default_sql_dir(), steps)
    click.echo(f"applied: {', '.join(map(str, applied))}" if applied else "no change")


@migrate.command("down")
@click.argument("steps", type=click.IntRange(min=1), required=False, default=1)
@click.option("--all", "all_", is_flag=True, help="Revert every migration.")
@pass_state
@handle_errors
def migrate_down(state: State, steps: int, all_: bool) -> None:
    """Revert the last STEPS migrations (default 1)."""
    from eventsched.core.runtime.settings import require_postgres
    from eventsched.core.store import migrations

    reverted = migrations.down(
        require_postgres(state.settings), migrations.default_sql_dir(), None if all_ else steps
    )
    click.echo(f"reverted: {', '.join(map(str, reverted))}" if reverted else "no change")


@migrate.command("version")
@pass_state
@handle_errors
def migrate_version(state: State) -> None:
    """Print the current schema version (and whether it is dirty)."""
    from eventsched.core.runtime.settings import require_postgres
    from eventsched.core.store import migrations

    version, dirty = migrations.version(require_postgres(state.settings))
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
    from eventsched.core.runtime.settings import require_postgres
    from eventsched.core.store import migrations

    migrations.force(require_postgres(state.settings), version)
    click.echo(f"forced version {version}")


@cli.group()
def topics() -> None:
    """Kafka topics."""


@topics.command("ensure")
@pass_state
@handle_errors
def topics_ensure(state: State) -> None:
    """Create the events and DLQ topics if missing; grow partitions to kafka.partitions."""
    from eventsched.core.kafka import ensure_topics
    from eventsched.core.runtime.settings import require_kafka

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
    from eventsched.core.operations.devrun import run_dev
    from eventsched.core.runtime.units import parse_duration

    state.command_logging = False  # run_dev configures logging for the stack itself
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


# -- operator commands (eventsched.core.operations.send, .status and .dlq do the work) --------


def _input_errors_exit_2(fn: F) -> F:
    """Bad option values of the operator commands: one line, exit 2 (like bad settings)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from eventsched.core.operations.send import InputError

        try:
            return fn(*args, **kwargs)
        except InputError as err:
            _fail(2, f"error: {err}")

    return wrapper  # type: ignore[return-value]  # same signature as fn


@cli.command()
@click.option("--type", "type_", required=True, help="Event type (selects the handler).")
@click.option("--at", default=None, help="Due time, RFC 3339 with an offset: 2030-01-31T09:00:00Z.")
@click.option("--in", "in_", default=None, help="Due in this long: 30s, 5m, 2h, 1d.")
@click.option("--payload", default=None, help="Payload, a JSON object (default {}).")
@click.option("--key", default=None, help="Idempotency key (default: the event id).")
@pass_state
@handle_errors
@_input_errors_exit_2
def send(
    state: State,
    type_: str,
    at: str | None,
    in_: str | None,
    payload: str | None,
    key: str | None,
) -> None:
    """Publish one event to the events topic and print its id."""
    from eventsched.core.operations.send import build_event, send_event

    event = build_event(state.settings, type_=type_, at=at, in_=in_, payload=payload, key=key)
    send_event(state.settings, event)
    click.echo(str(event.id))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_state
@handle_errors
def status(state: State, as_json: bool) -> None:
    """Events by status, SAQ queue sizes, consumer lag, DLQ size, oldest overdue event.

    Exit code 1 when a dependency did not answer (its section says why).
    """
    import json

    from eventsched.core.operations import status as status_command

    report = status_command.status(state.settings)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(status_command.render_status(report))
    if not report.ok:
        sys.exit(1)


@cli.group()
def dlq() -> None:
    """The dead-letter topic: inspect and replay."""


@dlq.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of text.")
@pass_state
@handle_errors
def dlq_list(state: State, limit: int, as_json: bool) -> None:
    """Show the oldest DLQ messages with their reason (reads without committing)."""
    import json

    from eventsched.core.operations import dlq as dlq_command

    messages = dlq_command.dlq_list(state.settings, limit=limit)
    if as_json:
        click.echo(json.dumps([m.to_json() for m in messages], indent=2))
    else:
        click.echo(dlq_command.render_dlq(messages))


@dlq.command("replay")
@click.option("--reason", default=None, help="Replay only messages with this dlq-reason.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Re-run or re-send at most N."
)
@click.option("--dry-run", is_flag=True, help="Count what would be done; change nothing.")
@pass_state
@handle_errors
def dlq_replay(state: State, reason: str | None, limit: int | None, dry_run: bool) -> None:
    """Replay DLQ letters (after a fix); progress is remembered.

    A dead event (a letter of the executor) runs again, due now, with a fresh attempt
    budget; a message the consumer rejected is re-sent to the events topic; anything else
    (the event is not dead any more, died again since, is unknown) is skipped, with why.
    """
    from eventsched.core.operations import dlq as dlq_command

    result = dlq_command.dlq_replay(state.settings, reason=reason, limit=limit, dry_run=dry_run)
    click.echo(dlq_command.render_replay(result))


def main() -> None:
    bootstrap.install()  # before any command opens a trio-asyncio loop
    cli(prog_name="eventsched")
