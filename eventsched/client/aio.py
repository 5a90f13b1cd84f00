"""The asyncio client: :class:`AsyncClient`, the methods of :class:`~eventsched.Client` as
coroutines that never block the event loop.

Asyncio side: a message is handed to librdkafka on the loop (``produce`` does not block;
a full local queue is waited out with ``asyncio.sleep``) and its acknowledgement is awaited
through :func:`asyncio.wrap_future` on the future the poller thread completes
(:mod:`eventsched.client.sender`). The checks of a batch (:meth:`AsyncClient.schedule_many`)
and closing (a flush) run in the loop's default executor.

``asyncio`` is imported inside the methods: importing :mod:`eventsched` must not load it,
since the entry points' trio-asyncio bootstrap (:mod:`eventsched.core.runtime.bootstrap`)
has to patch it before anything else imports it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Self

from eventsched.client.blocking import ClientBase
from eventsched.client.messages import (
    Delay,
    Outgoing,
    ScheduleItem,
    Target,
    command_message,
    due_time,
    event_message,
    event_messages,
)
from eventsched.client.sender import GRACE, QUEUE_FULL, Delivery, failed_delivery
from eventsched.core.domain.event import Event

__all__ = ["AsyncClient"]

_FULL_QUEUE_PAUSE: Final = 0.005


class AsyncClient(ClientBase):
    """:class:`~eventsched.Client` for asyncio applications: the same constructor,
    ``from_settings`` and ``from_env``, the same methods as coroutines, and
    ``async with`` (or ``await client.close()``).

    A coroutine cancelled while it waits for the acknowledgement does not take the message
    back: it may still be delivered.
    """

    async def schedule(
        self,
        type: str,
        payload: dict[str, Any],
        *,
        at: datetime | None = None,
        delay: Delay | None = None,
        key: str | None = None,
    ) -> uuid.UUID:
        """See :meth:`eventsched.Client.schedule`."""
        message = event_message(type, payload, at=at, delay=delay, key=key, limits=self.limits)
        await self._send([message])
        return message.id

    async def schedule_many(self, items: Iterable[ScheduleItem | Event]) -> list[uuid.UUID]:
        """See :meth:`eventsched.Client.schedule_many`; the items are checked in a thread."""
        import asyncio

        items = list(items)
        messages = await asyncio.to_thread(event_messages, items, self.limits)
        if messages:
            await self._send(messages)
        return [m.id for m in messages]

    async def cancel(self, key_or_id: Target) -> uuid.UUID:
        """See :meth:`eventsched.Client.cancel`."""
        return await self._command("cancel", key_or_id, None)

    async def reschedule(
        self, key_or_id: Target, *, at: datetime | None = None, delay: Delay | None = None
    ) -> uuid.UUID:
        """See :meth:`eventsched.Client.reschedule`."""
        due = due_time(datetime.now(UTC), at, delay)
        if due is None:
            raise ValueError("reschedule needs at or delay")
        return await self._command("reschedule", key_or_id, due)

    async def retry(self, key_or_id: Target, *, at: datetime | None = None) -> uuid.UUID:
        """See :meth:`eventsched.Client.retry`."""
        return await self._command("retry", key_or_id, due_time(datetime.now(UTC), at, None))

    async def close(self) -> None:
        """Wait up to the client's timeout for messages in flight (in a thread), then stop.
        A closed client raises ClientError; closing twice does nothing."""
        import asyncio

        await asyncio.to_thread(self._sender.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _command(self, op: Any, target: Target, execute_at: datetime | None) -> uuid.UUID:
        message = command_message(
            op, target, execute_at=execute_at, requested_by=self.requested_by, limits=self.limits
        )
        await self._send([message])
        return message.id

    async def _send(self, messages: Sequence[Outgoing]) -> None:
        import asyncio

        deadline = time.monotonic() + self.timeout
        deliveries: list[Delivery] = []
        for message in messages:
            while True:
                try:
                    deliveries.append(self._sender.submit(message))
                    break
                except BufferError:
                    if time.monotonic() >= deadline:
                        deliveries.append(failed_delivery(QUEUE_FULL))
                        break
                    await asyncio.sleep(_FULL_QUEUE_PAUSE)
        waiting = [asyncio.wrap_future(d) for d in deliveries]
        try:
            _, pending = await asyncio.wait(
                waiting, timeout=max(0.0, deadline + GRACE - time.monotonic())
            )
        except BaseException:
            for future in waiting:
                future.cancel()
            raise
        for future in pending:
            future.cancel()  # cancels the delivery too: its late report is dropped
        self._sender.outcome(messages, deliveries)
