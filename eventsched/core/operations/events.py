"""``eventsched events``: show and list events, send cancel, reschedule and retry commands.

Blocking, on the calling thread. Reads go through :mod:`eventsched.core.store.queries` (and
:mod:`eventsched.core.store.selection` for a bulk retry) on a one-connection pool inside one
``trio.run`` per command (trio side; the pool runs on asyncio through trio-asyncio), under
a time limit. Commands are sent with :class:`eventsched.client.Client` (blocking; each
returns once the broker acknowledged it).

A command names its event by idempotency key: the targets are looked up in PostgreSQL first
(by id or by key), so every command is keyed like its event's schedule and lands behind it
on the same partition. An unknown target stops the command before anything is sent
(:class:`UnknownEvent`). A transition the current status refuses (:func:`refusal`, the same
rules as the HTTP API's 409) is reported and not sent; the consumer decides again against
the status it finds when it applies a command.

Rendering (:mod:`.eventviews`) is separate: this module returns rows and results.
"""

from __future__ import annotations

import getpass
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final, TypeVar

import psycopg
import trio

from eventsched.core.domain.commands import (
    Op,
    encode_command,
    new_command,
    parse_command,
    refusal,
)
from eventsched.core.domain.decode import DecodeLimits
from eventsched.core.domain.event import parse_time
from eventsched.core.operations.oneshot import SECTION_TIMEOUT
from eventsched.core.operations.send import InputError
from eventsched.core.runtime.errors import DecodeError, DependencyError, EventschedError
from eventsched.core.runtime.redaction import redact
from eventsched.core.runtime.settings import Settings, require_postgres
from eventsched.core.runtime.units import parse_duration
from eventsched.core.store.queries import EventKey, EventRow, EventSummary
from eventsched.core.store.selection import Selection

if TYPE_CHECKING:
    from eventsched.core.store.pool import Database

T = TypeVar("T")

#: A bulk retry of more events than this needs ``--yes``.
CONFIRM_ABOVE: Final = 100
#: Seconds a read may take in all (connecting is bounded by SECTION_TIMEOUT).
READ_TIMEOUT: Final = 60.0
#: Seconds the broker has to acknowledge each command.
COMMAND_TIMEOUT: Final = 10.0


class UnknownEvent(EventschedError):
    """No event with this id or key in PostgreSQL; the CLI exits 1."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"no event with {what}")


@dataclass(frozen=True, slots=True)
class CommandResult:
    """One target of a command: sent (``command_id``) or not (``refused`` says why)."""

    op: Op
    event_id: uuid.UUID
    idempotency_key: str
    status: str
    command_id: uuid.UUID | None = None
    refused: str | None = None


# -- option values -------------------------------------------------------------------------


def parse_event_id(text: str) -> uuid.UUID:
    """An ``ID`` argument; InputError unless it is a UUID."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise InputError(
            "ID", f"{text!r} is not an event id (a UUID); give an idempotency key with --key"
        ) from None


def parse_time_option(option: str, text: str | None) -> datetime | None:
    """A TIME option: RFC 3339 with an offset (``2030-01-31T09:00:00Z``)."""
    if text is None:
        return None
    try:
        return parse_time(text)
    except DecodeError:
        raise InputError(
            option, f"{text!r} is not an RFC 3339 time with an offset (2030-01-31T09:00:00Z)"
        ) from None


def due_option(
    settings: Settings,
    op: Op,
    at: str | None,
    in_: str | None,
    *,
    required: bool,
    now: datetime | None = None,
) -> datetime | None:
    """The due time of ``--at TIME`` or ``--in DURATION`` (None: neither, when allowed),
    checked against the consumer's limits (``consumer.horizon``, ``consumer.max_past``)."""
    if at is not None and in_ is not None:
        raise InputError("--at/--in", "give --at TIME or --in DURATION, not both")
    if required and at is None and in_ is None:
        raise InputError("--at/--in", "give exactly one of --at TIME or --in DURATION")
    now = now or datetime.now(UTC)
    due = parse_time_option("--at", at)
    if in_ is not None:
        try:
            due = now + timedelta(seconds=parse_duration(in_))
        except (ValueError, OverflowError) as err:
            raise InputError("--in", str(err)) from None
    if due is None:
        return None
    probe = new_command(op, idempotency_key="-", execute_at=due, now=now)
    try:
        parse_command(
            encode_command(probe), now=now, limits=DecodeLimits.from_settings(settings.consumer)
        )
    except DecodeError as err:
        raise InputError("--at" if at is not None else "--in", err.detail) from None
    return due


def one_target(event_id: str | None, key: str | None) -> tuple[list[str], list[str]]:
    """The ids and keys of a command on one event: exactly one of ``ID`` and ``--key``."""
    if event_id is not None and key is None:
        return [event_id], []
    if event_id is None and key is not None:
        return [], [key]
    raise InputError("ID/--key", "give one event id or --key KEY")


def no_filter(**options: object) -> None:
    """InputError naming the first filter option given without ``--status``."""
    for name, value in options.items():
        if value is not None:
            raise InputError(f"--{name.rstrip('_')}", "only with --status (a retry by filter)")


def no_targets(ids: Sequence[str], keys: Sequence[str]) -> None:
    if ids or keys:
        raise InputError("--status", "retry by ids/keys or by --status, not both")


def check_bulk(count: int, *, yes: bool) -> None:
    """A retry by filter of more than :data:`CONFIRM_ABOVE` events needs ``--yes``."""
    if count > CONFIRM_ABOVE and not yes:
        raise InputError(
            "--yes",
            f"{count} events to retry: more than {CONFIRM_ABOVE} need --yes"
            " (list them with --dry-run, or narrow with --type, --since, --limit)",
        )


# -- reads ---------------------------------------------------------------------------------


def show_event(settings: Settings, *, event_id: str | None, key: str | None) -> EventRow:
    """The event (by id, or by idempotency key) with its newest attempts."""
    from eventsched.core.store import queries

    ids, _ = one_target(event_id, key)
    wanted_id = parse_event_id(ids[0]) if ids else None

    async def fn(db: Database) -> EventRow | None:
        wanted = wanted_id
        if wanted is None:
            assert key is not None
            found = await queries.event_by_key(db, key)
            if found is None:
                return None
            wanted = found.id
        return await queries.event_with_attempts(db, wanted)

    row = read(settings, fn)
    if row is None:
        raise UnknownEvent(f"id {wanted_id}" if key is None else f"key {key!r}")
    return row


def list_events(
    settings: Settings,
    *,
    limit: int,
    status: str | None = None,
    type_: str | None = None,
    due_after: datetime | None = None,
    due_before: datetime | None = None,
) -> list[EventSummary]:
    """At most ``limit`` events in due order; ``due_after`` inclusive, ``due_before`` not."""
    from eventsched.core.store import queries

    return read(
        settings,
        lambda db: queries.list_events(
            db,
            limit=limit,
            status=status,
            type_=type_,
            due_after=due_after,
            due_before=due_before,
        ),
    )


def targets(settings: Settings, ids: Sequence[str], keys: Sequence[str]) -> list[EventKey]:
    """The events named by ``ID`` arguments and ``--key`` options (at least one)."""
    if not ids and not keys:
        raise InputError("ID/--key", "give at least one event id or --key KEY")
    return resolve(settings, [parse_event_id(text) for text in ids], keys)


def resolve(settings: Settings, ids: Sequence[uuid.UUID], keys: Sequence[str]) -> list[EventKey]:
    """The events named by ``ids`` and ``keys``, in that order (repeats dropped);
    :class:`UnknownEvent` names every target PostgreSQL does not know."""
    from eventsched.core.store import queries

    async def fn(db: Database) -> list[EventKey | str]:
        out: list[EventKey | str] = []
        for event_id in ids:
            found = await queries.event_key(db, event_id)
            out.append(found if found is not None else f"id {event_id}")
        for key in keys:
            found = await queries.event_by_key(db, key)
            out.append(found if found is not None else f"key {key!r}")
        return out

    looked_up = read(settings, fn)
    unknown = [item for item in looked_up if isinstance(item, str)]
    if unknown:
        raise UnknownEvent(", ".join(unknown))
    targets: dict[uuid.UUID, EventKey] = {}
    for item in looked_up:
        assert not isinstance(item, str)
        targets.setdefault(item.id, item)
    return list(targets.values())


def select_for_retry(
    settings: Settings,
    *,
    status: str,
    type_: str | None,
    since: datetime | None,
    limit: int | None,
) -> Selection:
    """Events to retry by filter: their count and the first ``limit`` by finish time."""
    from eventsched.core.store import selection

    return read(
        settings,
        lambda db: selection.finished_events(
            db, status=status, type_=type_, finished_since=since, limit=limit
        ),
    )


def read(settings: Settings, fn: Callable[[Database], Awaitable[T]]) -> T:
    """Run ``fn(db)`` on a one-connection pool in one ``trio.run``; DependencyError when
    PostgreSQL cannot be reached or does not answer, EventschedError when it refuses the
    query (a schema without the tables, say)."""
    dsn = require_postgres(settings)
    results: list[T] = []
    errors: list[Exception] = []

    async def main() -> None:
        import trio_asyncio

        from eventsched.core.store.pool import Database

        # Errors are carried out of the loop by hand: raised inside it they would leave
        # trio.run wrapped in exception groups.
        async with trio_asyncio.open_loop():
            db = await Database.open(dsn, min_size=1, max_size=1, connect_timeout=SECTION_TIMEOUT)
            try:
                with trio.fail_after(READ_TIMEOUT):
                    results.append(await fn(db))
            except trio.TooSlowError:
                errors.append(DependencyError("postgres", f"no answer within {READ_TIMEOUT:g}s"))
            except Exception as err:
                errors.append(err)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await db.close()

    with quiet("psycopg.pool"):  # each failed connection attempt: the error says it once
        trio.run(main)
    if errors:
        err = errors[0]
        if isinstance(err, psycopg.Error):
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise EventschedError(f"PostgreSQL refused the query: {redact(text)}") from err
        raise err
    return results[0]


# -- commands ------------------------------------------------------------------------------


@contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Only critical lines from ``logger`` meanwhile: a one-shot command reports a failing
    dependency once, in its error line, not in one log line per retry."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def requested_by() -> str:
    """Who the commands' history names: ``cli:<user>``, or ``cli``."""
    try:
        name = f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no user name in the environment or the password file
        return "cli"
    return name[:200] if name.isprintable() else "cli"


def send_commands(
    settings: Settings,
    op: Op,
    targets: Sequence[EventKey],
    *,
    execute_at: datetime | None = None,
) -> Iterator[CommandResult]:
    """Send ``op`` for every target, one at a time, in order; yields each result once the
    broker acknowledged it (or why it was not sent). A Kafka failure raises
    :class:`~eventsched.client.ClientError` (the commands yielded before were delivered)."""
    # librdkafka's connection errors: the DeliveryError names the last one.
    with quiet("eventsched.client"):
        yield from _send(settings, op, targets, execute_at)


def _send(
    settings: Settings, op: Op, targets: Sequence[EventKey], execute_at: datetime | None
) -> Iterator[CommandResult]:
    from eventsched.client import Client

    client: Client | None = None
    try:
        for target in targets:
            result = CommandResult(op, target.id, target.idempotency_key, target.status)
            reason = refusal(op, target.status)
            if reason is not None:
                yield replace(result, refused=reason)
                continue
            if client is None:
                client = Client.from_settings(
                    settings, requested_by=requested_by(), timeout=COMMAND_TIMEOUT
                )
            key = target.idempotency_key
            if op == "cancel":
                command_id = client.cancel(key)
            elif op == "reschedule":
                command_id = client.reschedule(key, at=execute_at)
            else:
                command_id = client.retry(key, at=execute_at)
            yield replace(result, command_id=command_id)
    finally:
        if client is not None:
            client.close()
