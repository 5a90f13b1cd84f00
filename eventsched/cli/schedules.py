"""``eventsched schedules ...``: the command group, thin like the rest of the CLI; the
work is in :mod:`eventsched.core.operations.schedules`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from eventsched.cli.common import JSON, OneLineUsage, State, subcommand
from eventsched.core.domain.schedules import MISFIRE_POLICIES


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False)


def _when(row: Any) -> str:
    spec = row.spec
    if spec.cron is not None:
        return f"cron {spec.cron!r} {spec.timezone}"
    from eventsched.core.domain.schedulefields import format_every

    return f"every {format_every(spec.every)}"


@click.group(cls=OneLineUsage)
def schedules() -> None:
    """Recurring schedules (in PostgreSQL): list, show, add, pause, resume, delete, next.

    TIME is RFC 3339 with an offset (2030-01-31T09:00:00Z); DURATION is 500ms, 30s, 5m,
    2h, 1d. Occurrences become events with the idempotency key NAME@<time UTC>.
    """


@subcommand(schedules, "list")
@JSON
def list_(state: State, as_json: bool) -> None:
    """Every schedule, by name."""
    from eventsched.core.operations import schedules as ops

    rows = ops.list_schedules(state.settings)
    if as_json:
        click.echo(_dump([ops.row_json(r) for r in rows]))
        return
    for row in rows:
        paused = "  paused" if row.spec.paused else ""
        click.echo(f"{row.name}  {_when(row)}  type={row.spec.type}  "
                   f"source={row.source}{paused}")  # fmt: skip
    if not rows:
        click.echo("no schedules")


@subcommand(schedules, "show")
@click.argument("name")
@JSON
def show(state: State, name: str, as_json: bool) -> None:
    """One schedule: its keys, where it came from, how far it is materialised."""
    from eventsched.core.operations import schedules as ops

    data = ops.row_json(ops.show_schedule(state.settings, name))
    if as_json:
        click.echo(_dump(data))
        return
    for key, value in data.items():
        shown = json.dumps(value) if isinstance(value, dict) else value
        click.echo(f"{key + ':':22}{'' if value is None else shown}")


@subcommand(schedules, "add")
@click.argument("name")
@click.option("--type", "type_", required=True, help="Event type of the occurrences.")
@click.option("--cron", default=None, help="Cron expression (5 fields, or 6: seconds first).")
@click.option("--every", default=None, help="Fixed interval (DURATION), elapsed time.")
@click.option("--timezone", default=None, help="IANA time zone of --cron (default UTC).")
@click.option("--payload", default=None, help="Payload of every event, a JSON object.")
@click.option("--start", default=None, help="First possible occurrence (TIME, inclusive).")
@click.option("--end", default=None, help="Last possible occurrence (TIME, inclusive).")
@click.option("--misfire", type=click.Choice(MISFIRE_POLICIES), default=None,
              help="Occurrences missed while nothing ran (default run_once).")  # fmt: skip
@click.option("--misfire-limit", type=int, default=None, help="run_all catches up at most N.")
@click.option("--paused", is_flag=True, default=None, help="Add it paused.")
@JSON
def add(state: State, name: str, type_: str, as_json: bool, **options: Any) -> None:
    """Add a schedule (exit 1 if the name is taken)."""
    from eventsched.core.operations import schedules as ops

    spec = ops.parse_spec(name, {"type": type_, **options})
    row = ops.add_schedule(state.settings, spec)
    click.echo(_dump(ops.row_json(row)) if as_json else f"added {row.name}")


def _pause_or_resume(paused: bool) -> Callable[..., None]:
    def run(state: State, name: str, as_json: bool) -> None:
        from eventsched.core.operations import schedules as ops

        row = ops.set_paused(state.settings, name, paused)
        word = "paused" if paused else "resumed"
        click.echo(_dump(ops.row_json(row)) if as_json else f"{word} {row.name}")

    return run


pause = _pause_or_resume(True)
pause.__doc__ = "Stop materialising occurrences (those already materialised still run)."
subcommand(schedules, "pause")(JSON(click.argument("name")(pause)))
resume = _pause_or_resume(False)
resume.__doc__ = "Materialise again, from now (what passed meanwhile is skipped)."
subcommand(schedules, "resume")(JSON(click.argument("name")(resume)))


@subcommand(schedules, "delete")
@click.argument("name")
@JSON
def delete(state: State, name: str, as_json: bool) -> None:
    """Delete a schedule and cancel the occurrences it materialised ahead."""
    from eventsched.core.operations import schedules as ops

    done = ops.delete_schedule(state.settings, name)
    if as_json:
        click.echo(_dump({"name": name, "cancelled": done.cancelled}))
    else:
        click.echo(f"deleted {name}; cancelled {len(done.cancelled)} materialised occurrences")


@subcommand(schedules, "next")
@click.argument("name")
@click.option("--count", type=click.IntRange(0), default=10, show_default=True)
@click.option("--from", "from_", default=None, help="After TIME (default: now).")
@JSON
def next_(state: State, name: str, count: int, from_: str | None, as_json: bool) -> None:
    """The next occurrences, RFC 3339 with the UTC offset in force in its time zone."""
    from eventsched.core.operations import schedules as ops
    from eventsched.core.operations.events import parse_time_option

    after = parse_time_option("--from", from_)
    _, times = ops.next_times(state.settings, name, count=count, after=after)
    click.echo(_dump(times) if as_json else "\n".join(times))
