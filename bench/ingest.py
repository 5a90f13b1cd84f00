"""Target 3 — ingest throughput: Kafka -> PostgreSQL + SAQ jobs in Redis, offsets committed.

N events (v1 wire format, due an hour out so nothing executes) are produced into the
3-partition ``events`` topic first. Then one consumer process starts
(``python -m eventsched run --role consumer``) and works through the backlog: decode, one
``INSERT ... unnest`` per batch, one pipelined enqueue, commit. The harness polls the
group's committed offsets (a separate, never-joining consumer's ``committed()``) every
0.25 s; when they reach N it checks PostgreSQL (rows, ``recorded_at``) and Redis (jobs).

Throughput = N / (all offsets committed - first row recorded); also given from the spread
of ``recorded_at`` and from the committed-offset curve's steady part.

Target: >= 20,000 events/s for one consumer process (200,000 events pre-loaded).

    python -m bench.ingest                 # full: 200,000 events
    python -m bench.ingest --quick         # CI: 5,000 events
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from bench.profiling import Profiler
from bench.report import pyplot, verdict
from bench.run import BenchRun, log, noise, parse_args, step
from bench.sampling import Sampler
from bench.stack import Stack
from bench.stats import stats_delta
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event
from tests.support.clients import FAST_GROUP_CONFIG
from tests.support.metrics import metric_sum

TARGET = 20_000.0
TOPIC = "events"
GROUP = "eventsched-consumer"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=None, help="events (200000; quick 5000)")
    parser.add_argument(
        "--max-batch", type=int, default=1000, help="consumer.max_batch (the default setting)"
    )
    parser.add_argument("--profile-seconds", type=float, default=10.0)


def preload(bootstrap: str, count: int, topic: str = TOPIC) -> dict[str, Any]:
    """Produce ``count`` events (keys spread over the partitions), wait for every report."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1_000_000})
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            errors.append(err.str())

    due = datetime.now(UTC) + timedelta(hours=1)
    headers: list[tuple[str, str | bytes | None]] = list(kafka_headers())
    began = time.time()
    for i in range(count):
        event = new_event(
            "bench.event", {"n": i, "bench": "ingest"}, due + timedelta(milliseconds=i % 1000)
        )
        while True:
            try:
                producer.produce(
                    topic,
                    encode_event(event),
                    kafka_key(event),
                    headers=headers,
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if errors or left:
        raise RuntimeError(f"preload failed: {left} undelivered, errors {errors[:3]}")
    return {"count": count, "seconds": round(time.time() - began, 3)}


class CommitWatcher:
    """Reads the consumer group's committed offsets without joining the group."""

    def __init__(
        self, bootstrap: str, topic: str = TOPIC, group: str = GROUP, partitions: int = 3
    ) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                **FAST_GROUP_CONFIG,
            }
        )
        self._partitions = [TopicPartition(topic, p) for p in range(partitions)]

    def committed(self) -> int:
        try:
            parts = self._consumer.committed(self._partitions, timeout=5)
        except Exception:  # the group may not exist yet
            return 0
        return sum(max(0, tp.offset) for tp in parts)

    def close(self) -> None:
        self._consumer.close()


def main() -> None:
    args = parse_args(__doc__ or "", add_args)
    run = BenchRun("ingest", args)
    count = args.count or (5000 if args.quick else 200_000)
    sampler = Sampler().start()
    series: list[tuple[float, int]] = []
    try:
        with Stack(run) as stack:
            sampler.track_servers(stack.server_pids())
            with step(f"producing {count:,} events into {TOPIC}"):
                produced = preload(stack.kafka, count)
            settings = stack.settings(
                "consumer",
                **{"kafka.consumer_client": dict(FAST_GROUP_CONFIG)},
                consumer={"max_batch": args.max_batch},
                redis={"queue": "ingest"},
            )
            consumer = stack.role("consumer", settings)
            consumer.wait_ready()
            sampler.track("consumer", consumer.pid)
            profiler = Profiler(run)
            if args.profile:
                profiler.start("consumer", consumer.pid, args.profile_seconds)
            watcher = CommitWatcher(stack.kafka)
            sampler.mark("start")
            work_before = stack.server_stats()
            deadline = time.time() + 60 + count / 1000
            done_at = None
            try:
                while time.time() < deadline:
                    committed = watcher.committed()
                    series.append((time.time(), committed))
                    if committed >= count:
                        done_at = time.time()
                        break
                    time.sleep(0.25)
            finally:
                watcher.close()
            sampler.mark("end")
            time.sleep(1.2)  # PostgreSQL flushes its statistics about once a second
            work = stats_delta(work_before, stack.server_stats(), count)
            metrics = consumer.metrics()
            memory = sampler.memory().get("consumer", {})
            code = consumer.stop()
            rows = stack.sql(
                "SELECT count(*), extract(epoch FROM min(recorded_at))::float8,"
                " extract(epoch FROM max(recorded_at))::float8 FROM events"
            )[0]
            with stack.redis() as r:
                jobs = int(r.zcard("saq:ingest:incomplete"))
            profile = profiler.finish()
    finally:
        sampler.stop()

    n_rows, first_rec, last_rec = int(rows[0]), rows[1] or 0.0, rows[2] or 0.0
    committed_final = series[-1][1] if series else 0
    rate_commit = count / (done_at - first_rec) if done_at and first_rec else 0.0
    rate_pg = (n_rows - 1) / (last_rec - first_rec) if n_rows > 1 and last_rec > first_rec else 0.0
    # Steady part: between 10% and 90% of the committed offsets.
    lo = next((s for s in series if s[1] >= 0.1 * count), None)
    hi = next((s for s in series if s[1] >= 0.9 * count), None)
    rate_mid = (hi[1] - lo[1]) / (hi[0] - lo[0]) if lo and hi and hi[0] > lo[0] else 0.0
    cpu = sampler.cpu_between("start", "end")
    consumer_cpu = cpu["cpu_s"].get("consumer", 0.0)
    ok_data = n_rows == count and jobs == count and committed_final >= count
    met = ok_data and rate_commit >= TARGET
    table = [
        ["metric", "value", "target", "verdict"],
        ["events in PostgreSQL / SAQ jobs in Redis / offsets committed", f"{n_rows:,} / {jobs:,} / {committed_final:,} of {count:,}", "all", verdict(ok_data)],
        ["ingest rate, first row recorded → all offsets committed", f"{rate_commit:,.0f}/s", "≥ 20,000/s", verdict(rate_commit >= TARGET)],
        ["ingest rate, spread of recorded_at", f"{rate_pg:,.0f}/s", "", ""],
        ["ingest rate, committed offsets 10% → 90%", f"{rate_mid:,.0f}/s", "", ""],
        ["consumer CPU (µs/event; cores)", f"{1e6 * consumer_cpu / max(1, count):,.0f}; {cpu['cores'].get('consumer', 0):.2f}", "", ""],
        ["consumer RSS peak (VmHWM MB)", f"{memory.get('hwm_mb', 0):.0f}", "≤ 100 MB", verdict(memory.get("hwm_mb", 1e9) <= 100)],
    ]  # fmt: skip
    servers = ", ".join(f"{k} {v:.2f}" for k, v in cpu["cores"].items())
    notes = [
        f"{count:,} events pre-loaded in 3 partitions ({produced['seconds']:.1f} s to produce); one consumer process, "
        f"max_batch {args.max_batch}; PostgreSQL {'without fsync (--fast-stack)' if args.fast_stack else 'as `eventsched dev` (fsync on)'}",
        f"CPU cores while ingesting: {servers}; {noise(cpu)}",
        f"target 3 (≥ 20,000 events/s into PostgreSQL + Redis, offsets committed): {verdict(met)}",
    ]
    results = {
        "count": count,
        "target_met": met,
        "produced": produced,
        "rows": n_rows,
        "jobs": jobs,
        "committed": committed_final,
        "rate_commit_per_s": round(rate_commit, 1),
        "rate_recorded_at_per_s": round(rate_pg, 1),
        "rate_steady_per_s": round(rate_mid, 1),
        "cpu": cpu,
        "memory": memory,
        "exit_code": code,
        "server_work": work,
        "consumer_metrics": {
            "consumed": metric_sum(metrics, "eventsched_events_consumed_total"),
            "batches": metrics.get("eventsched_consumer_batch_messages_count", 0.0),
            "batch_size_sum": metrics.get("eventsched_consumer_batch_messages_sum", 0.0),
        },
        "profile": profile,
        "series": [(round(t - series[0][0], 3), c) for t, c in series] if series else [],
    }

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4))
        if series:
            ax.plot(
                [t - series[0][0] for t, _ in series],
                [c for _, c in series],
                label="committed offsets",
            )
        ax.axhline(count, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("seconds since the consumer was ready")
        ax.set_ylabel("events committed")
        ax.set_title(f"one consumer ingesting {count:,} events: {rate_commit:,.0f}/s")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    log(f"consumer ingested {n_rows:,} rows at {rate_commit:,.0f}/s")
    run.finish(results, table, notes, plot=plot)


if __name__ == "__main__":
    main()
