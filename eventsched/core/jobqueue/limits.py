"""Lanes: global per-type limits and priorities of the job queue, enforced in Redis.

An event type with a ``concurrency`` or ``rate`` limit, or a priority of its own, has a
*lane*. Its events are marked at enqueue (the ``lanes`` hash: event id -> lane name; the
entry serves every job of the event, its retries included, and is removed when the event
ends: succeeded, dead or cancelled; whoever makes a job for it later marks it again). The
claim script (:data:`~eventsched.core.jobqueue.scripts.CLAIM_LUA`) moves a
due job of a lane into the lane's ``ready`` zset rather than the shared ``queued`` list,
and claims from each lane only while its limits allow, atomically and in the same call that
claims everything else (no round trip of its own):

* ``concurrency``: a *lease* per job in flight, a member of the lane's ``leases`` zset
  (job id -> expiry, the claimer's clock + :attr:`Lane.lease`). A lane is full while it holds
  ``concurrency`` unexpired leases. A job's lease goes when it finishes, is given back or
  put back (:func:`release_commands`, riding with the worker's state changes), and that
  wakes every dispatcher; a lease of a process that died expires by itself.
* ``rate``: a token bucket (the lane's hash: ``tokens``, ``ts``), ``burst`` tokens at most,
  refilled at ``rate`` per second by the claimer's clock, or up to the due time of a job
  claimed ahead of it (it starts then); a start takes a token. A claim that
  finds none returns when the next one is due, and the dispatcher wakes then.

A lane out of leases or tokens is skipped: other lanes and ``queued`` are served in the same
claim (no head-of-line blocking). When slots are scarce, lanes and ``queued`` are served in
priority order (higher first; ``queued`` has the default priority). A lane that blocks
records when and why (``blocked_at``, ``reason``); a job due by then was *held* by that
limit, which the claim reports with the job so the executor counts its wait as held, not
late. Plain data and command lists, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import msgspec

Command = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Lane:
    """A queue lane: the jobs of one event type that has limits or a priority of its own."""

    name: str  # the event type
    priority: int = 0  # higher is claimed first when slots are scarce
    concurrency: int = 0  # jobs in flight across all processes; 0: no limit
    rate: float = 0.0  # starts per second across all processes; 0: no limit
    burst: int = 0  # the token bucket's size
    lease: float = 60.0  # seconds a concurrency lease lasts (the job's timeout and a margin)


def encode_lanes(lanes: Sequence[Lane]) -> str:
    """The lanes as the claim script reads them ('' for none: the script's fast path)."""
    if not lanes:
        return ""
    rows = [[x.name, x.priority, x.concurrency, x.rate, x.burst, x.lease] for x in lanes]
    return msgspec.json.encode(rows).decode()


class LaneKeys:
    """The Redis keys of the lanes of one queue (``namespace`` is the queue's)."""

    def __init__(self, namespace: Callable[[str], str]) -> None:
        self.lanes = namespace("lanes")  # hash: event id -> lane name
        self.prefix = namespace("lane:")  # + name: the lane's hash (bucket, last block)

    def ready(self, lane: str) -> str:
        return f"{self.prefix}{lane}:ready"  # zset: due job id -> due time

    def leases(self, lane: str) -> str:
        return f"{self.prefix}{lane}:leases"  # zset: job id -> lease expiry

    def state(self, lane: str) -> str:
        return f"{self.prefix}{lane}"


def event_of(key: str) -> str:
    """The event id of a job key (``<event id>`` or ``<event id>#<attempt>``)."""
    return key.partition("#")[0]


def release_commands(
    keys: LaneKeys, lane: Lane | None, job_id: str, wakeup_channel: str
) -> list[Command]:
    """Give back the concurrency lease of a job leaving `active`, and wake the dispatchers
    (one of them may start the next job of the lane now, not at its next poll)."""
    if lane is None or not lane.concurrency:
        return []
    return [("ZREM", keys.leases(lane.name), job_id), ("PUBLISH", wakeup_channel, "0")]
