"""The clients' errors: :class:`ClientError` and :class:`DeliveryError` (public through
:mod:`eventsched`). Their messages go through
:func:`~eventsched.core.runtime.redaction.redact`, so no secret of a URL or a configuration
reaches a log through them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from eventsched.core.runtime.errors import EventschedError
from eventsched.core.runtime.redaction import redact

__all__ = ["ClientError", "DeliveryError"]

_SHOWN_IDS = 5


class ClientError(EventschedError):
    """The client cannot do what was asked: it is closed, or its Kafka configuration is
    invalid. Input the consumer would refuse raises ValueError instead, before sending."""

    def __init__(self, problem: str) -> None:
        self.problem = redact(problem)
        super().__init__(self.problem)


class DeliveryError(ClientError):
    """The broker did not acknowledge some messages within the client's timeout, or refused
    them. ``failed`` holds their ids (event ids, or command ids), ``acknowledged`` the ids
    of the other messages of the same call, which were delivered.

    A message that was not acknowledged may still arrive later (the broker may have stored
    it and its answer got lost); sending it again under the same idempotency key is
    harmless, since the consumer keeps the first event of a key.
    """

    def __init__(
        self,
        problem: str,
        failed: Sequence[uuid.UUID],
        acknowledged: Sequence[uuid.UUID] = (),
    ) -> None:
        self.failed = tuple(failed)
        self.acknowledged = tuple(acknowledged)
        shown = ", ".join(str(i) for i in self.failed[:_SHOWN_IDS])
        if len(self.failed) > _SHOWN_IDS:
            shown += f" and {len(self.failed) - _SHOWN_IDS} more"
        total = len(self.failed) + len(self.acknowledged)
        super().__init__(
            f"{len(self.failed)} of {total} message(s) not acknowledged by Kafka"
            f" ({shown}): {problem}"
        )
