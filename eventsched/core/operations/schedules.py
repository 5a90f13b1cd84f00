"""``eventsched schedules``: list, show, add, pause, resume, delete recurring schedules and
print their next occurrences.

Blocking, on the calling thread, like :mod:`.events`: each command is one ``trio.run`` on a
one-connection pool (:func:`eventsched.core.operations.events.read`). Schedule definitions
are configuration, not events: they are written to PostgreSQL directly
(:mod:`eventsched.core.store.schedules`); the events their occurrences become travel on the
log. Deleting a schedule cancels the occurrences it had materialised ahead (after now, up
to its watermark) with cancel commands on the log, sent with
:class:`eventsched.client.Client` like ``events cancel``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from eventsched.core.domain.schedulefields import (
    format_local,
    materialised_after,
    spec_from_fields,
)
from eventsched.core.domain.schedules import ScheduleSpec, next_occurrences, occurrence_key
from eventsched.core.operations.events import COMMAND_TIMEOUT, quiet, read, requested_by
from eventsched.core.operations.send import InputError
from eventsched.core.runtime.errors import EventschedError
from eventsched.core.runtime.settings import Settings
from eventsched.core.store import schedules as store
from eventsched.core.store.schedules import ScheduleRow, row_json

__all__ = [
    "Deleted",
    "ScheduleExists",
    "SettingsSchedule",
    "UnknownSchedule",
    "add_schedule",
    "delete_schedule",
    "list_schedules",
    "next_times",
    "parse_spec",
    "row_json",
    "set_paused",
    "show_schedule",
]

if TYPE_CHECKING:
    from eventsched.core.store.pool import Database

#: ``schedules next`` prints at most this many occurrences.
MAX_NEXT: Final = 10_000


class UnknownSchedule(EventschedError):
    """No schedule with this name; the CLI exits 1."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no schedule named {name!r}")


class ScheduleExists(EventschedError):
    """A schedule with this name exists already; the CLI exits 1."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"a schedule named {name!r} exists already (delete it first)")


class SettingsSchedule(EventschedError):
    """A schedule from settings cannot be deleted here (the next executor start would bring
    it back); the CLI exits 1."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"schedule {name!r} comes from settings: remove [schedules.{name}] from the"
            " settings file (the next executor start deletes it), or pause it"
        )


@dataclass(frozen=True, slots=True)
class Deleted:
    row: ScheduleRow
    #: Idempotency keys of the materialised occurrences a cancel was sent for.
    cancelled: list[str]


def parse_spec(name: str, options: dict[str, Any]) -> ScheduleSpec:
    """The spec of ``schedules add`` (``--payload`` is JSON text); InputError naming the
    option of the first bad key."""
    fields = {k: v for k, v in options.items() if v is not None}
    if "payload" in fields:
        try:
            fields["payload"] = json.loads(fields["payload"])
        except ValueError as err:
            raise InputError("--payload", f"not JSON: {err}") from None
    try:
        return spec_from_fields(name, fields)
    except ValueError as err:
        key, _, problem = str(err).partition(": ")
        option = "NAME" if key == "name" else f"--{key.split(', ')[0].replace('_', '-')}"
        raise InputError(option, problem or str(err)) from None


# -- reads ---------------------------------------------------------------------------------


def list_schedules(settings: Settings) -> list[ScheduleRow]:
    return read(settings, store.list_schedules)


def show_schedule(settings: Settings, name: str) -> ScheduleRow:
    row = read(settings, lambda db: store.get(db, name))
    if row is None:
        raise UnknownSchedule(name)
    return row


def next_times(
    settings: Settings, name: str, *, count: int, after: datetime | None = None
) -> tuple[ScheduleRow, list[str]]:
    """The next ``count`` occurrences after ``after`` (default now) as RFC 3339 with the
    UTC offset in force in the schedule's time zone."""
    if not 0 <= count <= MAX_NEXT:
        raise InputError("--count", f"must be between 0 and {MAX_NEXT}")
    row = show_schedule(settings, name)
    times = next_occurrences(row.spec, after or datetime.now(UTC), count)
    return row, [format_local(at, row.spec.timezone) for at in times]


# -- writes --------------------------------------------------------------------------------


def add_schedule(settings: Settings, spec: ScheduleSpec) -> ScheduleRow:
    row = read(settings, lambda db: store.insert(db, spec, source="api"))
    if row is None:
        raise ScheduleExists(spec.name)
    return row


def set_paused(settings: Settings, name: str, paused: bool) -> ScheduleRow:
    row = read(settings, lambda db: store.set_paused(db, name, paused))
    if row is None:
        raise UnknownSchedule(name)
    return row


def delete_schedule(settings: Settings, name: str) -> Deleted:
    """Delete the schedule, then cancel its materialised future occurrences."""

    async def fn(db: Database) -> ScheduleRow | None:
        row = await store.get(db, name)
        if row is not None and row.source == "settings":
            raise SettingsSchedule(name)
        return await store.delete(db, name)

    row = read(settings, fn)
    if row is None:
        raise UnknownSchedule(name)
    now = datetime.now(UTC)
    keys = [
        occurrence_key(name, at)
        for at in materialised_after(row.spec, row.materialised_through, now)
    ]
    if keys:
        from eventsched.client import Client

        with quiet("eventsched.client"):
            client = Client.from_settings(
                settings, requested_by=requested_by(), timeout=COMMAND_TIMEOUT
            )
            try:
                for key in keys:
                    client.cancel(key)
            finally:
                client.close()
    return Deleted(row, keys)
