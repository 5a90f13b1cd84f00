"""eventsched: a deferred-event scheduler (Kafka in, PostgreSQL log, SAQ on Redis out).

What user code is written against:

- the handler contract: :class:`HandlerEvent`, :data:`Handler`, :class:`HandlerContext`,
  :func:`handler_factory`, :class:`PermanentError`;
- the event wire helpers: :class:`Event`, :func:`new_event` (build one),
  :func:`encode_event` (its Kafka value), :func:`kafka_key` and :func:`kafka_headers`;
- the client that sends events and commands: :class:`Client`, :class:`AsyncClient`, their
  errors :class:`ClientError` and :class:`DeliveryError` (:mod:`eventsched.client`);
- recurring schedules through the HTTP API: :class:`ScheduleClient`,
  :class:`AsyncScheduleClient`, :class:`ScheduleApiError`;
- ``__version__``.

Importing this package has no side effects: the trio-asyncio bootstrap that the runtime
needs (:mod:`eventsched.core.runtime.bootstrap`) runs in the process entry points, not here, and no
server library is imported (the client loads confluent-kafka when one is made). The client
classes are imported on first use, so a role's process, which imports this package but
never the client, does not load httpx.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from eventsched.core.domain.event import Event
from eventsched.core.domain.handler import (
    Handler,
    HandlerContext,
    HandlerEvent,
    PermanentError,
    handler_factory,
)
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event

if TYPE_CHECKING:
    from eventsched.client import (
        AsyncClient,
        AsyncScheduleClient,
        Client,
        ClientError,
        DeliveryError,
        ScheduleApiError,
        ScheduleClient,
    )

#: Loaded on first use (:func:`__getattr__`): the client brings httpx (and through it rich
#: and pygments) along, which the roles' processes never use.
_CLIENT_NAMES = frozenset(
    {
        "AsyncClient",
        "AsyncScheduleClient",
        "Client",
        "ClientError",
        "DeliveryError",
        "ScheduleApiError",
        "ScheduleClient",
    }
)


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        import eventsched.client

        return getattr(eventsched.client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_CLIENT_NAMES})


try:
    __version__ = version("eventsched")  # written once, in pyproject.toml
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AsyncClient",
    "AsyncScheduleClient",
    "Client",
    "ClientError",
    "DeliveryError",
    "Event",
    "Handler",
    "HandlerContext",
    "HandlerEvent",
    "PermanentError",
    "ScheduleApiError",
    "ScheduleClient",
    "__version__",
    "encode_event",
    "handler_factory",
    "kafka_headers",
    "kafka_key",
    "new_event",
]
