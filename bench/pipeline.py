"""The whole pipeline under load, shared by ``bench.e2e`` (target 5) and ``bench.memory``
(target 4): producer -> Kafka -> consumer -> PostgreSQL + Redis -> executor, one process per
role, started with ``python -m eventsched run --role X``.

The producer role generates ``rate`` events/s (``producer.rate``), each due
``U(delay_min, delay_max)`` s out, for ``duration`` s; then it is stopped and the harness
waits until every generated event has run. Every second it records the producer's and the
consumer's counters (``/metrics``) and the executor's backlog in Redis (jobs due but not
started). Results: lateness from ``event_attempts``, ingest latency (``recorded_at -
created_at``), lag over time and its trend, RSS and CPU per role.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.profiling import Profiler
from bench.run import log
from bench.sampling import Sampler
from bench.stack import RECOMMENDED_CONCURRENCY, Role, Stack, executions_done
from bench.stats import (
    lateness_summary,
    lateness_timeline,
    percentiles,
    read_attempts,
    stats_delta,
    wait_for_count,
)
from tests.support.clients import FAST_GROUP_CONFIG, status_counts
from tests.support.metrics import metric_sum

QUEUE = "bench"


@dataclass
class LagSample:
    t: float
    produced: float
    consumed: float
    due_not_started: int  # Redis: due jobs still in `incomplete` or waiting in `queued`
    active: int


@dataclass
class Pipeline:
    """Settings of one pipeline run."""

    rate: float
    duration: float
    delay_min: float
    delay_max: float
    concurrency: int = RECOMMENDED_CONCURRENCY
    profile: bool = False
    profile_seconds: float = 20.0
    samples: list[LagSample] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace, rate: float) -> Pipeline:
        """The run the flags of ``bench.e2e`` / ``bench.memory`` ask for, at ``rate``."""
        quick = args.quick
        return cls(
            rate=rate,
            duration=args.duration or (2.0 if quick else 60.0),
            delay_min=args.delay_min if args.delay_min is not None else (1.0 if quick else 2.0),
            delay_max=args.delay_max if args.delay_max is not None else (1.5 if quick else 10.0),
            concurrency=args.concurrency,
            profile=args.profile,
            profile_seconds=args.profile_seconds,
        )


def _lag_sample(
    r: Any, producer: Role | None, consumer: Role, produced: float, consumed: float
) -> LagSample:
    """One sample; ``produced``/``consumed`` stand when a role's metrics are unreachable
    (the producer after the load) or when ``producer`` is None (the count is known)."""
    now = time.time()
    pipe = r.pipeline(transaction=False)
    pipe.zcount(f"saq:{QUEUE}:incomplete", 1, now - 0.005)
    pipe.llen(f"saq:{QUEUE}:queued")
    pipe.llen(f"saq:{QUEUE}:active")
    overdue, queued, active = pipe.execute()
    if producer is not None and (producer_metrics := producer.metrics()):
        produced = metric_sum(producer_metrics, "eventsched_events_produced_total")
    if consumer_metrics := consumer.metrics():
        consumed = metric_sum(consumer_metrics, "eventsched_events_consumed_total")
    return LagSample(
        t=now,
        produced=produced,
        consumed=consumed,
        due_not_started=int(overdue) + int(queued),
        active=int(active),
    )


def _lag_loop(
    stack: Stack, producer: Role, consumer: Role, stop: threading.Event, out: list[LagSample]
) -> None:
    produced = consumed = 0.0
    with stack.redis() as r:
        while not stop.wait(1.0):
            sample = _lag_sample(r, producer, consumer, produced, consumed)
            produced, consumed = sample.produced, sample.consumed
            out.append(sample)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (units per second)."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def run_pipeline(stack: Stack, sampler: Sampler, p: Pipeline, profiler: Profiler) -> dict[str, Any]:
    """Start the three roles, run the load, wait for every event, return the measurements."""
    consumer_settings = stack.settings(
        "consumer", **{"kafka.consumer_client": dict(FAST_GROUP_CONFIG)}, redis={"queue": QUEUE}
    )
    executor_settings = stack.settings(
        "executor", executor={"concurrency": p.concurrency}, redis={"queue": QUEUE}
    )
    producer_settings = stack.settings(
        "producer",
        producer={
            "rate": p.rate,
            "delay_min": f"{p.delay_min}s",
            "delay_max": f"{p.delay_max}s",
            "batch_size": 500,
        },
    )
    consumer = stack.role("consumer", consumer_settings)
    executor = stack.role("executor", executor_settings)
    consumer.wait_ready()
    executor.wait_ready()
    # Producing before the group join completes would make the first events late.
    consumer.wait_for(lambda x: x.get("event") == "kafka_partitions_assigned", 60)
    for role in (consumer, executor):
        sampler.track(role.name, role.pid)
    producer = stack.role("producer", producer_settings)
    producer.wait_ready()
    sampler.track("producer", producer.pid)
    started = stopped_at = time.time()
    sampler.mark("run_start")
    work_before = stack.server_stats()
    load_seconds = p.duration
    if p.profile:
        seconds = min(p.profile_seconds, p.duration)
        profiler.start("executor", executor.pid, seconds)
        profiler.start("consumer", consumer.pid, seconds)
    stop = threading.Event()
    lag_thread = threading.Thread(
        target=_lag_loop, args=(stack, producer, consumer, stop, p.samples), daemon=True
    )
    lag_thread.start()
    try:
        time.sleep(p.duration)
        sampler.mark("load_end")
        stopped_at = time.time()
        producer.stop()
        load_seconds = stopped_at - started
        line = producer.wait_for(lambda x: x.get("event") == "producer_stopped", 5)
        generated = int(line.get("generated", 0))
        log(f"producer generated {generated:,} events in {time.time() - started:.1f} s")
        finished = wait_for_count(
            lambda: executions_done([executor]),
            generated,
            stall=30,
            cap=p.delay_max + 60 + 3 * p.duration,
            what="every generated event ran",
        )
    finally:
        stop.set()
        lag_thread.join(5)
    # One more sample after the drain (a short run may end between two samples), with the
    # producer's own final count: its metrics are gone once it stopped.
    with stack.redis() as r:
        last = p.samples[-1] if p.samples else None
        p.samples.append(
            _lag_sample(r, None, consumer, float(generated), last.consumed if last else 0.0)
        )
    sampler.mark("run_end")
    memory = sampler.memory()
    time.sleep(1.2)  # PostgreSQL flushes its statistics about once a second
    work = stats_delta(work_before, stack.server_stats(), generated)
    consumer_metrics = consumer.metrics()
    codes = {role.name: role.stop() for role in (consumer, executor)}
    codes["producer"] = producer.proc.returncode
    attempts = read_attempts(stack)
    ingest = stack.sql(
        "SELECT extract(epoch FROM recorded_at - created_at)::float8 * 1000 FROM events"
        " WHERE kafka_topic IS NOT NULL"
    )
    for s in p.samples:
        if s.t >= stopped_at:  # the producer's /metrics is gone: its final count
            s.produced = generated
    lag = [(s.t - started, s.produced - s.consumed) for s in p.samples]
    during = [(t, v) for t, v in lag if t <= p.duration]
    steady = [(t, v) for t, v in during if t >= min(10.0, p.duration / 3)]
    slope = _slope(steady)
    backlog = [(s.t - started, float(s.due_not_started)) for s in p.samples]
    return {
        "generated": generated,
        "achieved_rate": round(generated / load_seconds, 1),
        "all_ran": finished,
        "statuses": status_counts(stack.dsn),
        "outcomes": dict(attempts.outcomes),
        "lateness_ms": lateness_summary(attempts.lateness_ms, attempts.early_by_timestamps),
        "early_by_lateness_ms": sum(1 for x in attempts.lateness_ms if x < 0),
        "lateness_by_second": lateness_timeline(attempts.scheduled, attempts.lateness_ms, started),
        "ingest_latency_ms": percentiles([r[0] for r in ingest]),
        "service_ms": percentiles(attempts.service_ms),
        "server_work": work,
        "consumer_ingest_latency_histogram": {
            k: v
            for k, v in consumer_metrics.items()
            if k.startswith("eventsched_ingest_latency_seconds")
        },
        "lag": {
            "max": max((v for _, v in lag), default=0.0),
            "last": during[-1][1] if during else 0.0,
            "after_drain": lag[-1][1] if lag else 0.0,
            "slope_per_s": round(slope, 2),
            "growing": slope > 0.01 * p.rate,
            "executor_backlog_max": max((v for _, v in backlog), default=0.0),
            "executor_backlog_slope_per_s": round(
                _slope([(t, v) for t, v in backlog if t <= p.duration]), 2
            ),
        },
        "cpu_load": sampler.cpu_between("run_start", "load_end"),
        "memory": memory,
        "exit_codes": codes,
        "_lateness": attempts.lateness_ms,
        "_lag": lag,
        "_backlog": backlog,
        "_started": started,
    }
