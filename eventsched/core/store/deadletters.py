"""Dead-letter copies the DLQ topic refused for a message-specific reason, kept in PostgreSQL.

Table ``dlq_undeliverable`` (migration 000003). The consumer writes a row where it would
otherwise have waited for the DLQ's acknowledgement, so a message's offset is committed only
once its copy is in the topic or here. Trio side (the :class:`Database` methods).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import psycopg

from eventsched.core.runtime.errors import DependencyError
from eventsched.core.store.pool import Database

_INSERT_SQL: Final = """
INSERT INTO dlq_undeliverable (source_topic, source_partition, source_offset, reason, error,
                               delivery_error, key, value, header_names, header_values,
                               consumer_id)
VALUES (%s, %s, %s, %s, %s, %s, %b, %b, %s, %b, %s)
ON CONFLICT (source_topic, source_partition, source_offset) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class Undeliverable:
    """One refused copy: where its message came from, why it is bad, why it was refused."""

    source_topic: str
    source_partition: int
    source_offset: int
    reason: str
    error: str
    delivery_error: str
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]]
    consumer_id: str


async def record(db: Database, copies: Sequence[Undeliverable]) -> None:
    """Keep the copies (a copy already kept for the same source offset is left as is).

    Raises DependencyError for any failure: the server being down, and a missing table
    (migrations not applied) alike, so the caller retries with backoff; every value is
    text PostgreSQL accepts (NUL in header names is escaped) or bytea.
    """
    if not copies:
        return
    rows = [
        (
            c.source_topic,
            c.source_partition,
            c.source_offset,
            _text(c.reason),
            _text(c.error),
            _text(c.delivery_error),
            c.key,
            c.value,
            [_text(name) for name, _ in c.headers],
            [value for _, value in c.headers],
            _text(c.consumer_id),
        )
        for c in copies
    ]
    try:
        await db.executemany(_INSERT_SQL, rows)
    except psycopg.Error as err:
        raise DependencyError("postgres", f"cannot keep undeliverable dead letters: {err}") from err


def _text(value: str) -> str:
    return value.replace("\x00", "\\x00")
