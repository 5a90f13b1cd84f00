"""Retention of the time-partitioned event log: the pure rules. No I/O; any side.

The design (why ``retain_from`` is the partition key, why idempotency keys live in a table
of their own, how an old partition is retired without losing an unfinished event) is in
docs/retention.md. This module holds the decisions that design needs and that can be made
without a database, so they are unit-tested on their own:

- :class:`RetentionPolicy`: ``keep``, ``ahead``, ``interval`` and ``archive_dir``, validated
  (every field error is a ``ValueError`` whose message starts with the field's name, as in
  :mod:`eventsched.core.domain.schedules`, so the settings layer can prefix ``retention.``);
- the partitions: one per UTC day, named ``<table>_pYYYYMMDD``
  (:func:`partition_name`, :func:`parse_partition_name`, :func:`partition_bounds`);
- :func:`plan`: which partitions a maintenance pass creates (today up to ``ahead``) and
  which it retires (those whose whole day is older than ``keep``), given a fixed ``now``;
- :func:`fate`: what retiring a partition does with one event row: ``drop`` it (finished
  more than ``keep`` ago) or ``hop`` it (unfinished, or finished recently: re-inserted into
  today's partition with a new ``retain_from``); a row is never dropped on doubt;
- :func:`idempotency_window`: how long a key is remembered, at least and at most;
- :func:`archive_file_name`: the file a partition is archived to before it is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Final, Literal

from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.sections import RetentionSettings

__all__ = [
    "DAY",
    "FINISHED_STATUSES",
    "IdempotencyWindow",
    "MaintenancePlan",
    "RetentionPolicy",
    "archive_file_name",
    "fate",
    "idempotency_window",
    "parse_partition_name",
    "partition_bounds",
    "partition_name",
    "plan",
    "policy_from_settings",
]

DAY: Final = timedelta(days=1)
"""The span of one partition. Fixed: a 30-day window is ~38 partitions (cheap to plan over,
cheap to prune); hourly ones would be ~900 and slow every statement's planning."""

FINISHED_STATUSES: Final = frozenset({"succeeded", "dead", "cancelled"})
"""Statuses no transition leaves on its own (a command or a dlq replay can re-open a
``dead`` or ``cancelled`` event; retirement re-checks under its lock, see docs/retention.md)."""

# Partition tables are named after the parent table and the UTC day they hold.
_NAME_RE: Final = re.compile(r"^(?P<table>[a-z_]+)_p(?P<day>[0-9]{8})$")
_MAX_KEEP: Final = timedelta(days=3650)
_MAX_AHEAD: Final = timedelta(days=90)

Fate = Literal["drop", "hop"]


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """What the retention duty keeps and prepares (the ``[retention]`` settings)."""

    #: A finished event is kept at least this long after it was recorded and after it
    #: finished; whole days, at least one.
    keep: timedelta = timedelta(days=30)
    #: Partitions exist this far ahead of today (so the consumer never writes into the
    #: default partition while the duty is healthy); at least one day.
    ahead: timedelta = timedelta(days=7)
    #: How often the leader runs a maintenance pass.
    interval: timedelta = timedelta(hours=1)
    #: Where a partition is archived (a gzip-compressed COPY) before it is dropped;
    #: empty: no archive.
    archive_dir: str = ""

    def __post_init__(self) -> None:
        if self.keep < DAY or self.keep > _MAX_KEEP or self.keep % DAY:
            raise ValueError(
                f"keep must be a whole number of days between 1d and {_MAX_KEEP.days}d, "
                f"got {_show(self.keep)}"
            )
        if self.ahead < DAY or self.ahead > _MAX_AHEAD:
            raise ValueError(
                f"ahead must be between 1d and {_MAX_AHEAD.days}d, got {_show(self.ahead)}"
            )
        if self.interval <= timedelta(0) or self.interval > DAY:
            raise ValueError(
                f"interval must be more than 0s and at most 1d, got {_show(self.interval)}"
            )
        if "\x00" in self.archive_dir:
            raise ValueError("archive_dir must not contain a NUL character")
        # A pass must run at least once before the last partition made ahead fills up.
        if self.interval >= self.ahead:
            raise ValueError(
                f"interval ({_show(self.interval)}) must be shorter than ahead "
                f"({_show(self.ahead)}): a pass must come before the partitions run out"
            )


def policy_from_settings(r: RetentionSettings) -> RetentionPolicy:
    """The policy of ``[retention]``; a bad value is a :class:`ConfigError` naming
    ``retention.<field>`` (every message of the policy starts with the field's name)."""
    try:
        return RetentionPolicy(
            keep=timedelta(seconds=float(r.keep)),
            ahead=timedelta(seconds=float(r.ahead)),
            interval=timedelta(seconds=float(r.interval)),
            archive_dir=r.archive_dir,
        )
    except ValueError as err:
        field, _, problem = str(err).partition(" ")
        raise ConfigError(f"retention.{field}", problem) from None


@dataclass(frozen=True, slots=True)
class MaintenancePlan:
    """What one maintenance pass does, in this order: create, then retire."""

    #: Days whose partition is missing, today first (today is also where rows hop to).
    create: tuple[date, ...]
    #: Days whose partition is old enough to retire, oldest first.
    retire: tuple[date, ...]
    #: Rows of a retired partition finished before this instant are dropped.
    cutoff: datetime


@dataclass(frozen=True, slots=True)
class IdempotencyWindow:
    """How long an idempotency key is remembered after its event was recorded (or finished,
    whichever is later)."""

    at_least: timedelta
    at_most: timedelta


def partition_name(table: str, day: date) -> str:
    """``events_p20261203``: the partition of ``table`` holding ``day`` (UTC)."""
    if not re.fullmatch(r"[a-z_]+", table):
        raise ValueError(f"table must be lower-case letters and _, got {table!r}")
    return f"{table}_p{day:%Y%m%d}"


def parse_partition_name(table: str, name: str) -> date | None:
    """The day of a partition of ``table`` named by :func:`partition_name`; ``None`` for any
    other name (the default partition, a table someone else created)."""
    match = _NAME_RE.match(name)
    if match is None or match["table"] != table:
        return None
    try:
        return datetime.strptime(match["day"], "%Y%m%d").date()
    except ValueError:
        return None


def partition_bounds(day: date) -> tuple[datetime, datetime]:
    """``FROM`` (inclusive) and ``TO`` (exclusive) of a day's partition, aware UTC."""
    start = datetime.combine(day, time(), tzinfo=UTC)
    return start, start + DAY


def plan(
    now: datetime, existing: set[date] | frozenset[date], policy: RetentionPolicy
) -> MaintenancePlan:
    """The pass a leader makes at ``now`` over the partitions ``existing`` (their days).

    Creates every missing day from today to ``now + ahead`` (today first: it is where rows
    hop to). Retires a day once its whole range is older than ``keep``, so every row in it
    was recorded more than ``keep`` ago; today is never retired (``keep`` is a day at least).
    Days older than the oldest existing partition are not created: nothing is written there.
    """
    now = _aware(now)
    today = now.date()
    last = (now + policy.ahead).date()
    create = tuple(
        today + timedelta(days=n)
        for n in range((last - today).days + 1)
        if today + timedelta(days=n) not in existing
    )
    cutoff = now - policy.keep
    retire = tuple(
        sorted(day for day in existing if partition_bounds(day)[1] <= cutoff and day < today)
    )
    return MaintenancePlan(create, retire, cutoff)


def fate(status: str, finished_at: datetime | None, cutoff: datetime) -> Fate:
    """What retiring its partition does with one event row.

    ``drop``: the event is finished and finished before ``cutoff`` (``now - keep``): its
    row, its attempts and its idempotency key go. Anything else ``hop``s to today's
    partition: unfinished events (long-future, retrying, stuck running) and events that
    finished within ``keep``. A finished row without ``finished_at`` cannot be proven old,
    so it hops too.
    """
    if status in FINISHED_STATUSES and finished_at is not None and finished_at < _aware(cutoff):
        return "drop"
    return "hop"


def idempotency_window(policy: RetentionPolicy) -> IdempotencyWindow:
    """A key is remembered while its event is kept: at least ``keep`` after the event was
    recorded and after it finished; at most until the pass after its day became old enough
    (``keep`` + the day's span + one ``interval``), or longer while the event hops.

    A message with a key inside the window is a duplicate (absorbed by ``ON CONFLICT DO
    NOTHING``); after the window the same key is a new event.
    """
    return IdempotencyWindow(at_least=policy.keep, at_most=policy.keep + DAY + policy.interval)


def archive_file_name(table: str, day: date) -> str:
    """The archive of a partition: ``events_p20261203.csv.gz`` (COPY CSV with a header)."""
    return f"{partition_name(table, day)}.csv.gz"


def _aware(dt: datetime) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got naive {dt.isoformat()}")
    return dt.astimezone(UTC)


def _show(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds % 86_400 == 0:
        return f"{int(seconds // 86_400)}d"
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    return f"{seconds:g}s"
