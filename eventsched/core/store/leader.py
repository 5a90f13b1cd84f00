"""The one-at-a-time leadership of a background duty: a PostgreSQL advisory lock.

The reconciler (and any other duty that must run in exactly one process of a deployment)
holds a session-level ``pg_try_advisory_lock`` on a connection of its own; the lock goes
with the session, so a leader that dies or loses its connection frees it for another
process. Trio side; the connection is psycopg's async one on the trio-asyncio loop.

:func:`lead` is the loop of a duty that runs one pass per interval while it leads (the
schedule leader, the retention duty); the reconciler, with two timers, has its own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import trio
import trio_asyncio

from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.redaction import redact

log = get_logger(__name__)
T = TypeVar("T")


def lock_key(queue_name: str, duty: str = "reconciler") -> int:
    """The advisory lock id of a duty (the reconciler, the schedule leader) of the
    executors serving ``queue_name`` (signed 64 bit)."""
    digest = hashlib.blake2b(f"eventsched:{duty}:{queue_name}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


async def lead(
    lock: LeaderLock,
    duty: Callable[[], Awaitable[object]],
    *,
    interval: float,
    follower_interval: float,
    logger: Any,
    became: tuple[str, str],
) -> None:
    """Campaign for ``lock`` and, while leading, await ``duty()`` every ``interval``
    seconds (a follower tries again every ``follower_interval``), until cancelled; the lock
    is released at the end. ``became`` names the log events (on ``logger``, the duty's own)
    of becoming leader and follower. ``duty`` handles its own errors."""
    try:
        leading = False
        while True:
            was_leading = leading
            leading = await lock.campaign(leading)
            if leading != was_leading:
                logger.info(became[0] if leading else became[1], lock_key=lock.key)
            if leading:
                await duty()
            await trio.sleep(interval if leading else follower_interval)
    finally:
        await lock.release()


class LeaderLock:
    """A session-level ``pg_try_advisory_lock`` on a connection of its own (trio side)."""

    def __init__(
        self, dsn: str, key: int, *, connect_timeout: float = 5.0, name: str = "reconciler"
    ) -> None:
        self._dsn = dsn
        self._name = name
        self.key = key
        self._connect_timeout = connect_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.held = False

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            result: T = await trio_asyncio.aio_as_trio(fn)(*args)
            return result
        except psycopg.Error as err:
            await self._drop()
            raise DependencyError("postgres", redact(str(err)) or type(err).__name__) from err

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> Any:
        conn = self._conn
        assert conn is not None  # connected by acquire()

        async def run() -> Any:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
            return None if row is None else row[0]

        return await self._call(run)

    async def acquire(self) -> bool:
        """Try to become leader (no waiting); True if this session holds the lock."""
        if self._conn is None:
            connect = functools.partial(
                psycopg.AsyncConnection.connect,
                self._dsn,
                autocommit=True,
                connect_timeout=max(1, int(self._connect_timeout)),
                application_name=f"eventsched-{self._name}",
                # A half-open connection would keep the lock (and block a new leader) until
                # the server notices; keepalives bound that to ~25 s.
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
            self._conn = await self._call(connect)
        self.held = bool(await self._query("SELECT pg_try_advisory_lock(%s)", [self.key]))
        return self.held

    async def campaign(self, leading: bool) -> bool:
        """One round of leadership: keep it (still held?) or try to take it. False when
        PostgreSQL cannot answer (logged as ``leader_lock_unavailable`` with the duty)."""
        try:
            if leading:
                return await self.still_held()
            return await self.acquire()
        except DependencyError as err:
            log.warning("leader_lock_unavailable", duty=self._name, error=err.problem)
            return False

    async def still_held(self) -> bool:
        """True while the session (and so the lock) is alive."""
        if not self.held or self._conn is None:
            return False
        try:
            await self._query("SELECT 1")
        except DependencyError:
            return False
        return True

    async def release(self) -> None:
        """Unlock and close (shielded, bounded); errors are logged."""
        with trio.CancelScope(shield=True), trio.move_on_after(3.0):
            if self._conn is not None and self.held:
                try:
                    await self._query("SELECT pg_advisory_unlock(%s)", [self.key])
                except DependencyError as err:
                    log.warning("leader_unlock_failed", duty=self._name, error=err.problem)
            await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self.held = False
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):  # it is gone either way
                await trio_asyncio.aio_as_trio(conn.close)()
