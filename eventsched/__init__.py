"""eventsched: a deferred-event scheduler (Kafka in, PostgreSQL log, SAQ on Redis out)."""

# trio-asyncio must be imported before any asyncio library (psycopg, redis, saq): it patches
# asyncio.get_running_loop, and a module that did `from asyncio import get_running_loop`
# earlier keeps the unpatched function, which fails with "no running event loop" inside
# trio-asyncio (seen with psycopg's waiting module). Importing it here, first, makes the
# order independent of which eventsched module is imported first.
import trio_asyncio  # noqa: F401  # isort: skip

__version__ = "0.1.0"
