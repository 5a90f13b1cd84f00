"""The HTTP API's opaque list cursor (rows become JSON in :mod:`eventsched.core.store.rowjson`).

Pure functions, no I/O. A list cursor is the
keyset position ``(execute_at, id)`` of a page's last row, as URL-safe base64 of a small
JSON array; clients pass it back unchanged and must not build one.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime

import msgspec

_CURSOR = msgspec.json.Encoder()


def encode_cursor(execute_at: datetime, event_id: uuid.UUID) -> str:
    """The cursor that continues after the row ``(execute_at, event_id)``."""
    raw = _CURSOR.encode([execute_at.isoformat(), str(event_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The keyset position of a cursor; ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, ident = msgspec.json.decode(raw, type=tuple[datetime, uuid.UUID])
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise ValueError("not a cursor of this API") from None
    if when.tzinfo is None:
        raise ValueError("not a cursor of this API")
    return when, ident
