"""The HTTP API in tests: its tokens, and the api role served in this process with an httpx
client on trio (tests/integration/test_api.py, test_api_schedules.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx

from eventsched.core.runtime.settings import Settings
from tests.support.ingest import running
from tests.support.proc import free_port

WRITER = "writer-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
TOKENS = [
    {"name": "writer", "token": WRITER},
    {"name": "reader", "token": READER, "read_only": True},
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def api_section(**overrides: Any) -> dict[str, Any]:
    """``[api]`` on a free port with the test tokens."""
    return {"port": free_port(), "tokens": TOKENS, "produce_timeout": "5s", **overrides}


@asynccontextmanager
async def serving(
    settings: Settings, roles: Sequence[str] = ("api",), token: str = WRITER
) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        running(settings, roles),
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{settings.api.port}",
            headers=bearer(token) if token else {},
            timeout=30,
        ) as client,
    ):
        yield client
