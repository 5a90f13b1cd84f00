"""The consumer's unassigned-grace setting (the group behaviour is in
tests/integration/test_unassigned.py).
"""

from __future__ import annotations

import pytest

from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.settings import build_settings


def test_unassigned_grace_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"consumer\.unassigned_grace: must be positive"):
        build_settings({"consumer": {"unassigned_grace": "0s"}}, "test")
    assert build_settings({}, "test").consumer.unassigned_grace == 30.0


def test_rejoin_after_is_off_by_default_and_never_negative() -> None:
    assert build_settings({}, "test").consumer.rejoin_after == 0.0
    assert build_settings({"consumer": {"rejoin_after": "30s"}}, "test").consumer.rejoin_after == 30
    for bad in ("-1s", -1):
        with pytest.raises(ConfigError, match=r"consumer\.rejoin_after"):
            build_settings({"consumer": {"rejoin_after": bad}}, "test")


def test_each_rejoin_of_one_stall_waits_twice_as_long_up_to_a_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import trio

    from eventsched.plugins.consumer import partitions

    watch = partitions.PartitionWatch.__new__(partitions.PartitionWatch)
    watch.settings = build_settings({"consumer": {"rejoin_after": "10s"}}, "test")
    watch._rejoins = 0
    now = 1000.0
    monkeypatch.setattr(partitions.time, "monotonic", lambda: now)
    event = trio.Event()
    watch._stalled_at = None
    assert not watch._rejoin_due(event)  # not stalled
    watch._stalled_at = now - 9.9
    assert not watch._rejoin_due(event)
    assert not watch._rejoin_due(None)  # no rejoin wanted by the caller
    # 10 s, then twice as long for each rejoin of the same stall, capped at 8 x 10 s.
    for rejoins, wait in enumerate([10.0, 20.0, 40.0, 80.0, 80.0, 80.0]):
        watch._rejoins = rejoins
        watch._stalled_at = now - wait + 0.1
        assert not watch._rejoin_due(event), rejoins
        watch._stalled_at = now - wait
        assert watch._rejoin_due(event), rejoins
    off = build_settings({}, "test")
    watch.settings = off
    watch._rejoins, watch._stalled_at = 0, now - 1e6
    assert not watch._rejoin_due(event)
