"""For tests that write event rows directly instead of through the consumer.

Since sql/000008 the log is partitioned by ``retain_from`` and an event's idempotency key,
id and partition are in ``event_keys`` (docs/retention.md); the consumer's insert writes
both rows, and every lookup by id or key goes through the key table. A test that inserts
into ``events`` itself runs :data:`REGISTER_KEYS` afterwards; one that inserts an attempt
gives it its event's partition key with :data:`EVENT_RETAIN_FROM` (one ``%s``: the event id).
"""

from __future__ import annotations

from typing import Final

REGISTER_KEYS: Final = (
    "INSERT INTO event_keys (idempotency_key, id, retain_from)"
    " SELECT idempotency_key, id, retain_from FROM events ON CONFLICT DO NOTHING"
)
EVENT_RETAIN_FROM: Final = "(SELECT retain_from FROM events WHERE id = %s)"
