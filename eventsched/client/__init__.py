"""The Python client: schedule events and send commands (cancel, reschedule, retry) to the
``events`` topic from application code.

Owns :class:`Client` (blocking, thread-safe; from trio through ``trio.to_thread``),
:class:`AsyncClient` (asyncio) and their errors, all public through :mod:`eventsched`.
It may import ``eventsched.core.domain`` (the codec and the command wire format, which also
check every message before it is sent), ``eventsched.core.kafka.clientconfig`` (the one
librdkafka configuration builder) and ``eventsched.core.runtime`` (errors, settings), plus
``confluent_kafka``; never trio-asyncio, SAQ, redis or psycopg, so an application that only
sends events does not load them (tests/unit/test_import.py checks it). Importing this
package loads neither confluent_kafka nor asyncio: the trio-asyncio bootstrap of the entry
points must patch asyncio before anything imports it.

* :mod:`~eventsched.client.messages`: build and check the messages (pure);
* :mod:`~eventsched.client.sender`: the idempotent producer, its poller thread, one future
  per message;
* :mod:`~eventsched.client.blocking`: :class:`Client` and the shared configuration;
* :mod:`~eventsched.client.aio`: :class:`AsyncClient`;
* :mod:`~eventsched.client.errors`: :class:`ClientError`, :class:`DeliveryError`;
* :mod:`~eventsched.client.schedules`: :class:`ScheduleClient` and
  :class:`AsyncScheduleClient`, recurring schedules through the HTTP API (``httpx``).
"""

from eventsched.client.aio import AsyncClient
from eventsched.client.blocking import DEFAULT_TIMEOUT, Client
from eventsched.client.errors import ClientError, DeliveryError
from eventsched.client.messages import ScheduleItem
from eventsched.client.schedules import AsyncScheduleClient, ScheduleApiError, ScheduleClient

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncScheduleClient",
    "Client",
    "ClientError",
    "DeliveryError",
    "ScheduleApiError",
    "ScheduleClient",
    "ScheduleItem",
]
