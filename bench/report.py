"""Formatting benchmark results: the Markdown section of RESULTS.md, numbers, plots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.proc import REPO


def markdown_section(
    doc: Mapping[str, Any], table: Sequence[Sequence[str]], notes: Sequence[str]
) -> str:
    m, g, load = doc["machine"], doc["git"], doc["load"]
    lines = [
        f"### {doc['benchmark']} — {doc['date']}",
        "",
        f"- command: `{doc['command']}`",
        f"- commit: `{g['label']}` · machine: {m['nproc']} CPUs ({m['cpu_model']}), "
        f"{m['memory_gb']} GB, Python {m['python']}",
        f"- load average (1/5/15 min) at start {load.get('at_start')}, at end {load.get('at_end')}"
        + (" — **machine was busy**" if load.get("quiet") is False else ""),
    ]
    lines += [f"- {note}" for note in notes]
    if table:
        lines += ["", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    if doc.get("plot"):
        lines += [
            "",
            f"Plot: `{Path(doc['plot']).relative_to(REPO) if str(doc['plot']).startswith(str(REPO)) else doc['plot']}`",
        ]
    return "\n".join(lines) + "\n"


def fmt_ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def ratio(ours: float, theirs: float, higher_is_better: bool = True) -> str:
    """``x.yx`` in favour of eventsched (>1 = better), or - if undefined."""
    if ours <= 0 or theirs <= 0:
        return "-"
    r = ours / theirs if higher_is_better else theirs / ours
    return f"{r:,.1f}x" if r < 100 else f"{r:,.0f}x"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(
    ax: Any, series: Mapping[str, Sequence[float]], title: str, target: float | None = None
) -> None:
    """Lateness CDFs on a log x-axis (values below 0.01 ms are drawn at 0.01)."""
    for label, values in series.items():
        if not values:
            continue
        xs = sorted(max(0.01, v) for v in values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=f"{label} (n={len(xs):,})")
    if target is not None:
        ax.axvline(
            target, color="grey", linestyle="--", linewidth=1, label=f"target p99 ≤ {target:g} ms"
        )
    ax.set_xscale("log")
    ax.set_xlabel("start lateness (ms, log)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
