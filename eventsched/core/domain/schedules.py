"""Recurring schedules: their specification and their occurrences. Pure; any side.

A :class:`ScheduleSpec` is a validated schedule (every field error is a ``ValueError`` whose
message starts with the field's name). Its occurrences are instants, always aware UTC
datetimes with whole milliseconds:

- :func:`next_occurrences`: the calendar of a schedule after an instant (``schedules next``);
- :func:`due_occurrences`: what a leader materialises now, with the misfire policy applied
  to occurrences that were never materialised;
- :func:`occurrence_key`: the idempotency key of an occurrence's event,
  ``<schedule name>@<occurrence time, UTC RFC 3339 with milliseconds and Z>``.

``cron`` expressions are parsed and matched by cronsim (the choice and the comparison with
croniter: docs/design-notes.md, "Cron library"): 5 fields (minute hour day-of-month month
day-of-week) or 6 with the seconds FIRST (second minute hour day-of-month month
day-of-week). cronsim walks the naive wall clock of the schedule's time zone; this module
maps each wall-clock time to an instant by the DST rules, the same for every expression:

- a wall-clock time that occurs twice (fall back) runs once, at its first occurrence (so
  ``0 * * * *`` skips the repeated hour's second 02:00 too: no wall-clock time runs twice);
- a wall-clock time that does not exist (spring forward) runs once, at the first instant
  after the gap (02:30 on Berlin's spring-forward day runs at 03:00 local); several times in
  one gap, or a gap time and the end of the gap, are one occurrence.

``every`` is elapsed time, unaffected by DST and by the time zone: occurrences are
``anchor + k * every`` with the anchor at ``start``, or at the Unix epoch
(1970-01-01T00:00:00Z) when there is no ``start``. ``start`` is inclusive, ``end`` too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, Final, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

from eventsched.core.domain.event import MAX_KEY_LENGTH, check_key, check_type, format_time
from eventsched.core.runtime.errors import DecodeError

__all__ = [
    "DEFAULT_MISFIRE_LIMIT",
    "MAX_NAME_LENGTH",
    "MISFIRE_POLICIES",
    "Misfire",
    "ScheduleSpec",
    "due_occurrences",
    "next_occurrences",
    "occurrence_key",
]

Misfire = Literal["run_once", "run_all", "skip"]
MISFIRE_POLICIES: Final[tuple[str, ...]] = get_args(Misfire)
DEFAULT_MISFIRE_LIMIT: Final = 100
#: ``@`` and an occurrence time (``2024-05-01T10:00:00.000Z``, 24 characters) follow the
#: name in an occurrence key, which must stay within the idempotency key limit.
MAX_NAME_LENGTH: Final = MAX_KEY_LENGTH - 1 - len("2024-05-01T10:00:00.000Z")
# Names appear in keys, URLs and command lines: no spaces, slashes or "@".
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
_US: Final = timedelta(microseconds=1)
_SECOND: Final = timedelta(seconds=1)
_CRON_FIELDS: Final = (
    "5 fields (minute hour day-of-month month day-of-week) "
    "or 6 with the seconds first (second minute hour day-of-month month day-of-week)"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleSpec:
    """A recurring schedule, validated on construction (``ValueError`` naming the field).

    Exactly one of ``cron`` and ``every``. ``start`` and ``end`` are stored in UTC,
    truncated to milliseconds like every event time. ``misfire`` decides what happens to
    occurrences that passed without being materialised (see :func:`due_occurrences`);
    ``misfire_limit`` bounds how many of them ``run_all`` catches up.
    """

    name: str
    type: str
    cron: str | None = None
    every: timedelta | None = None
    timezone: str = "UTC"
    payload: dict[str, Any] = field(default_factory=dict)
    start: datetime | None = None
    end: datetime | None = None
    misfire: Misfire = "run_once"
    misfire_limit: int = DEFAULT_MISFIRE_LIMIT
    paused: bool = False

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not isinstance(self.type, str):
            raise ValueError(f"type: {self.type!r} is not a string")
        try:
            check_type(self.type, "type")
        except DecodeError as err:
            raise ValueError(err.detail) from None
        if (self.cron is None) == (self.every is None):
            raise ValueError("cron, every: exactly one of them is required")
        if self.cron is not None:
            _check_cron(self.cron)
        if self.every is not None:
            _check_every(self.every)
        _check_timezone(self.timezone)
        _check_payload(self.payload)
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _bound(value, name))
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError(
                f"end: {format_time(self.end)} is before start {format_time(self.start)}"
            )
        if self.misfire not in MISFIRE_POLICIES:
            raise ValueError(
                f"misfire: {self.misfire!r} is not one of {', '.join(MISFIRE_POLICIES)}"
            )
        limit = self.misfire_limit
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"misfire_limit: {limit!r} is not a positive integer")
        if not isinstance(self.paused, bool):
            raise ValueError(f"paused: {self.paused!r} is not a boolean")

    @property
    def zone(self) -> ZoneInfo:
        """The time zone (``ZoneInfo`` caches one object per name)."""
        return ZoneInfo(self.timezone)


# --- validation ---------------------------------------------------------------------------


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError("name: empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"name: {len(name)} characters, limit {MAX_NAME_LENGTH}")
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"name: {name[:40]!r} must start with a letter or digit and contain only "
            "letters, digits, '.', '_', ':' and '-'"
        )


def _check_cron(expr: object) -> None:
    if not isinstance(expr, str):
        raise ValueError(f"cron: {expr!r} is not a string")
    fields = len(expr.split())
    if fields not in (5, 6):
        raise ValueError(f"cron: {expr!r} has {fields} fields, expected {_CRON_FIELDS}")
    try:
        it = CronSim(expr, datetime(2000, 1, 1))
    except (CronSimError, ValueError) as err:  # CronSimError: "Bad minute" and the like
        raise ValueError(f"cron: {expr!r}: {err or 'invalid'}") from None
    try:
        next(it)
    except StopIteration:  # cronsim gives up after 50 years without a match
        raise ValueError(f"cron: {expr!r} never matches") from None


def _check_every(every: object) -> None:
    if not isinstance(every, timedelta):
        raise ValueError(f"every: {every!r} is not a duration")
    if every <= timedelta(0):
        raise ValueError(f"every: {every} is not positive")
    if every % _MS:
        raise ValueError(f"every: {every} is not a whole number of milliseconds")


def _check_timezone(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"timezone: {name!r} is not an IANA time zone name")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone: {name[:60]!r} is not a known IANA time zone") from None


def _check_payload(payload: object) -> None:
    if not isinstance(payload, dict):
        raise ValueError(f"payload: a JSON object is required, not {type(payload).__name__}")
    if not all(isinstance(key, str) for key in payload):
        raise ValueError("payload: every key of a JSON object must be a string")
    try:
        msgspec.json.encode(payload)
    except (TypeError, ValueError, msgspec.EncodeError) as err:
        raise ValueError(f"payload: not JSON: {err}") from None


def _bound(value: object, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise ValueError(f"{name}: {value!r} is not a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: {value.isoformat()} has no UTC offset")
    value = value.astimezone(UTC)
    return value - timedelta(microseconds=value.microsecond % 1000)


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: {value.isoformat()} has no UTC offset")
    return value.astimezone(UTC)


# --- occurrences --------------------------------------------------------------------------


def occurrence_key(name: str, at: datetime) -> str:
    """The idempotency key of the occurrence of schedule ``name`` at ``at``:
    ``nightly@2025-03-30T01:00:00.000Z``. ``ValueError`` past the key limits (a name that
    :class:`ScheduleSpec` accepted always fits)."""
    key = f"{name}@{format_time(at)}"
    try:
        check_key(key, "occurrence key")
    except DecodeError as err:
        raise ValueError(err.detail) from None
    return key


def next_occurrences(spec: ScheduleSpec, after: datetime, count: int) -> list[datetime]:
    """The first ``count`` occurrences strictly after ``after`` (aware), within ``start``
    and ``end``, ascending, as aware UTC datetimes. ``paused`` is not looked at: this is the
    schedule's calendar (:func:`due_occurrences` honours it)."""
    if count < 0:
        raise ValueError(f"count: {count} is negative")
    return list(islice(_ascending(spec, _aware(after, "after")), count))


def due_occurrences(
    spec: ScheduleSpec, last_materialised: datetime | None, now: datetime, lookahead: float
) -> list[datetime]:
    """What a leader must materialise now, ascending: the occurrences missed since
    ``last_materialised`` as the misfire policy says, then every occurrence from ``now`` to
    ``now + lookahead`` seconds (both inclusive) that is after ``last_materialised``.

    Missed occurrences are those after ``last_materialised`` and before ``now``:

    - ``run_all``: all of them, but at most ``misfire_limit``: the NEWEST ones (older ones
      are dropped for good; a later call does not catch them up either, since the caller
      records how far it materialised);
    - ``run_once``: only the latest of them;
    - ``skip``: none.

    ``last_materialised`` is the newest occurrence already materialised, or any later
    instant up to which every occurrence was (the schedule leader passes its watermark,
    :func:`eventsched.core.domain.schedulefields.plan`); ``None`` means none ever was, and
    then nothing counts as missed (a caller that wants a new schedule to catch up since its
    creation passes the creation time). A paused schedule has none.
    """
    now = _aware(now, "now")
    last = None if last_materialised is None else _aware(last_materialised, "last_materialised")
    if not math.isfinite(lookahead) or lookahead < 0:
        raise ValueError(f"lookahead: {lookahead} is not a non-negative number of seconds")
    if spec.paused:
        return []
    missed: list[datetime] = []
    if last is not None and spec.misfire != "skip":
        wanted = 1 if spec.misfire == "run_once" else spec.misfire_limit
        for at in _descending(spec, now):
            if at <= last or len(missed) == wanted:
                break
            missed.append(at)
        missed.reverse()
    horizon = now + timedelta(seconds=lookahead)
    after = now - _US if last is None else max(last, now - _US)
    upcoming: list[datetime] = []
    for at in _ascending(spec, after):
        if at > horizon:
            break
        upcoming.append(at)
    return missed + upcoming


def _ascending(spec: ScheduleSpec, after: datetime) -> Iterator[datetime]:
    """Occurrences strictly after ``after`` (UTC), within the bounds, ascending."""
    if spec.start is not None and spec.start > after:
        after = spec.start - _US  # start is inclusive
    source = _cron_after(spec, after) if spec.every is None else _every_after(spec, after)
    for at in source:
        if spec.end is not None and at > spec.end:
            return
        yield at


def _descending(spec: ScheduleSpec, before: datetime) -> Iterator[datetime]:
    """Occurrences strictly before ``before`` (UTC), within the bounds, newest first."""
    if spec.end is not None and spec.end < before:
        before = spec.end + _US  # end is inclusive
    source = _cron_before(spec, before) if spec.every is None else _every_before(spec, before)
    for at in source:
        if spec.start is not None and at < spec.start:
            return
        yield at


def _anchor(spec: ScheduleSpec) -> datetime:
    return _EPOCH if spec.start is None else spec.start


def _every_after(spec: ScheduleSpec, after: datetime) -> Iterator[datetime]:
    assert spec.every is not None
    step, anchor = spec.every, _anchor(spec)
    k = (after - anchor) // step + 1
    try:
        while True:
            yield anchor + k * step
            k += 1
    except OverflowError:  # past year 9999
        return


def _every_before(spec: ScheduleSpec, before: datetime) -> Iterator[datetime]:
    assert spec.every is not None
    step, anchor = spec.every, _anchor(spec)
    k = -((anchor - before) // step) - 1  # the largest k with anchor + k * step < before
    try:
        while True:
            yield anchor + k * step
            k -= 1
    except OverflowError:  # before year 1
        return


def _cron_after(spec: ScheduleSpec, after: datetime) -> Iterator[datetime]:
    # Wall-clock times before after's own map to instants <= after (the mapping is
    # monotonic), so the walk starts at after's wall clock; times after it may still map
    # to instants <= after (inside a repeated hour), hence the filter.
    assert spec.cron is not None
    zone = spec.zone
    wall = after.astimezone(zone).replace(tzinfo=None)
    previous = after
    for at in _instants(CronSim(spec.cron, wall), zone):
        if at > previous:
            previous = at
            yield at


def _cron_before(spec: ScheduleSpec, before: datetime) -> Iterator[datetime]:
    # Inside the second pass of a repeated hour, wall-clock times later than before's map
    # to the first pass, i.e. before ``before``: the walk starts that much later.
    assert spec.cron is not None
    zone = spec.zone
    local = before.astimezone(zone)
    wall = local.replace(tzinfo=None)
    first_pass = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    slack = max(before - first_pass, timedelta(0))  # the time since the first pass
    start = wall.replace(microsecond=0) + slack + _SECOND
    previous = before
    for at in _instants(CronSim(spec.cron, start, reverse=True), zone):
        if at < previous:
            previous = at
            yield at


def _instants(walls: Iterator[datetime], zone: ZoneInfo) -> Iterator[datetime]:
    """Naive wall-clock times -> UTC instants by the DST rules (cronsim stops by itself
    after 50 years without a match; the end of the calendar stops it too)."""
    try:
        for wall in walls:
            yield _instant(wall, zone)
    except OverflowError:
        return


def _instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant of a naive wall-clock time in ``zone``: its first occurrence if it occurs
    twice, the end of the gap if it does not exist."""
    at = wall.replace(tzinfo=zone).astimezone(UTC)  # fold=0: the first of two
    if at.astimezone(zone).replace(tzinfo=None) == wall:
        return at
    return _gap_end(wall, zone)


def _gap_end(wall: datetime, zone: ZoneInfo) -> datetime:
    """The first instant after the gap that ``wall`` falls into: with the offsets before
    and after the transition, ``wall`` maps to two instants that the transition lies
    between; bisect on whole seconds (transitions are on whole seconds)."""
    a = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    b = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    lo, hi = (a, b) if a < b else (b, a)  # local(lo) < wall, local(hi) > wall
    lo, hi = lo.replace(microsecond=0), hi.replace(microsecond=0)
    while hi - lo > _SECOND:
        mid = lo + (hi - lo) // 2
        mid = mid.replace(microsecond=0)
        if mid.astimezone(zone).replace(tzinfo=None) > wall:
            hi = mid
        else:
            lo = mid
    return hi
