"""eventsched: a deferred-event scheduler (Kafka in, PostgreSQL log, SAQ on Redis out)."""

import sys

# trio-asyncio must patch asyncio before any asyncio library (psycopg, anyio/httpx, redis,
# saq) binds `from asyncio import get_running_loop`: a module holding the unpatched C
# function fails with "no running event loop" inside trio-asyncio (seen with psycopg's
# waiting module: every pooled connect failed). Importing trio_asyncio here, first, covers
# every process that imports eventsched before those libraries; _rebind_get_running_loop
# repairs modules imported earlier (a test runner, a user's script), whatever the order.
import trio_asyncio  # noqa: F401  # isort: skip
import asyncio  # isort: skip
import _asyncio  # isort: skip


def _rebind_get_running_loop() -> None:
    unpatched = _asyncio.get_running_loop
    for module in list(sys.modules.values()):
        if getattr(module, "get_running_loop", None) is unpatched and module is not _asyncio:
            setattr(module, "get_running_loop", asyncio.get_running_loop)  # noqa: B010 - any module


_rebind_get_running_loop()

# trio-asyncio runs one asyncio callback per trio scheduler pass; run them in batches.
from eventsched.core import aioloop  # noqa: E402  # isort: skip

aioloop.install()

from importlib.metadata import PackageNotFoundError, version  # noqa: E402  # isort: skip

try:
    __version__ = version("eventsched")  # written once, in pyproject.toml
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
