"""eventsched: a deferred-event scheduler (Kafka in, PostgreSQL log, SAQ on Redis out).

Importing this package has no side effects: the trio-asyncio bootstrap that the runtime
needs (:mod:`eventsched.core.bootstrap`) runs in the process entry points, not here.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("eventsched")  # written once, in pyproject.toml
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
