"""The live terminal summary of `eventsched dev`: what flowed through each stage.

Two kinds of counts, and the summary names each: **this run**'s come from this process's
metrics registry (all roles share the process in dev mode) and start at 0 on every start;
**PostgreSQL totals** (events by status) count every event of every run on this data dir,
since PostgreSQL keeps its data from one run to the next. Next to them: where the servers
are, the HTTP port (``/metrics``, ``/readyz``), the log directory and the line that points
another shell at the stack. The broker keeps everything in memory: the summary says so.

Lateness (start - due, the last minute's attempts) is shown in three figures, because only
one of them says how punctual the scheduler is:

- **on time**: attempts of events recorded before their due time, due while this run was
  up: the scheduler's own punctuality;
- **overdue at ingest**: the event reached PostgreSQL after its due time (sent late, e.g.
  ``send --in 500ms`` through a slow path, or a backlog in Kafka): it runs at once, and its
  lateness is the sender's, not the executor's;
- **catch-up**: due before this run started (downtime): run as soon as possible after a
  restart;
- **held**: waited for its type's concurrency or rate limit (``[types]``): the wait is the
  limit's, not lateness.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from eventsched.core.runtime import metrics
from eventsched.core.runtime.logs import get_logger

if TYPE_CHECKING:
    from eventsched.core.runtime.root import Runtime
    from eventsched.core.store.pool import Database

log = get_logger(__name__)

STATUS_SQL = "SELECT status, count(*) FROM events GROUP BY status"
# Lateness of attempts started in the last minute (enough for a live view, bounded cost), by
# kind (the module docstring); parameter: when this run started.
LATENESS_SQL = """
SELECT CASE WHEN a.held_by IS NOT NULL THEN 'held'
            WHEN e.recorded_at >= a.scheduled_for THEN 'overdue_at_ingest'
            WHEN a.scheduled_for < %s THEN 'catch_up'
            ELSE 'on_time' END AS kind,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY a.lateness_ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY a.lateness_ms),
       count(*)
FROM event_attempts a JOIN events e ON e.id = a.event_id
WHERE a.started_at > now() - interval '60 seconds'
GROUP BY kind
"""
LATENESS_KINDS: Final = ("on_time", "overdue_at_ingest", "catch_up", "held")
_KIND_NAMES: Final = {
    "on_time": "on time",
    "overdue_at_ingest": "overdue at ingest",
    "catch_up": "catch-up",
    "held": "held by a limit",
}


@dataclass(frozen=True)
class Lateness:
    """Lateness of one kind of attempt over the last minute."""

    p50_ms: float
    p99_ms: float
    count: int

    def text(self) -> str:
        return f"p50 {self.p50_ms:.1f} ms p99 {self.p99_ms:.1f} ms ({self.count} runs)"


async def lateness_by_kind(db: Database, started: datetime) -> dict[str, Lateness]:
    """The last minute's lateness, by kind (kinds without an attempt are left out)."""
    return {
        str(kind): Lateness(float(p50), float(p99), int(n))
        for kind, p50, p99, n in await db.fetchall(LATENESS_SQL, (started,))
    }


def metric_total(name: str, **labels: str) -> float:
    """Sum of every sample called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


#: What the broker of the dev stack loses when `eventsched dev` stops (memory only).
BROKER_MEMORY_ONLY: Final = "in memory only: topics, DLQ and committed offsets end with this run"


@dataclass(frozen=True)
class DevFacts:
    """Where a user of the dev stack looks: the env file to source, the log directory."""

    env_file: str = ""
    log_dir: str = ""

    @property
    def env_hint(self) -> str:
        return f"set -a; . {self.env_file}; set +a" if self.env_file else ""


@dataclass
class Snapshot:
    stack: dict[str, str] = field(default_factory=dict)
    facts: DevFacts = field(default_factory=DevFacts)
    #: The HTTP port of /metrics, /healthz and /readyz (None until it is bound).
    http_port: int | None = None
    roles: dict[str, bool] = field(default_factory=dict)
    failing: dict[str, str] = field(default_factory=dict)
    produced: int = 0
    consumed: int = 0
    invalid: int = 0
    scheduled_jobs: int = 0
    dlq: int = 0
    retried: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    lateness: dict[str, Lateness] = field(default_factory=dict)
    stopping: bool = False

    @property
    def _not_ready(self) -> str:
        return "stopping" if self.stopping else "starting"

    def line(self) -> str:
        st = self.statuses
        lat = "; ".join(
            f"{_KIND_NAMES[kind]} {self.lateness[kind].text()}"
            for kind in LATENESS_KINDS
            if kind in self.lateness
        )
        roles = ",".join(
            f"{r}{'' if ok else f'({self._not_ready})'}" for r, ok in self.roles.items()
        )
        down = f" DOWN: {','.join(sorted(self.failing))}" if self.failing else ""
        return (
            f"roles {roles}{down} | this run: produced {self.produced} consumed "
            f"{self.consumed} retried {self.retried} dlq {self.dlq} | PostgreSQL totals "
            f"(every run): scheduled {st.get('scheduled', 0)} running {st.get('running', 0)} "
            f"succeeded {st.get('succeeded', 0)} dead {st.get('dead', 0)} cancelled "
            f"{st.get('cancelled', 0)} | lateness (1 min) {lat or '-'} | {self._http()}"
        )

    def _http(self) -> str:
        if self.http_port is None:
            return "http (not bound yet)"
        return f"http http://127.0.0.1:{self.http_port} (/metrics, /readyz)"

    def table(self) -> Table:
        table = Table(title="eventsched dev", show_header=False, expand=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        for name, url in self.stack.items():
            note = f"  ({BROKER_MEMORY_ONLY})" if name == "kafka" else ""
            table.add_row(name, f"{url}{note}")
        table.add_row(*self._http().split(" ", 1))
        if self.facts.log_dir:
            table.add_row("logs", self.facts.log_dir)
        if self.facts.env_hint:
            table.add_row("other shell", self.facts.env_hint)
        table.add_row(
            "roles",
            ", ".join(f"{r} {'ready' if ok else self._not_ready}" for r, ok in self.roles.items()),
        )
        if self.failing:
            table.add_row("down", "; ".join(f"{k}: {v}" for k, v in sorted(self.failing.items())))
        st = self.statuses
        rows: list[tuple[str, Any]] = [
            ("this run", "counted by this process since it started"),
            ("  produced", self.produced),
            ("  consumed", self.consumed),
            ("  retried", self.retried),
            ("  sent to the DLQ", self.dlq),
            ("PostgreSQL totals", "every event of every run on this data dir, by status"),
            ("  scheduled", st.get("scheduled", 0)),
            ("  running", st.get("running", 0)),
            ("  succeeded", st.get("succeeded", 0)),
            ("  dead", st.get("dead", 0)),
            ("  cancelled", st.get("cancelled", 0)),
        ]
        for name, value in rows:
            table.add_row(name, str(value))
        for kind in LATENESS_KINDS:
            figure = self.lateness.get(kind)
            table.add_row(
                f"lateness, {_KIND_NAMES[kind]} (1 min)", "-" if figure is None else figure.text()
            )
        table.add_row("", "Ctrl-C stops everything")
        return table


async def take_snapshot(
    runtime: Runtime, stack: dict[str, str], started: datetime, facts: DevFacts | None = None
) -> Snapshot:
    snap = Snapshot(
        stack=stack,
        facts=facts or DevFacts(),
        http_port=runtime.bound_port,
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
            snap.lateness = await lateness_by_kind(db, started)
        except Exception:  # the summary is best effort; /readyz and logs report the outage
            pass
    return snap


async def live_summary(
    runtime: Runtime,
    stack: dict[str, str],
    *,
    facts: DevFacts | None = None,
    interval: float = 1.0,
    out: TextIO | None = None,
) -> None:
    """Refresh a table in place on a TTY; print one plain line per interval otherwise."""
    stream = out if out is not None else sys.stdout
    started = datetime.now(UTC)  # due before this: catch-up after downtime
    if stream.isatty():
        console = Console(file=stream)
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                snap = await take_snapshot(runtime, stack, started, facts)
                live.update(snap.table(), refresh=True)
                await trio.sleep(interval)
    else:
        # Not a terminal: keep stdout machine-readable, one structured line per period.
        while True:
            await trio.sleep(interval * 5)
            snap = await take_snapshot(runtime, stack, started, facts)
            log.info("dev_summary", summary=snap.line())
