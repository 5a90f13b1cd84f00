"""Stored rows as JSON: the one shape of an event, its attempts and history, a list row and
the counts, shared by the HTTP API's answers and ``eventsched events --json``.

Pure functions, no I/O: rows of :mod:`eventsched.core.store.queries` become JSON-ready
dicts (times as RFC 3339 UTC with milliseconds, ids as strings).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from eventsched.core.domain.event import STATUSES, format_time
from eventsched.core.store.queries import Attempt, CommandEntry, EventRow, EventSummary, Stats


def _time(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


def attempt_json(a: Attempt) -> dict[str, Any]:
    return {
        "attempt": a.attempt,
        "scheduled_for": _time(a.scheduled_for),
        "started_at": _time(a.started_at),
        "finished_at": _time(a.finished_at),
        "lateness_ms": a.lateness_ms,
        "outcome": a.outcome,
        "error": a.error,
        "worker_id": a.worker_id,
    }


def history_json(c: CommandEntry) -> dict[str, Any]:
    return {
        "command_id": str(c.command_id),
        "op": c.op,
        "requested_by": c.requested_by,
        "execute_at": _time(c.execute_at),
        "created_at": _time(c.created_at),
        "applied_at": _time(c.applied_at),
        "result": c.result,
        "status_before": c.status_before,
        "detail": c.detail,
    }


def event_json(row: EventRow) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "idempotency_key": row.idempotency_key,
        "type": row.type,
        "status": row.status,
        "execute_at": _time(row.execute_at),
        "next_attempt_at": _time(row.next_attempt_at),
        "late": row.late,
        "attempt_count": row.attempts,
        "last_error": row.last_error,
        "dead_reason": row.dead_reason,
        "trace_id": row.trace_id,
        "created_at": _time(row.created_at),
        "recorded_at": _time(row.recorded_at),
        "updated_at": _time(row.updated_at),
        "finished_at": _time(row.finished_at),
        "payload": row.payload,
        "attempts": [attempt_json(a) for a in row.attempt_log],
        "history": [history_json(c) for c in row.history],
    }


def summary_json(row: EventSummary) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "idempotency_key": row.idempotency_key,
        "type": row.type,
        "status": row.status,
        "execute_at": _time(row.execute_at),
        "attempt_count": row.attempts,
        "late": row.late,
        "created_at": _time(row.created_at),
        "updated_at": _time(row.updated_at),
    }


def stats_json(stats: Stats) -> dict[str, Any]:
    by_status = dict.fromkeys(STATUSES, 0) | stats.by_status
    oldest = stats.oldest_overdue
    return {
        "total": stats.total,
        "by_status": by_status,
        "by_type": stats.by_type,
        "oldest_overdue": None
        if oldest is None
        else {
            "id": str(oldest.id),
            "type": oldest.type,
            "execute_at": _time(oldest.execute_at),
            "overdue_seconds": round(oldest.overdue_seconds, 3),
        },
    }
