"""Role plugins used by the runtime tests: real plugins, tiny behaviour."""

from __future__ import annotations

import os
from typing import ClassVar

import trio
import trio.lowlevel

from eventsched.core.runtime.contracts import RoleContext


class DrainingRole:
    """Ready at once; on stop, 'drains' for $TEST_DRAIN_SECONDS then writes $TEST_MARKER."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.ctx.stopping.wait()
        await trio.sleep(float(os.environ.get("TEST_DRAIN_SECONDS", "0")))
        marker = os.environ.get("TEST_MARKER")
        if marker:
            await trio.Path(marker).write_text(f"drained {self.ctx.role}\n")


class PostgresRole:
    """Needs PostgreSQL; ready once a query answers, then waits for stop."""

    needs: ClassVar[frozenset[str]] = frozenset({"postgres"})

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.ctx.resources.require_db().ping()
        task_status.started()
        await self.ctx.stopping.wait()


class NotARole:
    needs: ClassVar[frozenset[str]] = frozenset()


class BadNeeds:
    needs: ClassVar[frozenset[str]] = frozenset({"mongodb"})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()


async def good_handler(event: object) -> None:
    return None


def sync_handler(event: object) -> None:
    return None


async def two_arg_handler(event: object, other: object) -> None:
    return None


class FailingRole:
    """Raises during start-up: the runtime must report it and exit non-zero."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise RuntimeError("role broke on purpose")


class BusyRole:
    """Burns CPU until stopped (something for a CPU profiler to see)."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while not self.ctx.stopping.is_set():
            sum(range(20_000))
            await trio.lowlevel.checkpoint()


class RedisRole:
    """Needs Redis; ready once it answers, then waits for stop."""

    needs: ClassVar[frozenset[str]] = frozenset({"redis"})

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.ctx.resources.require_queue().ping()
        task_status.started()
        await self.ctx.stopping.wait()
