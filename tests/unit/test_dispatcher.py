"""How many jobs the dispatcher claims at once (its claims on Redis:
tests/integration/test_burst_start.py, tests/integration/test_executor_memory.py)."""

from __future__ import annotations

import pytest

from eventsched.core.jobqueue.dispatcher import OPENING_CLAIM, claim_size


@pytest.mark.parametrize(
    ("demand", "room", "opening", "size"),
    [
        (96, None, False, 96),  # one job per waiting slot
        (96, 64, False, 64),  # no more than the payload budget has room for
        (10, 64, False, 10),
        (0, 64, False, 0),  # no slot waits: claim none (the claim still moves due jobs)
        (96, None, True, OPENING_CLAIM),  # a burst opens with a few jobs
        (96, 64, True, OPENING_CLAIM),
        (96, 3, True, 3),  # ... or fewer, if the budget has room for fewer
        (2, None, True, 2),
        (0, None, True, 0),
    ],
)
def test_claim_size(demand: int, room: int | None, opening: bool, size: int) -> None:
    assert claim_size(demand, room, opening) == size
