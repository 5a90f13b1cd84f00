"""Statistics of a run: percentiles, rates, throughput, lateness, server work per event.

Lateness is the handler's: the time its first line observed (:mod:`bench.observe`) minus
the attempt's due time (``event_attempts.scheduled_for``); what the executor recorded
(``lateness_ms``, ``started_at``) is read beside it. Throughput comes from ``finished_at``,
server work from PostgreSQL's and Redis's counters (:meth:`bench.stack.Stack.server_stats`).
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.run import log

if TYPE_CHECKING:
    from bench.stack import Stack


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """count, min, mean, p50, p90, p99, p99.9, max (nearest-rank), rounded to 0.01."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))]

    return {
        "count": n,
        "min": round(ordered[0], 2),
        "mean": round(sum(ordered) / n, 2),
        "p50": round(rank(50), 2),
        "p90": round(rank(90), 2),
        "p99": round(rank(99), 2),
        "p99.9": round(rank(99.9), 2),
        "max": round(ordered[-1], 2),
    }


def rate_series(
    times: Iterable[float], t0: float, bucket: float = 1.0
) -> tuple[list[float], list[float]]:
    """Events per second in ``bucket``-second bins from ``t0`` (x = bin start)."""
    bins: Counter[int] = Counter(int((t - t0) // bucket) for t in times)
    if not bins:
        return [], []
    xs = list(range(min(bins), max(bins) + 1))
    return [x * bucket for x in xs], [bins.get(x, 0) / bucket for x in xs]


def throughput(finished: Sequence[float]) -> dict[str, float]:
    """First-to-last completion rate."""
    if len(finished) < 2:
        return {"count": len(finished), "per_s": 0.0, "span_s": 0.0}
    first, last = min(finished), max(finished)
    span = max(1e-9, last - first)
    return {
        "count": len(finished),
        "span_s": round(span, 3),
        "per_s": round((len(finished) - 1) / span, 1),
    }


@dataclass(frozen=True)
class Attempts:
    """The ``event_attempts`` rows of a run, as columns (epoch seconds); the lateness columns
    hold the attempts whose handler was observed (``observed``), in row order."""

    scheduled: list[float]
    started: list[float]
    finished: list[float]
    # At the handler: its first line's time minus scheduled_for (ms).
    lateness_ms: list[float]
    outcomes: Counter[str]
    # Observed before scheduled_for by the handler, or recorded so (started_at < scheduled_for).
    early_by_timestamps: int
    pg_updated: list[float]  # events.updated_at of succeeded events (outcome commit time)
    service_ms: list[float]  # finished_at - started_at: the handler and its bookkeeping
    # As the executor recorded it: event_attempts.lateness_ms, same rows as lateness_ms.
    recorded_lateness_ms: list[float] = field(default_factory=list)
    # Recorded start minus observed start (ms): <= 0, and close to 0, if started_at is the
    # handler's invocation.
    recorded_minus_observed_ms: list[float] = field(default_factory=list)
    observed: int = 0
    unobserved: int = 0  # attempt rows with an outcome whose handler left no observation
    # scheduled_for - claimed_at (ms), every row: > 0 when the claim came before the due time.
    claim_lead_ms: list[float] = field(default_factory=list)
    # Lateness at the handler of the attempts claimed before their due time (the claim's
    # round trip was hidden; what is left is the wait's wake-up and the process's stalls).
    claimed_ahead_lateness_ms: list[float] = field(default_factory=list)


def read_attempts(stack: Stack, where: str = "TRUE") -> Attempts:
    rows = stack.sql(
        "SELECT extract(epoch FROM a.scheduled_for)::float8, extract(epoch FROM a.started_at)::float8,"
        " extract(epoch FROM a.finished_at)::float8, a.lateness_ms, coalesce(a.outcome, 'none'),"
        " a.started_at < a.scheduled_for, extract(epoch FROM e.updated_at)::float8,"
        " a.event_id::text, a.attempt,"
        " extract(epoch FROM a.scheduled_for - a.claimed_at)::float8 * 1000"
        f" FROM event_attempts a JOIN events e ON e.id = a.event_id WHERE {where}"
    )
    seen = stack.observed()
    # The handler writes its observations in batches (bench.observe.FLUSH_AFTER after the
    # first one): a run that ended a moment ago may not have written its last ones yet.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(
        r[4] != "none" and (r[7], r[8]) not in seen for r in rows
    ):
        time.sleep(0.1)
        seen = stack.observed()
    observed: list[tuple[float, float, float]] = []  # (handler lateness, recorded, diff)
    ahead: list[float] = []
    unobserved = 0
    early = 0
    for r in rows:
        t = seen.get((r[7], r[8]))
        if t is None:
            unobserved += r[4] != "none"
            early += bool(r[5])
            continue
        observed.append(((t - r[0]) * 1000, r[3], (r[1] - t) * 1000))
        if r[9] is not None and r[9] > 0:
            ahead.append((t - r[0]) * 1000)
        early += bool(r[5]) or t < r[0]
    return Attempts(
        scheduled=[r[0] for r in rows if (r[7], r[8]) in seen],
        started=[r[1] for r in rows],
        finished=[r[2] for r in rows if r[2] is not None],
        lateness_ms=[o[0] for o in observed],
        outcomes=Counter(r[4] for r in rows),
        early_by_timestamps=early,
        pg_updated=[r[6] for r in rows if r[4] == "succeeded"],
        service_ms=[(r[2] - r[1]) * 1000 for r in rows if r[2] is not None],
        recorded_lateness_ms=[o[1] for o in observed],
        recorded_minus_observed_ms=[o[2] for o in observed],
        observed=len(observed),
        unobserved=unobserved,
        claim_lead_ms=[r[9] for r in rows if r[9] is not None],
        claimed_ahead_lateness_ms=ahead,
    )


def stats_delta(
    before: Mapping[str, float], after: Mapping[str, float], per: int
) -> dict[str, Any]:
    """Server work between two :meth:`Stack.server_stats` snapshots, per event (``per``).

    PostgreSQL's counters are flushed by its backends about once a second: take the
    snapshots a second or more after the work they bracket.
    """
    n = max(1, per)
    pg = {
        k.removeprefix("pg."): round((after.get(k, 0.0) - before.get(k, 0.0)) / n, 3)
        for k in after
        if k.startswith("pg.")
    }
    redis_usec: dict[str, float] = {}
    redis_calls: dict[str, float] = {}
    for key in after:
        if key.startswith("redis.") and key.endswith(".usec"):
            name = key[len("redis.") : -len(".usec")]
            usec = after[key] - before.get(key, 0.0)
            if usec > 0:
                redis_usec[name] = round(usec / n, 2)
                calls = after.get(f"redis.{name}.calls", 0.0)
                redis_calls[name] = round((calls - before.get(f"redis.{name}.calls", 0.0)) / n, 3)
    top = sorted(redis_usec, key=lambda k: -redis_usec[k])[:8]
    scans = {
        k.removeprefix("scan."): round((after.get(k, 0.0) - before.get(k, 0.0)) / n, 3)
        for k in after
        if k.startswith("scan.") and after.get(k, 0.0) != before.get(k, 0.0)
    }
    return {
        "events": per,
        "postgres_per_event": pg,
        # seq_tup_read.<table> / idx_tup_read.<index> per event: where tup_returned comes from.
        "postgres_scans_per_event": dict(sorted(scans.items(), key=lambda kv: -kv[1])[:12]),
        "redis_usec_per_event": {k: redis_usec[k] for k in top},
        # EVALSHA's time includes the commands its script runs (listed on their own too).
        "redis_calls_per_event": {k: redis_calls[k] for k in top},
    }


def wait_for_count(
    count: Callable[[], int], target: int, *, stall: float, cap: float, what: str = ""
) -> bool:
    """Poll ``count()`` every 0.5 s until it reaches ``target``; give up when it has not
    moved for ``stall`` s or after ``cap`` s in all (an overloaded run still finishes)."""
    began = last_move = time.monotonic()
    last = -1
    while True:
        now_count = count()
        if now_count >= target:
            return True
        now = time.monotonic()
        if now_count != last:
            last, last_move = now_count, now
        if now - last_move > stall or now - began > cap:
            log(f"gave up waiting ({what}): {now_count:,} of {target:,} after {now - began:.0f} s")
            return False
        time.sleep(0.5)


def lateness_timeline(
    scheduled: Sequence[float], lateness_ms: Sequence[float], t0: float, bucket: float = 1.0
) -> list[dict[str, float]]:
    """Lateness percentiles per ``bucket`` seconds of due time (shows warm-up and stalls)."""
    bins: dict[int, list[float]] = defaultdict(list)
    for due, late in zip(scheduled, lateness_ms, strict=True):
        bins[int((due - t0) // bucket)].append(late)
    out: list[dict[str, float]] = []
    for key in sorted(bins):
        p = percentiles(bins[key])
        out.append(
            {"t": key * bucket, "n": p["count"], "p50": p["p50"], "p99": p["p99"], "max": p["max"]}
        )
    return out


def lateness_summary(lateness_ms: Sequence[float], early: int | None = None) -> dict[str, Any]:
    summary: dict[str, Any] = percentiles(lateness_ms)
    summary["early"] = sum(1 for x in lateness_ms if x < 0) if early is None else early
    return summary
