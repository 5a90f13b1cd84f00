"""Capacity: what one event costs each component, measured at a steady rate.

Phases, on one embedded stack (PostgreSQL restarted once with ``pg_stat_statements``):

1. **pipeline**: the producer role at ``--rate`` events/s for ``--duration`` s, due 1-2 s
   out, through one consumer and one executor, whose handler is ``simulate`` without its
   sleep and with ``--error-rate`` failures (the retries of the sizing, retried like any
   failure). The window runs from just before the producer starts until every event has
   its final outcome. Per event: CPU seconds of each role and of each server's process tree
   (``/proc``; "marginal" subtracts what the process used idle, measured for ``IDLE_S`` s
   before the load), PostgreSQL statements (``pg_stat_statements``; rows per call is the
   batch size each statement ran at), WAL bytes (``pg_current_wal_lsn()``), table + index
   bytes (``pg_total_relation_size`` over the table's partitions), Redis commands (``INFO
   commandstats``) and CPU (``INFO cpu``), Kafka bytes (the topic's records read back).
   Then the same at each of ``--also-rates``: how the costs per event move with the load.
2. **pending**: ``--pending`` events due hours out through ``bench.feeder backlog`` (the
   consumer's rows and enqueue path): Redis ``used_memory`` and PostgreSQL bytes per
   pending event.
3. **api**: one api process, ``POST /v1/events`` back to back on 8 connections, then at a
   fixed 200/s: the api's CPU per acknowledged event.
4. **scaling** (skipped with ``--no-scaling``): ``--ingest-count`` pre-loaded events
   ingested by 1 and then 2 consumer processes (3 partitions), and ``--drain-count`` events
   due at once drained by 1 and then 2 executor processes (``bench.throughput``'s phase):
   the points ``bench/capacity_sim.py`` is checked against.

CPU time and bytes per event stay meaningful on a machine other work shares (a process's
CPU time is its own); latencies do not, so none is reported, and each scaling rate is given
with the CPU other processes used during its window.

    python -m bench.capacity                   # full: 800 events/s for 25 s (also 200 and
                                               # 2,000), then phases 2-4
    python -m bench.capacity --quick           # checks it runs (about a minute)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import trio

from bench.api import TOKEN, closed_loop, open_loop
from bench.capacity_counters import (
    TABLES,
    enable_statements,
    redis_calls,
    redis_counters,
    server_work,
    snapshot,
    statements,
)
from bench.ingest import CommitWatcher, preload
from bench.run import BenchRun, log, noise, parse_args, step
from bench.sampling import Sampler
from bench.stack import RECOMMENDED_CONCURRENCY, Stack, executions_done
from bench.stats import wait_for_count
from bench.throughput import run_ours
from eventsched.core.jobqueue.shards import shard_of
from eventsched.core.kafka import ensure_topics
from tests.support.clients import FAST_GROUP_CONFIG, read_topic
from tests.support.metrics import metric_sum
from tests.support.proc import free_port

SIMULATE = "eventsched.plugins.handlers:simulate"
QUEUE = "capacity"
#: Seconds the roles are watched idle before the load (their fixed cost per second).
IDLE_S = 5.0


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=None, help="events/s (800; quick 200)")
    parser.add_argument("--duration", type=float, default=None, help="s (25; quick 3)")
    parser.add_argument("--error-rate", type=float, default=0.1, help="handler failures (0.1)")
    parser.add_argument("--pending", type=int, default=None, help="pending jobs (50000; 500)")
    parser.add_argument("--api-seconds", type=float, default=None, help="per api phase (8; 1)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1 -> 2 points")
    parser.add_argument("--ingest-count", type=int, default=None, help="(100000; quick 2000)")
    parser.add_argument("--drain-count", type=int, default=None, help="(30000; quick 400)")
    parser.add_argument(
        "--drain-shards",
        default="1,2",
        help="Redis servers of the 1 -> 2 executor points, comma-separated: each count is a "
        "pair of points (1,2: one Redis, then two shards)",
    )
    parser.add_argument(
        "--scaling-only", action="store_true", help="only the 1 -> 2 points (phase 4)"
    )
    parser.add_argument(
        "--also-rates",
        default=None,
        help="more pipeline rates, comma-separated: how the costs per event move with the "
        "load (200,2000; quick none)",
    )
    parser.add_argument("--concurrency", type=int, default=RECOMMENDED_CONCURRENCY)
    # The `log` handler's line per event is the handler's cost, not the scheduler's.
    parser.set_defaults(log_level="warning")


# -- phase 1: the pipeline


def pipeline(
    run: BenchRun, stack: Stack, sampler: Sampler, rate: float, duration: float
) -> dict[str, Any]:
    args = run.args
    group = {"kafka.consumer_client": dict(FAST_GROUP_CONFIG)}
    consumer = stack.role("consumer", stack.settings("consumer", **group, redis={"queue": QUEUE}))
    executor_settings = stack.settings(
        "executor",
        executor={
            "concurrency": args.concurrency,
            "simulate": {"duration": "0s", "error_rate": args.error_rate},
            "retry_backoff": {"base": "500ms", "max": "2s"},
        },
        handlers={"default": SIMULATE},
        redis={"queue": QUEUE},
    )
    executor = stack.role("executor", executor_settings)
    producer_settings = stack.settings(
        "producer",
        producer={"rate": rate, "delay_min": "1s", "delay_max": "2s", "batch_size": 500},
    )
    for role in (consumer, executor):
        role.wait_ready()
        sampler.track(role.name, role.pid)
    consumer.wait_for(lambda x: x.get("event") == "kafka_partitions_assigned", 60)
    with step(f"idle baseline, {IDLE_S:g} s"):
        sampler.mark("idle_start")
        time.sleep(IDLE_S)
        sampler.mark("idle_end")
    before = snapshot(stack)
    stack.sql("SELECT pg_stat_statements_reset()")
    sampler.mark("pipe_start")
    producer = stack.role("producer", producer_settings)
    with step(f"producer at {rate:,.0f}/s for {duration:g} s, then the drain"):
        producer.wait_ready()
        time.sleep(duration)
        producer.stop()
        line = producer.wait_for(lambda x: x.get("event") == "producer_stopped", 5)
        generated = int(line.get("generated", 0))
        all_ran = wait_for_count(
            lambda: executions_done([executor]), generated, stall=30, cap=120 + duration,
            what="every event has its final outcome",
        )  # fmt: skip
    sampler.mark("pipe_end")
    time.sleep(1.2)  # PostgreSQL flushes its statistics about once a second
    after = snapshot(stack)
    stmts = statements(stack)
    consumer_m, executor_m = consumer.metrics(), executor.metrics()
    for role in (consumer, executor):
        role.stop()
    attempts = stack.sql("SELECT count(*) FROM event_attempts")[0][0]
    records = read_topic(stack.kafka, "events", timeout=60)
    kafka_bytes = sum(
        len(r.key or b"") + len(r.value or b"")
        + sum(len(k) + len(v or b"") for k, v in r.header_list)
        for r in records
    )  # fmt: skip
    return {
        "generated": generated,
        "all_ran": all_ran,
        "attempts": int(attempts),
        "outcomes": {
            o: metric_sum(executor_m, "eventsched_executions_total", outcome=o)
            for o in ("succeeded", "retried", "dead")
        },
        "cpu": sampler.cpu_between("pipe_start", "pipe_end"),
        "idle": sampler.cpu_between("idle_start", "idle_end"),
        "before": before,
        "after": after,
        "statements": stmts,
        "redis_calls": redis_calls(before, after),
        "consumer_batch_mean": (
            consumer_m.get("eventsched_consumer_batch_size_sum", 0.0)
            / max(1.0, consumer_m.get("eventsched_consumer_batch_size_count", 0.0))
        ),
        "kafka": {"records": len(records), "bytes": kafka_bytes},
    }


# -- phase 2: pending jobs


def pending(stack: Stack, count: int) -> dict[str, Any]:
    before = snapshot(stack)
    feeder = stack.helper(
        "pending", "bench.feeder",
        ["backlog", "--dsn", stack.dsn, "--redis", stack.redis_url, "--queue", "pending",
         "--count", str(count), "--delay-min", "3600", "--delay-max", "7200"],
    )  # fmt: skip
    with step(f"{count:,} pending events"):
        feeder.wait(600)
    after = snapshot(stack)
    return {
        "count": count,
        "redis_bytes_per_job": (after["redis_used_memory"] - before["redis_used_memory"]) / count,
        "events_bytes_per_event": (after["size.events"] - before["size.events"]) / count,
        "events_index_bytes_per_event": (
            after["size.events.indexes"] - before["size.events.indexes"]
        )
        / count,
    }


# -- phase 3: the api


def api(stack: Stack, sampler: Sampler, seconds: float) -> dict[str, Any]:
    port = free_port()
    settings = stack.settings("api", api={"port": port})
    with settings.open("a") as f:  # a token is a table: write_settings writes scalars
        f.write(f'\n[[default.api.tokens]]\nname = "bench"\ntoken = "{TOKEN}"\n')
    role = stack.role("api", settings)
    role.wait_ready()
    sampler.track_cpu("api", role.pid)
    trio.run(closed_loop, "127.0.0.1", port, 4, 1.0)  # warm-up: metadata, connections
    out: dict[str, Any] = {}
    for name, run_phase in (
        (
            "closed loop, 8 connections",
            lambda: trio.run(closed_loop, "127.0.0.1", port, 8, seconds),
        ),
        ("fixed 200/s", lambda: trio.run(open_loop, "127.0.0.1", port, 200.0, seconds)),
    ):
        sampler.mark(f"api_{name}_start")
        result = run_phase()
        sampler.mark(f"api_{name}_end")
        cpu = sampler.cpu_between(f"api_{name}_start", f"api_{name}_end")
        acked = int(result["acknowledged"])
        out[name] = {
            "acknowledged": acked,
            "statuses": result["statuses"],
            "api_cpu_us_per_event": 1e6 * cpu["cpu_s"].get("api", 0.0) / max(1, acked),
            "kafka_cpu_us_per_event": 1e6 * cpu["cpu_s"].get("kafka", 0.0) / max(1, acked),
            "cpu": cpu,
        }
    role.stop()
    return out


# -- phase 4: 1 -> 2 consumers and executors


def ingest_point(
    run: BenchRun, stack: Stack, sampler: Sampler, consumers: int, count: int
) -> dict[str, Any]:
    """``count`` events pre-loaded in a fresh 3-partition topic, ingested by ``consumers``."""
    stack.sql("TRUNCATE events, event_attempts, event_keys, event_commands")
    topic, group = f"ingest{consumers}", f"capacity-ingest{consumers}"
    ensure_topics(stack.kafka, {topic: 3})
    with step(f"producing {count:,} events into {topic}"):
        preload(stack.kafka, count, topic)
    settings = stack.settings(
        f"consumer-{topic}",
        kafka={"topic": topic, "consumer_group": group},
        consumer={"max_batch": 2000},
        redis={"queue": topic},
        **{"kafka.consumer_client": dict(FAST_GROUP_CONFIG)},
    )
    roles = [stack.role("consumer", settings, index=10 * consumers + i) for i in range(consumers)]
    watcher = CommitWatcher(stack.kafka, topic, group)
    for role in roles:
        role.wait_ready()
        sampler.track(role.name, role.pid)
    before = snapshot(stack)
    stack.sql("SELECT pg_stat_statements_reset()")
    sampler.mark(f"{topic}_start")
    done_at = None
    deadline = time.time() + 60 + count / 1000
    try:
        while time.time() < deadline:
            if watcher.committed() >= count:
                done_at = time.time()
                break
            time.sleep(0.1)
    finally:
        watcher.close()
    sampler.mark(f"{topic}_end")
    time.sleep(1.2)  # PostgreSQL flushes its statistics about once a second
    work = server_work(stack, before, count)
    for role in roles:
        role.stop()
    rows, first = stack.sql(
        "SELECT count(*), extract(epoch FROM min(recorded_at))::float8 FROM events"
    )[0]
    rate = count / (done_at - first) if done_at and first else 0.0
    cpu = sampler.cpu_between(f"{topic}_start", f"{topic}_end")
    log(f"{consumers} consumer(s): {rate:,.0f} events/s ({noise(cpu)})")
    return {
        "consumers": consumers,
        "count": count,
        "rows": int(rows),
        "per_s": round(rate, 1),
        "cpu": cpu,
        "work": {**work, "cpu_us": {k: 1e6 * v / count for k, v in cpu["cpu_s"].items()}},
    }


def drain_point(
    run: BenchRun, stack: Stack, sampler: Sampler, executors: int, count: int, shards: int = 1
) -> dict[str, Any]:
    """``count`` events due at once drained by ``executors`` processes; with ``shards`` > 1
    their jobs are spread over that many Redis servers (:meth:`Stack.add_redis_shards`),
    every executor serving all of them, and each shard's work is given per event."""
    lead = 3.0 if run.quick else 10.0
    urls = stack.redis_urls[:shards]
    before = snapshot(stack)
    shard_before = [redis_counters(stack, url) for url in urls]
    stack.sql("SELECT pg_stat_statements_reset()")
    r = run_ours(run, stack, sampler, count, lead, executors, redis_shards=urls)
    # The window includes the feeder's COPY (left out of the statements) and its jobs.
    r["work"] = server_work(stack, before, count)
    r["work"]["cpu_us"] = {k: 1e6 * v / count for k, v in r["cpu"]["cpu_s"].items()}
    r["shards"] = shard_work(stack, urls, shard_before, r["cpu"], count)
    r["work"]["redis_commands"] = sum(s["redis_commands"] for s in r["shards"])
    keep = (
        "work",
        "processes",
        "count",
        "all_finished",
        "throughput_finished",
        "executor_cpu_ms_per_job",
        "cpu",
        "outcomes",
        "shards",
    )
    log(
        f"{executors} executor(s), {shards} Redis: {r['throughput_finished']['per_s']:,.0f}/s "
        f"({noise(r['cpu'])})"
    )
    return {k: r[k] for k in keep}


def shard_work(
    stack: Stack,
    urls: list[str],
    before: list[dict[str, float]],
    cpu: dict[str, Any],
    count: int,
) -> list[dict[str, Any]]:
    """Each Redis shard's part of a drain: its events (by :func:`shard_of` of the ids in
    PostgreSQL), commands and ``INFO cpu`` per event of the whole drain (both include the
    feeder's enqueue), and its process's CPU (``/proc``) in the drain window per event."""
    ids = [row[0] for row in stack.sql("SELECT id::text FROM events")]
    homes = [shard_of(i, len(urls)) for i in ids]
    n = max(1, count)
    out = []
    for index, (url, b) in enumerate(zip(urls, before, strict=True)):
        a = redis_counters(stack, url)
        calls = redis_calls(b, a)
        name = "redis" if index == 0 else f"redis{index}"
        own = max(1, homes.count(index))
        out.append(
            {
                "shard": index,
                "events": homes.count(index),
                # The same per event whose jobs live on this shard (one Redis's figure).
                "redis_commands_own": sum(calls.values()) / own,
                "redis_cpu_us_own": 1e6 * cpu["cpu_s"].get(name, 0.0) / own,
                "redis_commands": sum(calls.values()) / n,
                "redis_commands_by_name": {k: v / n for k, v in list(calls.items())[:6]},
                "redis_cpu_us_info": 1e6 * (a["redis_cpu_s"] - b["redis_cpu_s"]) / n,
                "redis_cpu_us": 1e6 * cpu["cpu_s"].get(name, 0.0) / n,
                "redis_cores": cpu["cores"].get(name, 0.0),
            }
        )
    return out


# -- per-event figures and the record


def per_event(p: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's counters divided by the events it carried."""
    n = max(1, p["generated"])
    cpu, idle = p["cpu"], p["idle"]
    wall = cpu["wall_s"]
    b, a = p["before"], p["after"]

    def delta(key: str) -> float:
        return a.get(key, 0.0) - b.get(key, 0.0)

    gross = {k: 1e6 * v / n for k, v in cpu["cpu_s"].items()}
    marginal = {
        k: 1e6 * max(0.0, v - idle["cores"].get(k, 0.0) * wall) / n for k, v in cpu["cpu_s"].items()
    }
    stmts = p["statements"]
    calls = sum(s["calls"] for s in stmts)
    control = sum(s["calls"] for s in stmts if s["control"])
    sizes = {t: delta(f"size.{t}") / n for t in TABLES}
    return {
        "events": n,
        "attempts_per_event": p["attempts"] / n,
        "cpu_us_gross": gross,
        "cpu_us_marginal": marginal,
        "idle_cores": idle["cores"],
        "pg_statements": calls / n,
        "pg_statements_data": (calls - control) / n,
        "pg_transactions": delta("pg.commits") / n,
        "pg_wal_bytes": delta("pg.wal_lsn") / n,
        "pg_wal_full_page_images": delta("pg.wal_fpi") / n,
        "pg_rows_updated": delta("pg.tup_updated") / n,
        "pg_hot_update_share": delta("pg.tup_hot_updated") / max(1.0, delta("pg.tup_updated")),
        "pg_table_bytes": sizes,
        "pg_index_bytes": {t: delta(f"size.{t}.indexes") / n for t in TABLES},
        "redis_commands": sum(p["redis_calls"].values()) / n,
        "redis_commands_by_name": {k: v / n for k, v in list(p["redis_calls"].items())[:8]},
        "redis_cpu_us_info": 1e6 * delta("redis_cpu_s") / n,
        "kafka_bytes": p["kafka"]["bytes"] / max(1, p["kafka"]["records"]),
        "top_statements": [
            {**s, "per_event": s["calls"] / n, "rows_per_call": s["rows"] / max(1, s["calls"])}
            for s in stmts
            if not s["control"]
        ][:8],
    }


def table_rows(
    e: dict[str, Any], pend: dict[str, Any], api_r: dict[str, Any], scaling: dict[str, Any]
) -> list[list[str]]:
    g, m = e["cpu_us_gross"], e["cpu_us_marginal"]

    def us(name: str) -> str:
        return f"{m.get(name, 0):,.0f} ({g.get(name, 0):,.0f})"

    tb, ib = e["pg_table_bytes"], e["pg_index_bytes"]
    rows = [
        ["component", "cost per event", "how"],
        ["consumer CPU", f"{us('consumer')} µs", "marginal (gross, idle included), /proc"],
        [
            "executor CPU",
            f"{us('executor')} µs",
            f"{e['attempts_per_event']:.3f} attempts per event",
        ],
        ["PostgreSQL CPU (all its processes)", f"{us('postgres')} µs", "/proc, process tree"],
        [
            "Redis CPU",
            f"{us('redis')} µs; INFO cpu {e['redis_cpu_us_info']:,.0f} µs",
            "/proc; INFO cpu",
        ],
        ["broker CPU (Tansu, in memory)", f"{us('kafka')} µs", "not a Kafka's cost"],
    ]
    for name, a in api_r.items():
        rows.append(
            [
                f"api CPU, POST /v1/events, {name}",
                f"{a['api_cpu_us_per_event']:,.0f} µs",
                f"{a['acknowledged']:,} acknowledged",
            ]
        )
    top = "; ".join(
        f"{s['per_event']:.2f}x `{s['query'][:40]}…` ({s['rows_per_call']:.0f} rows/call)"
        for s in e["top_statements"][:4]
    )
    rows += [
        [
            "PostgreSQL statements",
            f"{e['pg_statements_data']:.3f} ({e['pg_statements']:.3f} with BEGIN/COMMIT/SET)",
            top,
        ],
        ["PostgreSQL transactions", f"{e['pg_transactions']:.3f}", "pg_stat_database xact_commit"],
        [
            "PostgreSQL WAL",
            f"{e['pg_wal_bytes']:,.0f} B",
            f"pg_current_wal_lsn() difference; {e['pg_wal_full_page_images']:.3f} full-page images per event",
        ],
        [
            "PostgreSQL rows updated (dead tuples for vacuum)",
            f"{e['pg_rows_updated']:.2f}",
            f"{e['pg_hot_update_share']:.0%} of them HOT (no index entry)",
        ],
        [
            "table + index bytes, event pending (no attempt)",
            f"{pend['events_bytes_per_event']:,.0f} B ({pend['events_index_bytes_per_event']:,.0f} B indexes)",
            f"{pend['count']:,} events loaded, never updated",
        ],
        [
            "table + index bytes, event run (events row)",
            f"{tb['events']:,.0f} B ({ib['events']:,.0f} B indexes)",
            "after its status updates, before vacuum",
        ],
        [
            "table + index bytes, attempts",
            f"{tb['event_attempts']:,.0f} B ({ib['event_attempts']:,.0f} B indexes)",
            "event_attempts rows of the event",
        ],
        [
            "table + index bytes, event run with attempts",
            f"{sum(tb.values()):,.0f} B",
            "all tables",
        ],
        [
            "Redis commands",
            f"{e['redis_commands']:.2f}",
            ", ".join(f"{k} {v:.2f}" for k, v in list(e["redis_commands_by_name"].items())[:5])
            + " (commands inside scripts counted too)",
        ],
        [
            "Redis memory per pending job",
            f"{pend['redis_bytes_per_job']:,.0f} B",
            "INFO memory used_memory, pending vs before",
        ],
        [
            "Kafka record bytes",
            f"{e['kafka_bytes']:,.0f} B",
            "key + value + headers, no batch overhead, one replica",
        ],
    ]
    return rows + scaling_rows(scaling)


def shard_key(shards: int) -> str:
    """The key of the executor points with ``shards`` Redis servers in ``scaling``."""
    return "executors" if shards == 1 else f"executors_{shards}shards"


def scaling_rows(scaling: dict[str, Any]) -> list[list[str]]:
    """The 1 -> 2 points: costs at full batches, rates, and each Redis shard's part."""
    rows: list[list[str]] = []
    sat = [(k, scaling[k][0]["work"]) for k in ("consumers", "executors") if scaling.get(k)]
    if sat:
        label = " / ".join(
            "ingest, 1 consumer" if k == "consumers" else "drain, 1 executor" for k, _ in sat
        )
        rows += [
            [
                f"PostgreSQL statements at full batches ({label})",
                " / ".join(f"{w['pg_statements_data']:.4f}" for _, w in sat),
                "; ".join(
                    f"{t['per_event']:.4f}x `{t['query'][:30]}…` ({t['rows_per_call']:.0f} rows/call)"
                    for _, w in sat
                    for t in w["top_statements"][:2]
                ),
            ],
            [
                f"PostgreSQL WAL at full batches ({label})",
                " / ".join(f"{w['pg_wal_bytes']:,.0f} B" for _, w in sat),
                "the drain's window includes loading its rows (COPY)",
            ],
            [
                f"PostgreSQL CPU at full batches ({label})",
                " / ".join(f"{w['cpu_us'].get('postgres', 0):,.0f} µs" for _, w in sat),
                "/proc, process tree",
            ],
            [
                f"Redis commands at full batches ({label})",
                " / ".join(f"{w['redis_commands']:.2f}" for _, w in sat),
                "the drain's window includes its jobs' enqueue",
            ],
        ]
    for kind, points in scaling.items():
        for pt in points:
            consumers = kind == "consumers"
            rate = pt["per_s"] if consumers else pt["throughput_finished"]["per_s"]
            n = pt["consumers"] if consumers else pt["processes"]
            ratio = ""
            if len(points) == 2 and pt is points[1]:
                first = (
                    points[0]["per_s"] if consumers else points[0]["throughput_finished"]["per_s"]
                )
                ratio = f"; {rate / max(1e-9, first):.2f}x one"
            if consumers:
                rows.append([
                    f"ingest (pre-loaded, 3 partitions), {n} consumer{'s' if n > 1 else ''}",
                    f"{rate:,.0f}/s{ratio}", noise(pt["cpu"]),
                ])  # fmt: skip
                continue
            shards = len(pt.get("shards", [])) or 1
            what = f"drain (all due at once), {shards} Redis, {n} executor{'s' if n > 1 else ''}"
            rows.append([what, f"{rate:,.0f}/s{ratio}", noise(pt["cpu"])])
            cpu_us = pt["work"]["cpu_us"]
            executor_us = sum(v for k, v in cpu_us.items() if k.startswith("executor"))
            redis_us = [v for k, v in sorted(cpu_us.items()) if k.startswith("redis")]
            rows.append([
                f"{what}: CPU per event, executors / PostgreSQL / Redis",
                f"{executor_us:,.0f} / {cpu_us.get('postgres', 0):,.0f} / "
                + " + ".join(f"{v:,.0f}" for v in redis_us) + " µs",
                "/proc in the drain window (from the due time to the last outcome); "
                + ", ".join(f"{k} {v:.2f}" for k, v in pt["cpu"]["cores"].items()) + " cores",
            ])  # fmt: skip
            if shards > 1:
                for sh in pt["shards"]:
                    rows.append([
                        f"{what}: Redis shard {sh['shard']} per event",
                        f"{sh['redis_commands']:.2f} commands, {sh['redis_cpu_us']:,.0f} µs CPU "
                        f"(INFO cpu {sh['redis_cpu_us_info']:,.0f} µs); per event on the shard "
                        f"{sh['redis_commands_own']:.2f} and {sh['redis_cpu_us_own']:,.0f} µs",
                        f"{sh['events']:,} of the events; per event of the whole drain; "
                        "commands and INFO cpu include the enqueue, /proc CPU is the drain "
                        "window's; " + ", ".join(
                            f"{k} {v:.2f}" for k, v in list(sh["redis_commands_by_name"].items())[:4]
                        ),
                    ])  # fmt: skip
    return rows


def rate_rows(by_rate: dict[float, dict[str, Any]]) -> list[list[str]]:
    """One row per pipeline rate: how the per-event costs move with the load."""
    rows = []
    for rate in sorted(by_rate):
        e = by_rate[rate]
        m = e["cpu_us_marginal"]
        claims = [s["rows_per_call"] for s in e["top_statements"] if s["query"].startswith("WITH")]
        rows.append([
            f"at {rate:,.0f} events/s: CPU µs consumer / executor / PostgreSQL / Redis",
            " / ".join(f"{m.get(k, 0):,.0f}" for k in ("consumer", "executor", "postgres", "redis")),
            f"{e['pg_statements_data']:.3f} statements, {e['pg_wal_bytes']:,.0f} B WAL, "
            f"{e['redis_commands']:.1f} Redis commands per event; executor statements of "
            + " and ".join(f"{c:.0f}" for c in claims[:2]) + " events",
        ])  # fmt: skip
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], add_args)
    quick = args.quick
    rate = args.rate or (200.0 if quick else 800.0)
    duration = args.duration or (3.0 if quick else 25.0)
    drain_shards = [int(x) for x in args.drain_shards.split(",") if x.strip()]
    if args.scaling_only and args.no_scaling:
        raise SystemExit("--scaling-only and --no-scaling: nothing to run")
    if any(n < 1 for n in drain_shards):
        raise SystemExit(f"--drain-shards {args.drain_shards}: counts of 1 or more")
    run = BenchRun("capacity", args)
    sampler = Sampler().start()
    scaling: dict[str, Any] = {}
    try:
        with Stack(run) as stack:
            with step("PostgreSQL restarted with pg_stat_statements"):
                enable_statements(stack)
            if not args.no_scaling and max(drain_shards, default=1) > 1:
                with step(f"{max(drain_shards)} Redis shards"):
                    stack.add_redis_shards(max(drain_shards))
            sampler.track_servers(stack.server_pids())
            if not args.scaling_only:
                p = pipeline(run, stack, sampler, rate, duration)
                also = (
                    args.also_rates
                    if args.also_rates is not None
                    else ("" if quick else "200,2000")
                )
                by_rate = {
                    r: per_event(pipeline(run, stack, sampler, r, duration))
                    for r in (float(x) for x in also.split(",") if x.strip())
                }
                pend = pending(stack, args.pending or (500 if quick else 50_000))
                api_r = api(stack, sampler, args.api_seconds or (1.0 if quick else 8.0))
            if not args.no_scaling:
                ingest_n = args.ingest_count or (2000 if quick else 100_000)
                drain_n = args.drain_count or (400 if quick else 30_000)
                scaling["consumers"] = [
                    ingest_point(run, stack, sampler, k, ingest_n) for k in (1, 2)
                ]
                for shards in drain_shards:
                    scaling[shard_key(shards)] = [
                        drain_point(run, stack, sampler, k, drain_n, shards) for k in (1, 2)
                    ]
    finally:
        sampler.stop()
    scaling_note = (
        f"scaling: 1 and 2 executors drain {drain_n:,} events due at once with "
        + " and then ".join(f"{n} Redis server{'s' if n > 1 else ''}" for n in drain_shards)
        + " (2 or more: `redis.shards`, every executor serving all shards, the jobs spread by "
        "the hash of the event id); consumers ingest "
        f"{ingest_n:,} pre-loaded events from 3 partitions"
        if not args.no_scaling
        else ""
    )
    if args.scaling_only:
        notes = [
            "scaling points only (--scaling-only): no pipeline, pending or api phase",
            scaling_note,
            "the machine may be shared with other work: each scaling rate carries its window's "
            "foreign CPU; CPU seconds per event are each process's own",
            f"PostgreSQL {'without fsync (--fast-stack)' if args.fast_stack else 'as `eventsched dev` (fsync on)'}, "
            "pg_stat_statements preloaded; executors' log level " + args.log_level,
        ]
        run.finish(
            {"scaling": scaling}, [["component", "figure", "how"], *scaling_rows(scaling)], notes
        )
        return
    e = per_event(p)
    table = table_rows(e, pend, api_r, scaling)
    table += rate_rows({rate: e, **by_rate})
    cpu = p["cpu"]
    notes = [
        f"pipeline: producer role at {rate:,.0f} events/s for {duration:g} s (due 1-2 s out) → one consumer "
        f"(mean batch {p['consumer_batch_mean']:,.0f}) → one executor (concurrency {args.concurrency}, handler "
        f"`simulate` with no sleep and {args.error_rate:.0%} failures, retried); {p['generated']:,} events, "
        f"{p['attempts']:,} attempts, outcomes {p['outcomes']}; window from before the producer started to the "
        f"last outcome ({cpu['wall_s']:.1f} s); {noise(cpu)}",
        "the machine may be shared with other work (see the load average and the foreign cores): CPU seconds and "
        "bytes per event are each process's own and stay meaningful; latencies would not, and none is "
        "reported; the scaling rates carry their window's foreign CPU",
        "marginal CPU = window CPU minus the process's idle cores x window; idle cores: "
        + ", ".join(f"{k} {v:.3f}" for k, v in p["idle"]["cores"].items()),
        f"PostgreSQL {'without fsync (--fast-stack)' if args.fast_stack else 'as `eventsched dev` (fsync on)'}, "
        "pg_stat_statements preloaded; executors' log level " + args.log_level,
    ]
    results = {
        "rate": rate,
        "duration_s": duration,
        "per_event": e,
        "pipeline": {k: v for k, v in p.items() if k not in ("before", "after")},
        "pending": pend,
        "api": api_r,
        "scaling": scaling,
        "by_rate": by_rate,
    }
    run.finish(results, table, notes)


if __name__ == "__main__":
    main()
