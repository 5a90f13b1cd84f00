"""Readiness of a stalled role, in process (the outages are in tests/integration/test_readyz.py)."""

from __future__ import annotations

import time


def test_a_stalled_role_makes_readyz_name_it_and_sets_the_metric() -> None:
    from eventsched.core.runtime.health import Health
    from tests.support.metrics import metric_value

    health = Health()
    health.expect_role("consumer")
    health.role_ready("consumer")
    assert health.readiness()[0]
    health.stall("consumer", "unassigned", "no partitions assigned", since=time.monotonic() - 42)
    ready, body = health.readiness()
    assert not ready
    assert body["stalled"] == ["consumer: no partitions assigned for 42s"]
    labels = {"role_name": "consumer", "reason": "unassigned"}
    assert metric_value("eventsched_role_stalled", **labels) == 1
    # Calling it again keeps the first instant; unstall clears readiness and the gauge.
    health.stall("consumer", "unassigned", "no partitions assigned")
    assert health.readiness()[1]["stalled"] == ["consumer: no partitions assigned for 42s"]
    health.unstall("consumer", "unassigned")
    assert health.readiness()[0]
    assert metric_value("eventsched_role_stalled", **labels) == 0
