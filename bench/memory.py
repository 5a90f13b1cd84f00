"""Target 4 — memory: role RSS with a large backlog of pending events, and lateness on top.

First ``--backlog`` events due 1-2 hours out are bulk-loaded the consumer's way
(``bench.feeder backlog``: rows in PostgreSQL, SAQ jobs in Redis). Then two runs on top of
the backlog, while the harness samples every role's ``VmRSS`` (0.25 s) and keeps ``VmHWM``:

1. target 1's run (``bench.lateness``: the feeder at ``--rate`` events/s due 2-10 s out, one
   executor serving the queue that holds the backlog): lateness with the backlog, the
   target's own setup; its events and attempt rows are then deleted (the backlog stays);
2. the whole pipeline as in ``bench.e2e`` (producer -> Kafka -> consumer -> executor, one
   process each) at the same rate: RSS of every role, and the lateness when the producer,
   consumer and broker share the two cores too (stricter than target 1; reported beside it).

Pending work must live in Redis and PostgreSQL, not in the processes.

Targets: executor and consumer RSS <= 100 MB with 1,000,000 pending events, and target 1
(lateness p99 <= 10 ms, max <= 50 ms, never early at 1,000 events/s) still holds.

    python -m bench.memory                    # full: 1,000,000 pending, 1,000/s for 60 s
    python -m bench.memory --backlog 200000   # a smaller backlog
    python -m bench.memory --quick            # CI: 3,000 pending, 200/s for 2 s
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.lateness import run_ours
from bench.pipeline import QUEUE, Pipeline, run_pipeline
from bench.profiling import Profiler
from bench.report import fmt_ms, plot_cdf, pyplot, verdict
from bench.run import BenchRun, log, noise, parse_args, step
from bench.sampling import Sampler
from bench.stack import RECOMMENDED_CONCURRENCY, Stack

TARGET_RSS_MB = 100.0
TARGET_P99_MS = 10.0
TARGET_MAX_MS = 50.0


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backlog", type=int, default=None, help="pending events (1000000; quick 3000)"
    )
    parser.add_argument("--rate", type=float, default=None, help="events/s (1000; quick 200)")
    parser.add_argument("--duration", type=float, default=None, help="seconds (60; quick 2)")
    parser.add_argument("--delay-min", type=float, default=None)
    parser.add_argument("--delay-max", type=float, default=None)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=RECOMMENDED_CONCURRENCY,
        help="executor handler slots (64)",
    )
    parser.add_argument("--profile-seconds", type=float, default=20.0)


def sizes(stack: Stack) -> dict[str, Any]:
    with stack.redis() as r:
        info = r.info("memory")
        jobs = int(r.zcard(f"saq:{QUEUE}:incomplete"))
    db = stack.sql("SELECT pg_database_size(current_database())")[0][0]
    return {
        "redis_used_memory_mb": round(info["used_memory"] / 2**20, 1),
        "redis_jobs_incomplete": jobs,
        "postgres_db_mb": round(int(db) / 2**20, 1),
    }


def plot(
    path: Path,
    r: dict[str, Any],
    alone: dict[str, Any],
    sampler: Sampler,
    p: Pipeline,
    backlog: int,
) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in ("executor", "consumer", "producer"):
        xs, ys = sampler.rss_series(name)
        if xs:
            t0 = r["_started"] - sampler.t0
            left.plot([x - t0 for x in xs], ys, label=name)
    left.axhline(TARGET_RSS_MB, color="grey", linestyle="--", linewidth=1, label="target ≤ 100 MB")
    left.set_xlabel("seconds since the producer started")
    left.set_ylabel("VmRSS (MB)")
    left.set_title(f"role memory with {backlog:,} pending events")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    plot_cdf(
        right,
        {"target 1's run (executor)": alone["_lateness"], "whole pipeline": r["_lateness"]},
        f"start lateness at {p.rate:,.0f}/s over the backlog",
        TARGET_P99_MS,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__ or "", add_args)
    run = BenchRun("memory", args)
    quick = args.quick
    backlog = args.backlog if args.backlog is not None else (3000 if quick else 1_000_000)
    p = Pipeline.from_args(args, rate=args.rate or (200.0 if quick else 1000.0))
    sampler = Sampler().start()
    profiler = Profiler(run)
    try:
        with Stack(run) as stack:
            sampler.track_servers(stack.server_pids())
            with step(f"loading a backlog of {backlog:,} events due 1-2 h out"):
                loader = stack.helper(
                    "backlog",
                    "bench.feeder",
                    ["backlog", "--dsn", stack.dsn, "--redis", stack.redis_url, "--queue", QUEUE,
                     "--count", str(backlog), "--delay-min", "3600", "--delay-max", "7200"],
                )  # fmt: skip
                loader.wait(120 + backlog / 2000)
                loaded = loader.result()
            before = sizes(stack)
            log(f"backlog loaded in {loaded['load_s']} s: {before}")
            size = {"rate": p.rate, "duration": p.duration, "delay_min": p.delay_min,
                    "delay_max": p.delay_max}  # fmt: skip
            with step("target 1's run over the backlog (feeder -> executor)"):
                alone = run_ours(run, stack, sampler, size, queue=QUEUE)
            stack.sql("DELETE FROM event_attempts")
            stack.sql("DELETE FROM events WHERE status <> 'scheduled'")
            r = run_pipeline(stack, sampler, p, profiler)
            after = sizes(stack)
    finally:
        sampler.stop()
    r["profile"] = profiler.finish()

    lat, mem = r["lateness_ms"], r["memory"]
    alat, fed = alone["lateness_ms"], alone["fed"]["sent"]
    pending_ok = (
        r["statuses"].get("scheduled", 0) >= backlog and after["redis_jobs_incomplete"] >= backlog
    )
    rss = {name: mem.get(name, {}) for name in ("executor", "consumer", "producer")}
    executor_hwm = max(rss["executor"].get("hwm_mb", 1e9), alone["memory"].get("hwm_mb", 1e9))
    rss_ok = executor_hwm <= TARGET_RSS_MB and rss["consumer"].get("hwm_mb", 1e9) <= TARGET_RSS_MB
    ran_ok = (
        r["all_ran"]
        and r["outcomes"].get("succeeded", 0) == r["generated"]
        and lat.get("early") == 0
    )
    alone_ok = (
        alat.get("count") == fed
        and alone["outcomes"].get("succeeded", 0) == fed
        and alat.get("early") == 0
        and alone["early_by_lateness_ms"] == 0
    )
    late_ok = (
        alone_ok and alat.get("p99", 1e9) <= TARGET_P99_MS and alat.get("max", 1e9) <= TARGET_MAX_MS
    )
    pipeline_late_ok = (
        ran_ok and lat.get("p99", 1e9) <= TARGET_P99_MS and lat.get("max", 1e9) <= TARGET_MAX_MS
    )
    met = pending_ok and rss_ok and late_ok and ran_ok
    table = [
        ["metric", "executor", "consumer", "producer", "target", "verdict"],
        ["RSS peak, VmHWM (MB)", f"{executor_hwm:.0f}", *(f"{rss[n].get('hwm_mb', 0):.0f}" for n in ("consumer", "producer")), "≤ 100 MB (executor, consumer)", verdict(rss_ok)],
        ["VmRSS sampled max / last (MB), pipeline run", *(f"{rss[n].get('rss_max_mb', 0):.0f} / {rss[n].get('rss_last_mb', 0):.0f}" for n in ("executor", "consumer", "producer")), "", ""],
        ["CPU cores, pipeline run", *(f"{r['cpu_load']['cores'].get(n, 0):.2f}" for n in ("executor", "consumer", "producer")), "", ""],
    ]  # fmt: skip
    table += [
        ["pending events still pending (PG scheduled / Redis jobs)", f"{r['statuses'].get('scheduled', 0):,} / {after['redis_jobs_incomplete']:,}", "", "", f"{backlog:,}", verdict(pending_ok)],
        ["target 1's run: events run / fed", f"{alone['outcomes'].get('succeeded', 0):,} / {fed:,}", "", "", "all", verdict(alone_ok)],
        ["target 1's run: lateness p50 / p99 / max (ms)", f"{fmt_ms(alat.get('p50'))} / {fmt_ms(alat.get('p99'))} / {fmt_ms(alat.get('max'))}", "", "", "p99 ≤ 10, max ≤ 50", verdict(late_ok)],
        ["target 1's run: early starts", str(alat.get("early")), "", "", "0", verdict(alat.get("early") == 0)],
        ["pipeline run: events run / generated", f"{r['outcomes'].get('succeeded', 0):,} / {r['generated']:,}", "", "", "all", verdict(ran_ok)],
        ["pipeline run: lateness p50 / p99 / max (ms)", f"{fmt_ms(lat.get('p50'))} / {fmt_ms(lat.get('p99'))} / {fmt_ms(lat.get('max'))}", "", "", "(stricter than target 1)", "met" if pipeline_late_ok else "not met"],
        ["pipeline run: early starts", str(lat.get("early")), "", "", "0", verdict(lat.get("early") == 0)],
    ]  # fmt: skip
    alone_servers = ", ".join(f"{k} {v:.2f}" for k, v in alone["cpu"]["cores"].items())
    notes = [
        f"backlog of {backlog:,} events due 1-2 h out, loaded in {loaded['load_s']:.0f} s; Redis {after['redis_used_memory_mb']:,.0f} MB, "
        f"PostgreSQL database {after['postgres_db_mb']:,.0f} MB",
        f"target 1's run over the backlog: feeder {p.rate:,.0f} events/s for {p.duration:g} s, due {p.delay_min:g}-{p.delay_max:g} s out, "
        f"one executor (as `bench.lateness`); CPU cores: {alone_servers}; {noise(alone['cpu'])}",
        f"then the whole pipeline at the same rate (producer, consumer and broker share the cores too); executor concurrency {p.concurrency}, "
        f"handler `observed` (notes its start, logs); PostgreSQL {'without fsync (--fast-stack)' if args.fast_stack else 'as `eventsched dev` (fsync on)'}",
        f"during the pipeline run: {noise(r['cpu_load'])}",
        f"target 4 (RSS ≤ 100 MB with the backlog, target 1 still holds): {verdict(met)}",
    ]
    results = {
        "backlog": backlog,
        "loaded": loaded,
        "sizes_before": before,
        "sizes_after": after,
        "pipeline": {k: v for k, v in vars(p).items() if k != "samples"},
        "target_met": met,
        "target1_run": {k: v for k, v in alone.items() if not k.startswith("_")},
        **{k: v for k, v in r.items() if not k.startswith("_")},
        "rss_series": {n: sampler.rss_series(n) for n in ("executor", "consumer", "producer")},
    }
    run.finish(results, table, notes, plot=lambda path: plot(path, r, alone, sampler, p, backlog))


if __name__ == "__main__":
    main()
