"""PostgreSQL adapter: psycopg's async pool on the root trio-asyncio loop, trio-side methods.

The asyncio side is wrapped once here: every public method is a trio coroutine that calls
``aio_as_trio`` on a private asyncio coroutine function. Connection failures are translated
to :class:`DependencyError` (``dependency="postgres"``) so callers can back off and retry;
errors in a statement itself (constraint, syntax) propagate as psycopg errors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import trio_asyncio
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.redaction import redact

T = TypeVar("T")
Params = Sequence[Any] | dict[str, Any] | None

# Errors that mean "the server or the network is the problem", not the statement.
_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class Database:
    """A pool of async connections; build with :meth:`open` inside ``trio_asyncio.open_loop``."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @classmethod
    async def open(
        cls, dsn: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 5.0
    ) -> Database:
        """Create the pool without waiting for the server (it may come up later)."""

        async def _open() -> AsyncConnectionPool:
            pool = AsyncConnectionPool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                open=False,
                kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout))},
                reconnect_timeout=0,  # never give up reconnecting: PostgreSQL may be restarting
                check=AsyncConnectionPool.check_connection,
            )
            await pool.open(wait=False)
            return pool

        return cls(await trio_asyncio.aio_as_trio(_open)())

    async def close(self) -> None:
        await trio_asyncio.aio_as_trio(self._pool.close)(timeout=5.0)

    async def run(self, fn: Callable[[AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run an asyncio coroutine function with a pooled connection (transactions, COPY)."""

        async def _run() -> T:
            async with self._pool.connection() as conn:
                return await fn(conn)

        try:
            result: T = await trio_asyncio.aio_as_trio(_run)()
            return result
        except _CONNECTION_ERRORS as err:
            raise DependencyError("postgres", redact(str(err)) or type(err).__name__) from err

    async def execute(self, sql: str, params: Params = None) -> int:
        """Run one statement; return the affected row count."""

        async def fn(conn: AsyncConnection[Any]) -> int:
            cur = await conn.execute(sql, params)
            return cur.rowcount

        return await self.run(fn)

    async def fetchall(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        async def fn(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

        return await self.run(fn)

    async def fetchone(self, sql: str, params: Params = None) -> tuple[Any, ...] | None:
        async def fn(conn: AsyncConnection[Any]) -> tuple[Any, ...] | None:
            cur = await conn.execute(sql, params)
            return await cur.fetchone()

        return await self.run(fn)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any] | dict[str, Any]]) -> None:
        """Run a statement for many parameter sets in one pipelined round trip."""

        async def fn(conn: AsyncConnection[Any]) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(sql, rows)

        await self.run(fn)

    async def ping(self) -> None:
        """Raise DependencyError unless a connection answers ``SELECT 1`` now."""
        await self.fetchone("SELECT 1")
