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
server library is imported (the client loads confluent-kafka when one is made).
"""

from importlib.metadata import PackageNotFoundError, version

from eventsched.client import (
    AsyncClient,
    AsyncScheduleClient,
    Client,
    ClientError,
    DeliveryError,
    ScheduleApiError,
    ScheduleClient,
)
from eventsched.core.domain.event import Event
from eventsched.core.domain.handler import (
    Handler,
    HandlerContext,
    HandlerEvent,
    PermanentError,
    handler_factory,
)
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event

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
