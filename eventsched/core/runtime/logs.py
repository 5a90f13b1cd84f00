"""structlog configuration: JSON lines for containers (Alloy ships them to Loki), console on a TTY.

Configured once by the composition root. Every line carries ``ts``, ``level``, ``event``,
``logger`` and the bound context (``role``, ``event_id``, ``partition``, ...). Secrets in
URLs and conninfo strings are redacted from every line (:func:`_redact_secrets`).
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
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


class LineWriter:
    """structlog's output for long-running processes: lines at ``debug`` and ``info`` wait up
    to ``interval`` seconds and are then written together; a line at ``warning`` or above is
    written at once, after the lines waiting before it (the order is kept).

    A write and flush per line was ~9 % of the executor's event-loop thread draining a burst
    (py-spy; the ``log`` handler writes a line per event): one system call per line, and on
    a pipe a wake-up of its reader. Batched, the executor's CPU per job fell ~5 %. Lines
    also leave when :data:`MAX_LINES` wait, at exit (``atexit``) and on :meth:`flush`. What
    a ``SIGKILL`` can lose: the last ``interval`` of info lines, never a warning or an
    error. A daemon thread does the timed writes; it sleeps while nothing waits.
    """

    #: Lines written at once, however young.
    MAX_LINES = 1000

    def __init__(self, file: Any, interval: float) -> None:
        self._file = file
        self._interval = interval
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._waiting = threading.Event()  # set while lines wait for the timed write
        self._thread: threading.Thread | None = None
        atexit.register(self.flush)

    def _later(self, message: str) -> None:
        with self._lock:
            self._lines.append(message)
            if len(self._lines) >= self.MAX_LINES:
                self._write()
            elif len(self._lines) == 1:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._timed_writes, name="eventsched-log-writer", daemon=True
                    )
                    self._thread.start()
                self._waiting.set()

    def _now(self, message: str) -> None:
        with self._lock:
            self._lines.append(message)
            self._write()

    def flush(self) -> None:
        """Write every waiting line now."""
        with self._lock:
            self._write()

    def _write(self) -> None:  # with the lock held
        self._waiting.clear()
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError):  # pragma: no cover - a closed or broken output
            pass  # logging must never crash the process; what is lost is lost

    def _timed_writes(self) -> None:
        while True:
            self._waiting.wait()
            time.sleep(self._interval)
            self.flush()

    # structlog calls the method named after the line's level.
    msg = debug = info = log = _later
    warn = warning = err = error = critical = exception = fatal = failure = _now


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: Any = None,
    flush_interval: float = 0.0,
) -> None:
    """Configure structlog (and route stdlib logging of libraries through it).

    ``flush_interval`` > 0: debug and info lines are written in batches at most that many
    seconds late (:class:`LineWriter`, for the roles); 0: every line is written at once."""
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
        logger_factory=(
            _writer_factory(LineWriter(out, flush_interval))
            if flush_interval > 0
            else structlog.PrintLoggerFactory(file=out)
        ),
        cache_logger_on_first_use=True,
    )
    # Libraries (psycopg pool, saq, hypercorn) log through stdlib logging: forward their
    # warnings and errors as structured lines too, without duplicating handlers on reconfigure.
    root = logging.getLogger()
    root.handlers[:] = [_StructlogHandler()]
    root.setLevel(max(numeric, logging.WARNING))


def _writer_factory(writer: LineWriter) -> Any:
    """A structlog logger factory that hands out ``writer`` to every logger."""

    def factory(*_: Any) -> LineWriter:
        return writer

    return factory


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
