"""How a dead-letter copy is cut to fit the broker's size limit (pure; the deliveries are in
tests/integration/test_dlq_hardening.py).
"""

from __future__ import annotations

import pytest

from eventsched.core.domain.deadletter import (
    DLQ_HEADER_NAMES,
    DLQ_KEY_MAX_BYTES,
    DLQ_MAX_BYTES,
    DLQ_MIN_BYTES,
    dlq_size,
    fit_dead_letter,
)
from tests.support.dlq import our_headers


def test_a_copy_within_the_budget_is_unchanged() -> None:
    headers = our_headers()
    assert fit_dead_letter(b"k" * 2000, b"v" * 100_000, headers) == (
        b"k" * 2000,
        b"v" * 100_000,
        headers,
    )


@pytest.mark.parametrize("budget", [DLQ_MAX_BYTES, DLQ_MIN_BYTES])
def test_cuts_come_in_order_and_only_as_far_as_needed(budget: int) -> None:
    headers = our_headers()
    # Only the value is too big (the key is within its 1 KiB): key and headers stay.
    key, value, cut = fit_dead_letter(b"k" * 500, b"v" * 2_000_000, headers, budget=budget)
    assert key == b"k" * 500 and cut[:-1] == headers
    assert cut[-1] == ("dlq-truncated-value", b"2000000")
    assert value == b"v" * len(value) and dlq_size(key, value, cut) == budget
    # A huge key is cut first; that is enough here.
    key, value, cut = fit_dead_letter(b"k" * 2_000_000, b"oops", headers, budget=budget)
    assert (key, value) == (b"k" * DLQ_KEY_MAX_BYTES, b"oops")
    assert cut == [*headers, ("dlq-truncated-key", b"2000000")]
    # Huge original headers: whole headers are kept in order up to 16 KiB, ours all stay.
    many = [(f"h{i}", b"x" * 10_000) for i in range(200)] + headers
    key, value, cut = fit_dead_letter(b"k", b"oops", many, budget=budget)
    names = [name for name, _ in cut]
    assert names[:1] == ["h0"] and "h2" not in names
    ours = [n for n, _ in headers if n in DLQ_HEADER_NAMES]
    assert names[-len(ours) - 1 : -1] == ours
    total = sum(len(n) + len(v or b"") for n, v in many if n not in DLQ_HEADER_NAMES)
    assert cut[-1] == ("dlq-truncated-headers", str(total).encode())
    assert dlq_size(key, value, cut) <= budget
