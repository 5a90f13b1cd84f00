"""The records passed between the job queue's parts and its callers.

:class:`ScheduledJob` (what a caller enqueues), :class:`JobClaim` (what one run of the claim
script did), :class:`Orphans` (what requeueing given-up jobs did), :class:`PutBack` (a job
function's "not yet"), and :func:`job_dict`, SAQ's job serialisation without its per-call
overhead. Plain data, no I/O, usable on either side (trio or asyncio).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from saq.job import Job, Status

#: The key of :attr:`ScheduledJob.size` in the SAQ job's ``meta``.
SIZE_META = "size"

_JOB_FIELDS = [(field.name, field.default) for field in dataclasses.fields(Job)]
_JOB_DEFAULTS = dict(_JOB_FIELDS)


def job_dict(job: Job) -> dict[str, Any]:
    """``Job.to_dict()``, same output, without its per-call ``dataclasses.fields()`` walk and
    helper call per field (called twice per job on the worker's hot path)."""
    out: dict[str, Any] = {}
    for name, default in _JOB_FIELDS:
        value = getattr(job, name)
        try:
            if value == default:
                continue
        except ValueError:  # e.g. an array-like result, as SAQ's _safe_eq allows for
            pass
        if name == "meta" and not value:
            continue
        if name == "queue" and value:
            value = value.name
        out[name] = value
    return out


def job_payload(job: ScheduledJob, queue: str, ttl: int, queued_ms: int) -> dict[str, Any]:
    """The record ``OnTimeQueue.serialize(make_job(job))`` writes when enqueued at ``queued_ms``,
    built directly.

    Job.to_dict leaves out fields at their defaults; it walks every dataclass field and was
    40% of the enqueue CPU. tests/integration/test_queue.py checks that the two agree.
    """
    payload: dict[str, Any] = {
        "function": job.function,
        "kwargs": dict(job.kwargs),
        "queue": queue,
    }
    payload["key"] = job.key
    if job.timeout != _JOB_DEFAULTS["timeout"]:
        payload["timeout"] = job.timeout
    if ttl != _JOB_DEFAULTS["ttl"]:
        payload["ttl"] = ttl
    if job.scheduled:
        payload["scheduled"] = float(job.scheduled)
    payload["queued"] = queued_ms
    payload["status"] = Status.QUEUED.value
    if job.size is not None:
        payload["meta"] = {SIZE_META: job.size}
    return payload


def size_hint(job: Job) -> int | None:
    """The payload size a job was enqueued with (:attr:`ScheduledJob.size`), or None."""
    size = job.meta.get(SIZE_META) if job.meta else None
    return size if isinstance(size, int) and size >= 0 else None


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduledJob:
    """One job to enqueue: run ``function(**kwargs)`` at ``scheduled`` (epoch seconds)."""

    key: str  # the event id; SAQ job key, so enqueuing it again while pending is a no-op
    function: str
    scheduled: float  # epoch seconds, sub-millisecond precision is kept
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    timeout: int = 60  # seconds before SAQ cancels the job and its sweep calls it stuck
    lane: str = ""  # the event's lane (its type, if limited or prioritised; see limits.py)
    #: Bytes of payload the job will load (a hint for the worker's payload budget, kept in
    #: the SAQ job's ``meta``, not passed to the function); None: unknown, the worst case.
    size: int | None = None


class PutBack(Exception):
    """Raised by a job function that must not run yet: :class:`OnTimeWorker` puts the job
    back into the queue to run at ``at`` (epoch seconds), as if it had not been taken."""

    def __init__(self, at: float) -> None:
        super().__init__(at)
        self.at = at


@dataclasses.dataclass(frozen=True, slots=True)
class JobClaim:
    """What one run of the claim script did."""

    jobs: list[Job]
    next_due: float | None  # earliest score still waiting in `incomplete`
    backlog: int  # jobs left in `queued` after claiming
    moved: int  # jobs moved from `incomplete` to `queued` by this call
    moved_ids: list[str]  # their ids, if asked for
    wake_at: float | None = None  # when a lane blocked by a limit may start a job again


@dataclasses.dataclass(slots=True)
class Orphans:
    """What :func:`~eventsched.core.jobqueue.orphans.requeue_orphans` did."""

    requeued: list[str] = dataclasses.field(default_factory=list)  # keys put back
    # (job id, owner) of jobs taken by a live worker and not started yet: pass them to the
    # next call, which puts back those still so.
    stalled: set[tuple[str, str]] = dataclasses.field(default_factory=set)
