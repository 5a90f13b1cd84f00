"""Global limits per lane: concurrency leases and rate token buckets in Redis (asyncio side).

(Filled in with the claim script's limits.)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Lane:
    """A queue lane: the jobs of one event type that has limits or a priority of its own."""

    name: str  # the event type
    priority: int = 0  # higher is claimed first when slots are scarce
    concurrency: int = 0  # jobs in flight across all processes; 0: no limit
    rate: float = 0.0  # starts per second across all processes; 0: no limit
    burst: int = 0  # the token bucket's size
    lease: float = 60.0  # seconds a concurrency lease lasts (the job's timeout and a margin)
