"""Units of settings values: durations (``500ms``, ``2s``, ``1m``) and sizes (``64MB``).

Pure parsing, no I/O; :mod:`.settings` converts every ``Duration``/``ByteSize`` field with
these, and the CLI parses ``--in 500ms`` with :func:`parse_duration`.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class Duration(float):
    """Seconds, written in settings as ``500ms``, ``2s``, ``1m``, ``1h``, ``1d`` or a bare number."""


def parse_duration(value: object) -> Duration:
    """Parse a duration setting into seconds; raise ValueError with a readable reason."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 500ms, 2s or 1m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"expected a duration like 500ms, 2s or 1m, got {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return Duration(seconds)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.I)
_UNIT_BYTES = {None: 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


class ByteSize(int):
    """Bytes, written in settings as ``512KB``, ``64MB``, ``1GB`` (multiples of 1024; KiB,
    MiB, GiB are the same) or a bare number of bytes."""


def parse_size(value: object) -> ByteSize:
    """Parse a size setting into bytes; raise ValueError with a readable reason."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 512KB, 64MB or 1GB, got {value!r}")
    if isinstance(value, int | float):
        size = float(value)
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        unit = match.group(2)
        size = float(match.group(1)) * _UNIT_BYTES[unit.lower().replace("i", "") if unit else None]
    else:
        raise ValueError(f"expected a size like 512KB, 64MB or 1GB, got {value!r}")
    if size < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return ByteSize(int(size))
