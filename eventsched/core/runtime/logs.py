"""structlog configuration: JSON lines for containers (Alloy ships them to Loki), console on a TTY.

Configured once by the composition root. Every line carries ``ts``, ``level``, ``event``,
``logger`` and the bound context (``role``, ``event_id``, ``partition``, ...). Secrets in
URLs and conninfo strings are redacted from every line (:func:`_redact_secrets`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, Literal

import msgspec
import structlog

from eventsched.core.runtime.redaction import redact

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_LEVEL_OF = {"warn": "warning", "exception": "error"}  # structlog's add_log_level mapping
#: The whole second of the last timestamp and its text up to the seconds: one tuple, so a
#: thread never pairs one second with another's text.
_second: tuple[int, str] = (-1, "")


def _stamp(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``level``, ``logger`` (the emitting module: structlog's stdlib processor needs stdlib
    loggers, we don't) and ``ts`` (UTC, ISO 8601 with microseconds, e.g.
    ``2026-12-04T15:03:41.826979Z``), in one processor.

    structlog's ``TimeStamper`` builds a ``datetime`` and formats all of it per line (~4 us
    here, a fifth of the ``log`` handler's line per event); the text up to the seconds is
    kept for the second it names instead, and only the microseconds are formatted."""
    global _second
    event_dict["level"] = _LEVEL_OF.get(method_name, method_name)
    name = event_dict.pop("logger_name", None)
    event_dict.setdefault("logger", name or "eventsched")
    now = time.time()
    second = int(now)
    cached = _second
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    event_dict["ts"] = f"{cached[1]}.{int((now - second) * 1e6):06d}Z"
    return event_dict


def _redact_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Last line of defence: every top-level string of the line (the message, ``error``,
    a formatted traceback, a library's forwarded message) goes through
    :func:`~eventsched.core.runtime.redaction.redact`, so a URL's credentials, query values or token
    path segments and conninfo passwords never reach the output. Nested values (an event's
    payload logged by the ``log`` handler) are data, left as they are."""
    for key, value in event_dict.items():
        if isinstance(value, str) and ("://" in value or "assword" in value):
            event_dict[key] = redact(value)
    return event_dict


_encoder = msgspec.json.Encoder(enc_hook=repr)


def _dumps(event_dict: Any, **_: Any) -> str:
    """JSON for one log line: msgspec (about half the CPU of ``json.dumps`` per line, which
    matters for the ``log`` handler's line per event); datetimes and UUIDs as strings,
    anything else unknown as its ``repr``. What msgspec refuses (non-string keys it cannot
    encode, integers beyond 64 bits) goes through the standard library instead."""
    try:
        return _encoder.encode(event_dict).decode()
    except (TypeError, ValueError, OverflowError):
        return json.dumps(event_dict, default=repr)


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: Any = None,
) -> None:
    """Configure structlog (and route stdlib logging of libraries through it)."""
    out = stream if stream is not None else sys.stdout
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    numeric = _LEVELS.get(level, logging.INFO)
    # The processor list is changed in place: a logger cached on first use keeps a
    # reference to the list it was built with, so a new list would leave it on the old
    # processors (structlog.testing.capture_logs edits this same list).
    processors = structlog.get_config()["processors"]
    processors[:] = [
        structlog.contextvars.merge_contextvars,
        _stamp,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        _redact_secrets,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    # Libraries (psycopg pool, saq, hypercorn) log through stdlib logging: forward their
    # warnings and errors as structured lines too, without duplicating handlers on reconfigure.
    root = logging.getLogger()
    root.handlers[:] = [_StructlogHandler()]
    root.setLevel(max(numeric, logging.WARNING))


class _StructlogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger(record.name)
            # exc_info keeps a library's traceback (rendered by format_exc_info).
            log.log(
                record.levelno, record.getMessage(), logger=record.name, exc_info=record.exc_info
            )
        except Exception:  # pragma: no cover - a logging failure must never crash the app
            self.handleError(record)


def get_logger(name: str) -> Any:
    """A structlog logger that names its module in the ``logger`` key."""
    # Initial values, not .bind(): binding would build the logger now, with whatever
    # configuration exists at import time, instead of lazily after configure_logging().
    return structlog.get_logger(logger_name=name)
