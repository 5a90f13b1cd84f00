"""JSON parsing for the decoder: a fast path with an exact fallback, and the payload walk.

Pure functions; any side. :func:`parse_json` parses a message value (or a Go base64
payload); :func:`scan_payload` checks a payload's depth and contents where
:func:`needs_scan` cannot prove them clean from the raw bytes. Errors are DecodeError with
the reasons of :data:`~eventsched.core.domain.decode.DECODE_REASONS`.

Duplicate keys: msgspec keeps the last of two equal keys. The fast path re-encodes the
decoded value and compares it with the input; equal bytes prove there was no duplicate
anywhere (the re-encoding has unique keys). Our own producer's output (compact msgspec JSON,
:func:`~eventsched.core.domain.wire.encode_event`) always takes this path, and so does Go's
encoding/json output unless it escapes ``<>&``. Any other input (whitespace as in
``json.dumps`` defaults, ``\\u00e9`` escapes, ``1e5`` number spellings, ...) goes through
the stdlib parser with an ``object_pairs_hook`` that sees every key: exact, but about 4x
slower. Duplicates with identical values are accepted.

The stdlib fallback turns NaN/Infinity and integers beyond Python's int-string conversion
limit (4300 digits) into a marker that the payload walk reports as ``invalid_payload``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any, Final

import msgspec

from eventsched.core.domain.event import short, utf8_ok
from eventsched.core.runtime.errors import DecodeError

__all__ = ["needs_scan", "parse_json", "scan_payload"]

# The same default settings as the producer's encoder (core.domain.wire), so that our own
# output is recognised as canonical.
_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder()


class _BadNumber:
    """Stands in for NaN/Infinity/out-of-range numbers the stdlib fallback parser met."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text if len(text) <= 24 else text[:21] + "..."

    def __repr__(self) -> str:
        return self.text


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _parse_float(text: str) -> float | _BadNumber:
    number = float(text)
    return number if math.isfinite(number) else _BadNumber(text)


def _parse_int(text: str) -> int | _BadNumber:
    try:
        return int(text)
    except ValueError:  # beyond sys.get_int_max_str_digits()
        return _BadNumber(text)


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen and not _same(seen[key], value):
                raise _DuplicateKey(key)
            seen[key] = value
    return obj


def _same(a: Any, b: Any) -> bool:
    # Stricter than ==, for which 1 == 1.0 == True.
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is _BadNumber:
        return bool(a.text == b.text)
    return bool(a == b)


def parse_json(data: bytes) -> tuple[Any, bool]:
    """Parse JSON; the flag says the fast path proved the input canonical (see the module
    docstring)."""
    try:
        obj = _DECODER.decode(data)
    except RecursionError:
        raise DecodeError("too_deep", "JSON nesting exceeds the parser's recursion limit") from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        # Let the fallback find the precise reason (UTF-8, NaN, huge number, syntax).
        return _parse_json_slow(data), False
    try:
        canonical = _ENCODER.encode(obj) == data
    except Exception:  # e.g. RecursionError; the fallback decides
        canonical = False
    return (obj, True) if canonical else (_parse_json_slow(data), False)


def _parse_json_slow(data: bytes) -> Any:
    try:
        # Strict UTF-8 ourselves: json.loads(bytes) would guess UTF-16/32 and pass surrogates.
        text = data.decode()
    except UnicodeDecodeError as err:
        raise DecodeError(
            "invalid_utf8", f"invalid UTF-8 byte 0x{data[err.start]:02x} at offset {err.start}"
        ) from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_pairs_hook,
            parse_constant=_BadNumber,
            parse_float=_parse_float,
            parse_int=_parse_int,
        )
    except _DuplicateKey as err:
        raise DecodeError(
            "duplicate_key", f"key {short(err.key)} appears twice with different values"
        ) from None
    except RecursionError:
        raise DecodeError("too_deep", "JSON nesting exceeds the parser's recursion limit") from None
    except json.JSONDecodeError as err:
        raise DecodeError("invalid_json", f"{err.msg} (offset {err.pos})") from None


def needs_scan(data: bytes, canonical: bool, max_brackets: int) -> bool:
    """Whether the payload must be walked; False only when the raw bytes prove it clean.

    Canonical msgspec output has no NaN, no huge numbers and no lone surrogates, writes NUL
    as ``\\u0000``, and cannot nest deeper than its number of brackets.
    """
    return (
        not canonical
        # One pass that drops the brackets beats two count() calls (measured).
        or len(data) - len(data.translate(None, b"{[")) > max_brackets
        or data.find(b"\\u0000") >= 0  # find() is faster than `in` here (measured)
    )


def scan_payload(payload: dict[str, Any], max_depth: int, name: str) -> None:
    """Walk the payload: depth, NUL and lone surrogates in keys and strings, bad numbers."""
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise DecodeError("too_deep", f"{name} is nested deeper than {max_depth} levels")
        values: Iterable[Any]
        if type(node) is dict:
            for key in node:
                _payload_text(key, name)
            values = node.values()
        else:
            values = node
        for value in values:
            kind = type(value)
            if kind is str:
                _payload_text(value, name)
            elif kind is dict or kind is list:
                stack.append((value, depth + 1))
            elif kind is _BadNumber:
                raise DecodeError(
                    "invalid_payload",
                    f"{name} has NaN/Infinity or an out-of-range number {value!r}",
                )


def _payload_text(text: str, name: str) -> None:
    if "\x00" in text:
        raise DecodeError("invalid_payload", f"{name} has a \\u0000 character (jsonb rejects it)")
    if not utf8_ok(text):
        raise DecodeError("invalid_payload", f"{name} has a lone surrogate (not valid UTF-8)")
