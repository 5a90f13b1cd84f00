"""The commands that look after a deployment: ``migrate`` (the schema), ``topics`` (Kafka),
``status`` (how everything is doing) and ``retention`` (the partitioned event log).
The work is in :mod:`eventsched.core.store.migrations`, :mod:`eventsched.core.kafka` and
:mod:`eventsched.core.operations`."""

from __future__ import annotations

import sys

import click

from eventsched.cli.common import State, dev_stack_hint, handle_errors, pass_state


@click.group()
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


@click.group()
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


@click.command()
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
        dev_stack_hint(state)
        sys.exit(1)


@click.group()
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
