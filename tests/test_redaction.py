"""Secrets never reach logs, /readyz bodies or error messages."""

from __future__ import annotations

import pytest
import trio
from structlog.testing import capture_logs

from eventsched.core.errors import DependencyError
from eventsched.core.http import Health
from eventsched.core.postgres import Database

SECRET = "s3cr3t-pw"


async def test_readyz_body_and_logs_redact_a_dsn_in_a_dependency_error() -> None:
    health = Health(check_timeout=1)

    async def failing() -> None:
        raise DependencyError("postgres", f"cannot connect to postgresql://app:{SECRET}@db:5432/x")

    health.add_check("postgres", failing)
    with capture_logs() as logs:
        await health.run_checks()
    ready, body = health.readiness()
    assert not ready
    assert SECRET not in str(body)
    assert "postgresql://app:***@db:5432/x" in body["dependencies"]["postgres"]
    assert logs and all(SECRET not in str(entry) for entry in logs)


async def test_a_real_connection_failure_message_carries_no_password() -> None:
    import trio_asyncio

    # Nothing listens on port 9 (discard): the pool fails to connect and times out.
    dsn = f"postgresql://app:{SECRET}@127.0.0.1:9/x"
    async with trio_asyncio.open_loop():
        db = await Database.open(dsn, connect_timeout=1)
        try:
            with pytest.raises(DependencyError) as info:
                await db.ping()
        finally:
            with trio.move_on_after(5):
                await db.close()
    assert SECRET not in str(info.value)
