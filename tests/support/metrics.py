"""Reading the process's Prometheus registry from tests."""

from __future__ import annotations


def metric_value(name: str, **labels: str) -> float:
    """A sample of the process's Prometheus registry (0 if it has none yet)."""
    from eventsched.core.runtime import metrics

    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0
