"""The SQL of recurring schedules (migration 000006): definitions and the watermark.

Schedules are configuration: the executor writes the ``[schedules.<name>]`` of its settings
at start (:func:`apply_settings`), the HTTP API and ``eventsched schedules`` add, pause,
resume and delete them, and the schedule leader reads them and advances each one's
watermark (``materialised_through``) once the broker acknowledged the occurrences up to it
(:func:`advance`). Every change increments ``revision``; the leader advances only the
revision it read, so a schedule changed or deleted meanwhile is left to the next pass (or to
the cancel of what the leader published, when it was deleted). Trio side
(:class:`~eventsched.core.store.pool.Database`); rows come back as :class:`ScheduleRow`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from eventsched.core.domain.event import format_time
from eventsched.core.domain.schedulefields import definition_hash, spec_fields
from eventsched.core.domain.schedules import ScheduleSpec
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.store.pool import Database

__all__ = [
    "AppliedSettings",
    "ScheduleRow",
    "advance",
    "apply_settings",
    "delete",
    "get",
    "insert",
    "list_schedules",
    "row_json",
    "set_paused",
]

_COLUMNS: Final = (
    "name, type, cron, every_ms, timezone, payload, start_at, end_at, misfire, misfire_limit,"
    " paused, source, definition_hash, revision, created_at, updated_at, materialised_through"
)
_MS: Final = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    spec: ScheduleSpec
    source: str  # "settings" or "api"
    definition_hash: str
    revision: int
    created_at: datetime
    updated_at: datetime
    #: Every occurrence up to this instant was published and acknowledged (None: none yet).
    materialised_through: datetime | None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True, slots=True)
class AppliedSettings:
    """What :func:`apply_settings` changed (names)."""

    created: list[str]
    updated: list[str]
    #: Settings schedules no longer in the file, deleted (with their watermark, for cancels).
    removed: list[ScheduleRow]


def row_json(row: ScheduleRow) -> dict[str, Any]:
    """A schedule as JSON (the API, ``schedules show --json``): its name, its keys, where it
    came from, its watermark."""
    through = row.materialised_through
    return {
        "name": row.name,
        **spec_fields(row.spec),
        "source": row.source,
        "created_at": format_time(row.created_at),
        "updated_at": format_time(row.updated_at),
        "materialised_through": None if through is None else format_time(through),
    }


def _row(r: tuple[Any, ...]) -> ScheduleRow:
    spec = ScheduleSpec(
        name=r[0],
        type=r[1],
        cron=r[2],
        every=None if r[3] is None else r[3] * _MS,
        timezone=r[4],
        payload=r[5],
        start=r[6],
        end=r[7],
        misfire=r[8],
        misfire_limit=r[9],
        paused=r[10],
    )
    return ScheduleRow(spec, r[11], r[12], r[13], r[14], r[15], r[16])


def _values(spec: ScheduleSpec) -> list[Any]:
    return [
        spec.name,
        spec.type,
        spec.cron,
        None if spec.every is None else spec.every // _MS,
        spec.timezone,
        Jsonb(spec.payload),
        spec.start,
        spec.end,
        spec.misfire,
        spec.misfire_limit,
        spec.paused,
    ]


async def list_schedules(db: Database) -> list[ScheduleRow]:
    """Every schedule, by name (DependencyError while migration 000006 is not applied: the
    schedule leader waits for it like for a server)."""
    try:
        rows = await db.fetchall(f"SELECT {_COLUMNS} FROM schedules ORDER BY name")
    except psycopg.errors.UndefinedTable as err:
        raise _no_table() from err
    return [_row(r) for r in rows]


async def get(db: Database, name: str) -> ScheduleRow | None:
    row = await db.fetchone(f"SELECT {_COLUMNS} FROM schedules WHERE name = %s", [name])
    return None if row is None else _row(row)


async def insert(db: Database, spec: ScheduleSpec, *, source: str = "api") -> ScheduleRow | None:
    """Add a schedule; None when one with this name exists (nothing changed)."""
    row = await db.fetchone(
        "INSERT INTO schedules (name, type, cron, every_ms, timezone, payload, start_at,"
        " end_at, misfire, misfire_limit, paused, source, definition_hash)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        f" ON CONFLICT (name) DO NOTHING RETURNING {_COLUMNS}",
        [*_values(spec), source, definition_hash(spec) if source == "settings" else ""],
    )
    return None if row is None else _row(row)


async def delete(db: Database, name: str) -> ScheduleRow | None:
    """Delete a schedule; the row as it was (its watermark says what was materialised)."""
    row = await db.fetchone(f"DELETE FROM schedules WHERE name = %s RETURNING {_COLUMNS}", [name])
    return None if row is None else _row(row)


async def set_paused(db: Database, name: str, paused: bool) -> ScheduleRow | None:
    """Pause or resume (None: no such schedule). Resuming moves the watermark to now: the
    occurrences that passed while it was paused are skipped, not misfires."""
    row = await db.fetchone(
        "UPDATE schedules SET paused = %s, revision = revision + 1, updated_at = now(),"
        " materialised_through = CASE WHEN paused AND NOT %s"
        "   THEN greatest(materialised_through, now()) ELSE materialised_through END"
        f" WHERE name = %s RETURNING {_COLUMNS}",
        [paused, paused, name],
    )
    return None if row is None else _row(row)


async def advance(db: Database, name: str, revision: int, through: datetime) -> bool:
    """Move the watermark of ``name`` forward to ``through``, if the schedule is still at
    ``revision``; False when it was changed or deleted meanwhile."""
    count = await db.execute(
        "UPDATE schedules SET materialised_through = greatest(materialised_through, %s)"
        " WHERE name = %s AND revision = %s",
        [through, name, revision],
    )
    return count == 1


async def apply_settings(db: Database, specs: Mapping[str, ScheduleSpec]) -> AppliedSettings:
    """Make the settings schedules those of ``specs``, in one transaction.

    A schedule whose definition equals the one last applied from settings is left alone
    (so a pause through the API outlives a restart); a changed one is overwritten (paused
    included, its watermark kept); a new one is inserted, and takes over an API schedule of
    the same name; settings schedules missing from ``specs`` are deleted and returned."""
    names = sorted(specs)

    async def fn(conn: AsyncConnection[Any]) -> AppliedSettings:
        created: list[str] = []
        updated: list[str] = []
        async with conn.transaction():
            for name in names:
                spec = specs[name]
                digest = definition_hash(spec)
                cur = await conn.execute(
                    "INSERT INTO schedules (name, type, cron, every_ms, timezone, payload,"
                    " start_at, end_at, misfire, misfire_limit, paused, source, definition_hash)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'settings', %s)"
                    " ON CONFLICT (name) DO UPDATE SET type = excluded.type,"
                    " cron = excluded.cron, every_ms = excluded.every_ms,"
                    " timezone = excluded.timezone, payload = excluded.payload,"
                    " start_at = excluded.start_at, end_at = excluded.end_at,"
                    " misfire = excluded.misfire, misfire_limit = excluded.misfire_limit,"
                    " paused = excluded.paused, source = 'settings',"
                    " definition_hash = excluded.definition_hash,"
                    " revision = schedules.revision + 1, updated_at = now()"
                    " WHERE schedules.source <> 'settings'"
                    " OR schedules.definition_hash <> excluded.definition_hash"
                    " RETURNING (xmax = 0)",
                    [*_values(spec), digest],
                )
                row = await cur.fetchone()
                if row is not None:
                    (created if row[0] else updated).append(name)
            cur = await conn.execute(
                "DELETE FROM schedules WHERE source = 'settings' AND NOT (name = ANY(%s))"
                f" RETURNING {_COLUMNS}",
                [names],
            )
            removed = [_row(r) for r in await cur.fetchall()]
        return AppliedSettings(created, updated, removed)

    try:
        return await db.run(fn)
    except psycopg.errors.UndefinedTable as err:
        raise _no_table() from err


def _no_table() -> DependencyError:
    return DependencyError("postgres", "table schedules missing: run eventsched migrate up")
