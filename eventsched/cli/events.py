"""The commands about events: ``send`` (publish one), ``events`` (show, list; cancel,
reschedule, retry through Kafka) and ``dlq`` (the dead-letter topic: list, replay). The work
is in :mod:`eventsched.core.operations` (send, events, dlq; eventviews prints)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from eventsched.cli.common import (
    JSON,
    F,
    OneLineUsage,
    State,
    handle_errors,
    input_errors_exit_2,
    pass_state,
    subcommand,
)
from eventsched.core.domain.commands import RETRYABLE
from eventsched.core.domain.event import STATUSES
from eventsched.core.runtime import tracing


@click.command()
@click.option("--type", "type_", required=True, help="Event type (selects the handler).")
@click.option("--at", default=None, help="Due time, RFC 3339 with an offset: 2030-01-31T09:00:00Z.")
@click.option("--in", "in_", default=None, help="Due in this long: 30s, 5m, 2h, 1d.")
@click.option("--payload", default=None, help="Payload, a JSON object (default {}).")
@click.option("--key", default=None, help="Idempotency key (default: the event id).")
@pass_state
@handle_errors
@input_errors_exit_2
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


@click.group(cls=OneLineUsage)
def events() -> None:
    """Events in PostgreSQL: show, list; cancel, reschedule, retry (commands through Kafka).

    ID is an event id; --key KEY names an event by its idempotency key instead. TIME is
    RFC 3339 with an offset (2030-01-31T09:00:00Z); DURATION is 30s, 5m, 2h, 1d.
    """


_KEYS = click.option("--key", "keys", multiple=True, help="An idempotency key (repeatable).")
_AT = click.option("--at", default=None, help="Due at TIME (RFC 3339 with an offset).")
_IN = click.option("--in", "in_", default=None, help="Due in DURATION from now: 30s, 5m, 2h.")


def _events_command(name: str) -> Callable[[F], F]:
    """An ``events`` subcommand with the settings, errors (exit 1/2) and its --json flag."""

    def decorate(fn: F) -> F:
        return subcommand(events, name)(JSON(fn))

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


@click.group()
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
