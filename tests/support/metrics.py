"""Reading Prometheus metrics: the test process's registry, or a child's ``/metrics``."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping


def metric_value(name: str, **labels: str) -> float:
    """A sample of the process's Prometheus registry (0 if it has none yet)."""
    from eventsched.core.runtime import metrics

    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    """``name{label="v",...}`` -> value from ``/metrics`` on a loopback port (labels sorted).
    Raises OSError when nothing answers."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric_sum(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of a scraped metric over its label sets (those having ``labels``, if given)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v
        for k, v in samples.items()
        if (k == name or k.startswith(name + "{")) and all(w in k for w in wanted)
    )
