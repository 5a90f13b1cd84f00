"""Bulk selection of finished events for ``eventsched events retry --status``.

A read-only statement pair on the shared pool (:class:`~eventsched.core.store.pool.Database`):
how many events match a filter and the first of them in the order they finished. Trio
coroutines (the pool runs them on the asyncio side through trio-asyncio); a connection
failure is :class:`~eventsched.core.runtime.errors.DependencyError`.

Dead events are served by the partial index on ``finished_at WHERE status = 'dead'``
(``sql/000001_init.up.sql``); other statuses scan ``events``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from eventsched.core.store.pool import Database
from eventsched.core.store.queries import EventKey, filters

__all__ = ["Selection", "finished_events"]


@dataclass(frozen=True, slots=True)
class Selection:
    """``matched`` events fit the filter; ``events`` are the first ``limit`` of them."""

    matched: int
    events: tuple[EventKey, ...]


async def finished_events(
    db: Database,
    *,
    status: str,
    type_: str | None = None,
    finished_since: datetime | None = None,
    limit: int | None = None,
) -> Selection:
    """Events in ``status`` (of ``type_``, finished at or after ``finished_since``): their
    count and the first ``limit`` (all with None) by ``(finished_at, id)``, from one
    snapshot."""
    where, params = filters(
        ("status = %s", status), ("type = %s", type_), ("finished_at >= %s", finished_since)
    )
    condition = " AND ".join(where)
    count_sql = f"SELECT count(*) FROM events WHERE {condition}"
    select_sql = (
        f"SELECT id, idempotency_key, status, execute_at FROM events WHERE {condition}"
        " ORDER BY finished_at, id" + ("" if limit is None else " LIMIT %s")
    )
    select_params = params if limit is None else [*params, limit]

    async def fn(conn: AsyncConnection[Any]) -> Selection:
        async with conn.transaction():  # the count and the rows from one snapshot
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur = await conn.execute(count_sql, params)
            row = await cur.fetchone()
            cur = await conn.execute(select_sql, select_params)
            rows = await cur.fetchall()
        return Selection(
            matched=0 if row is None else int(row[0]),
            events=tuple(EventKey(*r) for r in rows),
        )

    return await db.run(fn)
