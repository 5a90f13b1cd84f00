"""``eventsched run`` and ``eventsched dev``: the commands that run the service (the roles,
or the whole stack on embedded servers) until they are told to stop."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from eventsched.cli.common import State, configure_logging, handle_errors, pass_state
from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.settings import validate_for_roles


@click.command()
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
    configure_logging(settings, batched=True)
    structlog.contextvars.bind_contextvars(role="+".join(wanted))
    runtime = Runtime(settings, wanted, port=port)
    result = trio.run(runtime.run)
    sys.exit(result.exit_code)


@click.command()
@click.option(
    "--infra-only", is_flag=True, help="Start only the servers (migrated, topics created) and wait."
)
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
