"""The bad-input corpus in tests/data/bad_messages, rendered for a given time and limits.

The corpus is data, not code, so that the unit tier runs it through the pure decoder and the
consumer's integration test (and bench/chaos) replays it through Kafka: :func:`load_corpus`
renders it (time placeholders, generated cases) for any ``now`` and limits.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from eventsched.core.domain.decode import DecodeLimits
from eventsched.core.domain.event import format_time

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "bad_messages"
LIMITS = DecodeLimits()

_PLACEHOLDER = re.compile(rb"\$\{(go:)?now(?:([+-])(\d+)([smhd]))?\}")
_UNIT_SECONDS = {b"s": 1, b"m": 60, b"h": 3600, b"d": 86400}
_GO_ZONE = timezone(timedelta(hours=2))


@dataclass(frozen=True)
class CorpusCase:
    """One corpus entry, rendered: ``value`` is what goes into the Kafka message."""

    name: str
    value: bytes | None
    expect: str  # a DecodeError reason, or "ok"
    description: str
    headers: dict[str, bytes] = field(default_factory=dict)
    detail_contains: str | None = None
    shape: str = "v1"
    late: bool = False


def render(data: bytes, now: datetime) -> bytes:
    """Replace ``${now}``, ``${now+1h}``, ``${go:now-2d}`` ... with timestamps around ``now``."""

    def timestamp(match: re.Match[bytes]) -> bytes:
        when = now
        if match[2]:
            delta = timedelta(seconds=int(match[3]) * _UNIT_SECONDS[match[4]])
            when = when + delta if match[2] == b"+" else when - delta
        if not match[1]:
            return format_time(when).encode()
        # Go's time.Time JSON: RFC 3339 with nanoseconds, here in a +02:00 zone.
        local = when.astimezone(_GO_ZONE)
        return f"{local:%Y-%m-%dT%H:%M:%S}.{local.microsecond:06d}789+02:00".encode()

    return _PLACEHOLDER.sub(timestamp, data)


def _v1_with_payload(payload: bytes, now: datetime) -> bytes:
    return render(
        b'{"id":"0190a4b2-7c3e-7d4f-8a1b-2c3d4e5f6a7b","type":"bulk.import","payload":'
        + payload
        + b',"execute_at":"${now+1m}","created_at":"${now}"}',
        now,
    )


def _nested(depth: int) -> bytes:
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


def generate(name: str, now: datetime, limits: DecodeLimits) -> bytes | None:
    """Cases too big to commit or that depend on the limits."""
    if name == "tombstone":
        return None
    if name == "too_large":
        frame = _v1_with_payload(b'{"blob":""}', now)
        blob = b"x" * (limits.max_message_bytes + 1 - len(frame))
        return _v1_with_payload(b'{"blob":"' + blob + b'"}', now)
    if name == "deep_payload":
        return _v1_with_payload(_nested(limits.max_payload_depth + 1), now)
    if name == "deep_payload_at_limit":
        return _v1_with_payload(_nested(limits.max_payload_depth), now)
    if name == "very_deep_payload":
        # Far beyond the interpreter's recursion limit, small enough for a 64 KiB limit.
        return _v1_with_payload(b'{"a":' + b"[" * 20_000 + b"]" * 20_000 + b"}", now)
    raise ValueError(f"unknown generator {name!r}")


def load_corpus(now: datetime, limits: DecodeLimits = LIMITS) -> list[CorpusCase]:
    """All corpus cases, rendered for ``now`` and ``limits`` (see cases.toml)."""
    manifest = tomllib.loads((CORPUS_DIR / "cases.toml").read_text())
    cases = []
    for entry in manifest["case"]:
        value: bytes | None
        if "file" in entry:
            name = entry["file"]
            value = render((CORPUS_DIR / name).read_bytes(), now)
        else:
            name = entry["generator"]
            value = generate(name, now, limits)
        cases.append(
            CorpusCase(
                name=name,
                value=value,
                expect=entry["expect"],
                description=entry["description"],
                headers={k: v.encode() for k, v in entry.get("headers", {}).items()},
                detail_contains=entry.get("detail_contains"),
                shape=entry.get("shape", "v1"),
                late=entry.get("late", False),
            )
        )
    return cases
