"""The live terminal summary of `eventsched dev`: what flowed through each stage.

Counts of this process come from the metrics registry (all roles share the process in dev
mode); statuses and lateness percentiles come from PostgreSQL, the source of truth.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from eventsched.core.runtime import metrics
from eventsched.core.runtime.logs import get_logger

if TYPE_CHECKING:
    from eventsched.core.runtime.root import Runtime

log = get_logger(__name__)

STATUS_SQL = "SELECT status, count(*) FROM events GROUP BY status"
# Lateness of attempts started in the last minute: enough for a live view, bounded cost.
LATENESS_SQL = """
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lateness_ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lateness_ms),
       count(*)
FROM event_attempts WHERE started_at > now() - interval '60 seconds'
"""


def metric_total(name: str, **labels: str) -> float:
    """Sum of every sample called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@dataclass
class Snapshot:
    stack: dict[str, str] = field(default_factory=dict)
    roles: dict[str, bool] = field(default_factory=dict)
    failing: dict[str, str] = field(default_factory=dict)
    produced: int = 0
    consumed: int = 0
    invalid: int = 0
    scheduled_jobs: int = 0
    dlq: int = 0
    retried: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    lateness_p50_ms: float | None = None
    lateness_p99_ms: float | None = None
    executed_last_minute: int = 0
    stopping: bool = False

    @property
    def _not_ready(self) -> str:
        return "stopping" if self.stopping else "starting"

    def line(self) -> str:
        st = self.statuses
        lat = (
            f"lateness p50 {self.lateness_p50_ms:.1f}ms p99 {self.lateness_p99_ms:.1f}ms"
            if self.lateness_p50_ms is not None and self.lateness_p99_ms is not None
            else "lateness -"
        )
        roles = ",".join(
            f"{r}{'' if ok else f'({self._not_ready})'}" for r, ok in self.roles.items()
        )
        down = f" DOWN: {','.join(sorted(self.failing))}" if self.failing else ""
        return (
            f"roles {roles}{down} | produced {self.produced} consumed {self.consumed} "
            f"scheduled {st.get('scheduled', 0)} running {st.get('running', 0)} "
            f"succeeded {st.get('succeeded', 0)} retried {self.retried} dead {st.get('dead', 0)} "
            f"dlq {self.dlq} | {lat}"
        )

    def table(self) -> Table:
        table = Table(title="eventsched dev", show_header=False, expand=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        for name, url in self.stack.items():
            table.add_row(name, url)
        table.add_row(
            "roles",
            ", ".join(f"{r} {'ready' if ok else self._not_ready}" for r, ok in self.roles.items()),
        )
        if self.failing:
            table.add_row("down", "; ".join(f"{k}: {v}" for k, v in sorted(self.failing.items())))
        st = self.statuses
        rows: list[tuple[str, Any]] = [
            ("produced", self.produced),
            ("consumed", self.consumed),
            ("scheduled", st.get("scheduled", 0)),
            ("running", st.get("running", 0)),
            ("succeeded", st.get("succeeded", 0)),
            ("retried", self.retried),
            ("dead", st.get("dead", 0)),
            ("DLQ", self.dlq),
        ]
        for name, value in rows:
            table.add_row(name, str(value))
        if self.lateness_p50_ms is not None and self.lateness_p99_ms is not None:
            table.add_row(
                "lateness (1 min)",
                f"p50 {self.lateness_p50_ms:.1f} ms  p99 {self.lateness_p99_ms:.1f} ms  ({self.executed_last_minute} runs)",
            )
        else:
            table.add_row("lateness (1 min)", "-")
        table.add_row("", "Ctrl-C stops everything")
        return table


async def take_snapshot(runtime: Runtime, stack: dict[str, str]) -> Snapshot:
    snap = Snapshot(
        stack=stack,
        roles=dict(runtime.health.roles),
        failing=dict(runtime.health.failures),
        stopping=runtime.stopping.is_set(),
    )
    snap.produced = int(metric_total("eventsched_events_produced_total"))
    snap.consumed = int(metric_total("eventsched_events_consumed_total"))
    snap.dlq = int(metric_total("eventsched_dlq_messages_total"))
    snap.retried = int(metric_total("eventsched_executions_total", outcome="retried"))
    db = runtime.resources.db if runtime.resources is not None else None
    if db is not None and "postgres" not in runtime.health.failures:
        try:
            snap.statuses = {str(s): int(n) for s, n in await db.fetchall(STATUS_SQL)}
            row = await db.fetchone(LATENESS_SQL)
            if row is not None and row[2]:
                snap.lateness_p50_ms, snap.lateness_p99_ms, snap.executed_last_minute = (
                    float(row[0]),
                    float(row[1]),
                    int(row[2]),
                )
        except Exception:  # the summary is best effort; /readyz and logs report the outage
            pass
    return snap


async def live_summary(
    runtime: Runtime, stack: dict[str, str], *, interval: float = 1.0, out: TextIO | None = None
) -> None:
    """Refresh a table in place on a TTY; print one plain line per interval otherwise."""
    stream = out if out is not None else sys.stdout
    if stream.isatty():
        console = Console(file=stream)
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                live.update((await take_snapshot(runtime, stack)).table(), refresh=True)
                await trio.sleep(interval)
    else:
        # Not a terminal: keep stdout machine-readable, one structured line per period.
        while True:
            await trio.sleep(interval * 5)
            snap = await take_snapshot(runtime, stack)
            log.info("dev_summary", summary=snap.line())
