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

from eventsched.core.domain.commands import RETRYABLE
from eventsched.core.domain.event import STATUSES
from eventsched.core.domain.retention import policy_from_settings
from eventsched.core.domain.schedulefields import specs_from_settings
from eventsched.core.runtime import bootstrap, tracing
from eventsched.core.runtime.errors import (
    ConfigError,
    DependencyError,
    DevStackError,
    EventschedError,
    MigrationError,
    PluginError,
)
from eventsched.core.runtime.settings import Settings, load_settings, validate_for_roles
from eventsched.schedulescli import schedules_group

F = TypeVar("F", bound=Callable[..., Any])


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"eventsched: {message}", err=True)
    sys.exit(code)


def _dev_stack_hint(state: Any) -> None:
    """After a command found no server: if a dev stack runs from this directory (its data
    dir, ``dev.data_dir``) on other addresses than the command's settings, say which env
    file to source (on stderr)."""
    if not isinstance(state, State) or state._settings is None:
        return
    from eventsched.core.operations.devstack import env_file_hint

    s = state.settings
    hint = env_file_hint(
        Path(s.dev.data_dir),
        {
            "EVENTSCHED_POSTGRES__DSN": s.postgres.dsn,
            "EVENTSCHED_REDIS__URL": s.redis.url,
            "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
        },
    )
    if hint:
        click.echo(f"eventsched: hint: {hint}", err=True)


def handle_errors(fn: F) -> F:
    """Turn our errors into one clear line and the documented exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, PluginError) as err:
            _fail(2, f"error: {err}")
        except DependencyError as err:
            click.echo(f"eventsched: error: {err}", err=True)
            _dev_stack_hint(args[0] if args else None)
            sys.exit(1)
        except (MigrationError, DevStackError) as err:
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
            specs_from_settings(self._settings)  # [schedules.<name>]: the domain's checks
            policy_from_settings(self._settings.retention)  # [retention]: likewise
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
    # OTEL_* variables: the event's trace starts here (docs/observability.md).
    tracing.configure("eventsched-cli")
    try:
        send_event(state.settings, event)
    finally:
        tracing.shutdown()
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
        _dev_stack_hint(state)
        sys.exit(1)


@cli.group()
def retention() -> None:
    """The time-partitioned event log: partitions and retention (docs/retention.md)."""


@retention.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_state
@handle_errors
def retention_status(state: State, as_json: bool) -> None:
    """Every partition (range, rows, size, unfinished events) and what a pass would do now."""
    import json

    from eventsched.core.operations import retention as retention_command

    report = retention_command.status(state.settings)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(retention_command.render_status(report))


@retention.command("enforce")
@click.option("--dry-run", is_flag=True, help="Print what the pass would do; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_state
@handle_errors
def retention_enforce(state: State, dry_run: bool, as_json: bool) -> None:
    """Run one retention pass now: create partitions ahead, retire old days (under the
    retention lock: never beside the executors' leader)."""
    import json

    from eventsched.core.operations import retention as retention_command

    report = retention_command.enforce(state.settings, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(retention_command.render_pass(report))


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


# -- events (eventsched.core.operations.events does the work, .eventviews prints) -----------


class _OneLineUsage(click.Group):
    """A group whose usage errors (an unknown option, a bad value) are one line, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            _fail(2, f"error: {err.format_message()}")


@cli.group(cls=_OneLineUsage)
def events() -> None:
    """Events in PostgreSQL: show, list; cancel, reschedule, retry (commands through Kafka).

    ID is an event id; --key KEY names an event by its idempotency key instead. TIME is
    RFC 3339 with an offset (2030-01-31T09:00:00Z); DURATION is 30s, 5m, 2h, 1d.
    """


_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
_KEYS = click.option("--key", "keys", multiple=True, help="An idempotency key (repeatable).")
_AT = click.option("--at", default=None, help="Due at TIME (RFC 3339 with an offset).")
_IN = click.option("--in", "in_", default=None, help="Due in DURATION from now: 30s, 5m, 2h.")


def _events_command(name: str) -> Callable[[F], F]:
    """An ``events`` subcommand with the settings, errors (exit 1/2) and its --json flag."""

    def decorate(fn: F) -> F:
        wrapped = _input_errors_exit_2(fn)
        return events.command(name)(_JSON(pass_state(handle_errors(wrapped))))  # type: ignore[return-value]

    return decorate


@_events_command("show")
@click.argument("event_id", metavar="[ID]", required=False)
@click.option("--key", default=None, help="The idempotency key instead of an id.")
def events_show(state: State, event_id: str | None, key: str | None, as_json: bool) -> None:
    """One event: status, due time, payload and every attempt (exit 1 if unknown)."""
    from eventsched.core.operations import events as ops
    from eventsched.core.operations import eventviews as views
    from eventsched.core.store import rowjson

    row = ops.show_event(state.settings, event_id=event_id, key=key)
    click.echo(views.to_json(rowjson.event_json(row)) if as_json else views.render_event(row))


@_events_command("list")
@click.option("--status", type=click.Choice(STATUSES), help="Only events in this status.")
@click.option("--type", "type_", default=None, help="Only events of this type.")
@click.option("--due-after", default=None, help="Due at or after TIME (RFC 3339).")
@click.option("--due-before", default=None, help="Due before TIME (RFC 3339).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
def events_list(
    state: State,
    status: str | None,
    type_: str | None,
    due_after: str | None,
    due_before: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Events in due order (earliest first), without their payloads."""
    from eventsched.core.operations import events as ops
    from eventsched.core.operations import eventviews as views
    from eventsched.core.store import rowjson

    rows = ops.list_events(
        state.settings, limit=limit, status=status, type_=type_,
        due_after=ops.parse_time_option("--due-after", due_after),
        due_before=ops.parse_time_option("--due-before", due_before),
    )  # fmt: skip
    if as_json:
        click.echo(views.to_json([rowjson.summary_json(r) for r in rows]))
    else:
        click.echo(views.render_list(rows))


def _send(state: State, op: Any, targets: list[Any], due: Any, as_json: bool) -> None:
    """Send, print one line per target; exit 1 when some target was not sent."""
    from eventsched.core.operations import events as ops
    from eventsched.core.operations import eventviews as views

    refused = 0
    for result in ops.send_commands(state.settings, op, targets, execute_at=due):
        refused += result.command_id is None
        click.echo(views.command_line(result, as_json))
    if refused:
        sys.exit(1)


@_events_command("cancel")
@click.argument("event_ids", metavar="[ID]...", nargs=-1)
@_KEYS
def events_cancel(
    state: State, event_ids: tuple[str, ...], keys: tuple[str, ...], as_json: bool
) -> None:
    """Cancel events that have not finished; prints each command id and "accepted"."""
    from eventsched.core.operations import events as ops

    _send(state, "cancel", ops.targets(state.settings, event_ids, keys), None, as_json)


@_events_command("reschedule")
@click.argument("event_id", metavar="[ID]", required=False)
@click.option("--key", default=None, help="The idempotency key instead of an id.")
@_AT
@_IN
def events_reschedule(
    state: State,
    event_id: str | None,
    key: str | None,
    at: str | None,
    in_: str | None,
    as_json: bool,
) -> None:
    """Move a scheduled or retrying event to a new due time (--at or --in)."""
    from eventsched.core.operations import events as ops

    ids, keys = ops.one_target(event_id, key)
    due = ops.due_option(state.settings, "reschedule", at, in_, required=True)
    _send(state, "reschedule", ops.targets(state.settings, ids, keys), due, as_json)


@_events_command("retry")
@click.argument("event_ids", metavar="[ID]...", nargs=-1)
@_KEYS
@_AT
@_IN
@click.option("--status", type=click.Choice(RETRYABLE), help="Retry by filter.")
@click.option("--type", "type_", default=None, help="With --status: only this type.")
@click.option("--since", default=None, help="With --status: only finished since TIME.")
@click.option("--limit", type=click.IntRange(min=1), help="With --status: at most N events.")
@click.option("--dry-run", is_flag=True, help="Print the count and the ids; send nothing.")
@click.option("--yes", is_flag=True, help="Needed to retry more than 100 events by filter.")
def events_retry(
    state: State,
    event_ids: tuple[str, ...],
    keys: tuple[str, ...],
    at: str | None,
    in_: str | None,
    status: str | None,
    type_: str | None,
    since: str | None,
    limit: int | None,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Run dead or cancelled events again (at once, or --at/--in): by id or --key, or every
    event of a filter (--status dead [--type T] [--since TIME] [--limit N]), oldest finish
    first. By filter, the count is printed first; more than 100 events need --yes."""
    from eventsched.core.operations import events as ops
    from eventsched.core.operations import eventviews as views

    due = ops.due_option(state.settings, "retry", at, in_, required=False)
    if status is None:
        ops.no_filter(type_=type_, since=since, limit=limit)
        targets = ops.targets(state.settings, event_ids, keys)
    else:
        ops.no_targets(event_ids, keys)
        since_time = ops.parse_time_option("--since", since)
        selection = ops.select_for_retry(
            state.settings, status=status, type_=type_, since=since_time, limit=limit
        )
        click.echo(views.selection_line(selection, dry_run, as_json))
        targets = list(selection.events)
        if not dry_run:
            ops.check_bulk(len(targets), yes=yes)
    if dry_run:
        for target in targets:
            click.echo(views.target_line(target, as_json))
    else:
        _send(state, "retry", targets, due, as_json)


cli.add_command(
    schedules_group(
        cls=_OneLineUsage,
        pass_state=pass_state,
        handle_errors=handle_errors,
        input_errors=_input_errors_exit_2,
    )
)


def main() -> None:
    bootstrap.install()  # before any command opens a trio-asyncio loop
    cli(prog_name="eventsched")
