"""Process-wide metric choices of a service: build info, no ``_created`` series, label names
that do not clash with scrape target labels."""

from __future__ import annotations

from importlib.metadata import version

from eventsched.core.runtime import metrics


def test_a_service_exposes_its_build_and_no_created_series() -> None:
    metrics.EXECUTIONS.labels("t", "succeeded").inc(0)
    metrics.configure_process({"EVENTSCHED_BUILD_COMMIT": "4fb7d90"})
    text = metrics.render().decode()
    assert (
        f'eventsched_build_info{{commit="4fb7d90",version="{version("eventsched")}"}} 1.0' in text
    )
    assert "_created" not in text
    metrics.configure_process({})
    assert 'commit="unknown"' in metrics.render().decode()


def test_role_gauges_label_the_role_role_name() -> None:
    # A scrape config's target label `role` would rename an exposed `role` to exported_role.
    for gauge in (metrics.ROLE_READY, metrics.ROLE_STALLED):
        assert "role" not in gauge._labelnames
        assert gauge._labelnames[0] == "role_name"
