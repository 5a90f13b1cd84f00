"""How ``eventsched events`` prints: human tables and JSON-ready dicts.

Pure functions, no I/O. Times are RFC 3339 in UTC with milliseconds; ids are strings. The
JSON of an event and of a list row is the HTTP API's (:mod:`eventsched.core.store.rowjson`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from eventsched.core.domain.event import format_time
from eventsched.core.operations.events import CommandResult
from eventsched.core.store.queries import EventKey, EventRow, EventSummary
from eventsched.core.store.selection import Selection

#: Characters of an idempotency key shown in a table (the JSON has it whole).
KEY_CHARS: Final = 60


def _time(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


def command_json(result: CommandResult) -> dict[str, Any]:
    return {
        "op": result.op,
        "event_id": str(result.event_id),
        "idempotency_key": result.idempotency_key,
        "state": "accepted" if result.command_id is not None else "not_sent",
        "command_id": None if result.command_id is None else str(result.command_id),
        "reason": result.refused,
    }


def target_json(target: EventKey) -> dict[str, Any]:
    return {
        "event_id": str(target.id),
        "idempotency_key": target.idempotency_key,
        "status": target.status,
    }


def to_json(value: Any) -> str:
    """Indented JSON (``show``, ``list``)."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def command_line(result: CommandResult, as_json: bool) -> str:
    """The line printed for one target of a command."""
    return json.dumps(command_json(result)) if as_json else render_command(result)


def target_line(target: EventKey, as_json: bool) -> str:
    """The line printed for one event of a dry run: its id, or JSON."""
    return json.dumps(target_json(target)) if as_json else str(target.id)


def selection_line(selection: Selection, dry_run: bool, as_json: bool) -> str:
    """The first line of a retry by filter: how many events match, how many are selected."""
    selected = len(selection.events)
    if as_json:
        return json.dumps({"matched": selection.matched, "selected": selected, "dry_run": dry_run})
    picked = f", {selected} selected (--limit)" if selected < selection.matched else ""
    return f"{selection.matched} events match{picked}"


def one_line(text: str) -> str:
    """A text on one table line: line breaks written as ``\\n``."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _cut(text: str, limit: int = KEY_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=False)] + [str(row[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def render_event(row: EventRow) -> str:
    """The human view of ``events show``: the fields, the payload, every attempt, then the
    commands applied to the event."""
    status = row.status + (f" ({row.dead_reason})" if row.dead_reason else "")
    fields = [
        ("id", str(row.id)),
        ("key", row.idempotency_key),
        ("type", row.type),
        ("status", status),
        ("due", _time(row.execute_at)),
        ("next attempt", _time(row.next_attempt_at)),
        ("late", "yes" if row.late else "no"),
        ("attempts", str(row.attempts)),
        ("last error", None if row.last_error is None else one_line(row.last_error)),
        ("created", _time(row.created_at)),
        ("recorded", _time(row.recorded_at)),
        ("updated", _time(row.updated_at)),
        ("finished", _time(row.finished_at)),
        ("payload", json.dumps(row.payload, ensure_ascii=False)),
    ]
    if row.trace_id is not None:  # its OpenTelemetry trace (docs/observability.md)
        fields.insert(-1, ("trace", row.trace_id))
    lines = [f"{name:<13}{'-' if value is None else value}" for name, value in fields]
    lines.append("")
    if not row.attempt_log:
        lines.append("no attempts")
        lines.extend(_history(row))
        return "\n".join(lines)
    rows = [
        (
            str(a.attempt),
            _time(a.started_at) or "-",
            f"{a.lateness_ms:.1f}ms",
            a.outcome or "-",
            a.worker_id,
            "-" if a.error is None else one_line(a.error),
        )
        for a in row.attempt_log
    ]
    lines.append(table(("ATTEMPT", "STARTED", "LATENESS", "OUTCOME", "WORKER", "ERROR"), rows))
    lines.extend(_history(row))
    return "\n".join(lines)


def _history(row: EventRow) -> list[str]:
    """The commands applied to the event, oldest first (none: no lines)."""
    if not row.history:
        return []
    rows = [
        (
            _time(c.applied_at) or "-",
            c.op + (f" to {_time(c.execute_at)}" if c.execute_at else ""),
            c.result,
            c.status_before or "-",
            _cut(c.requested_by) or "-",
            one_line(c.detail) or "-",
        )
        for c in row.history
    ]
    return ["", table(("APPLIED", "COMMAND", "RESULT", "WAS", "BY", "DETAIL"), rows)]


def render_list(rows: Sequence[EventSummary]) -> str:
    """The human view of ``events list``: one event a line, in due order."""
    if not rows:
        return "no events match"
    return table(
        ("ID", "STATUS", "TYPE", "DUE", "ATTEMPTS", "KEY"),
        [
            (
                str(r.id),
                r.status,
                r.type,
                _time(r.execute_at) or "-",
                str(r.attempts),
                _cut(r.idempotency_key),
            )
            for r in rows
        ],
    )


def render_command(result: CommandResult) -> str:
    """One line per target: ``<command id>  accepted  <op> <event id>``, or why not sent."""
    if result.command_id is not None:
        return f"{result.command_id}  accepted  {result.op} {result.event_id}"
    return f"{result.event_id}  not sent: {result.refused}"
