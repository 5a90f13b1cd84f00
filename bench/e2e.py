"""Target 5 — end to end: the producer role at a steady rate through the whole pipeline.

Producer (``producer.rate`` events/s, due 2-10 s out) -> Kafka -> consumer -> PostgreSQL +
Redis -> executor (handler ``log``), one process per role, for ``--duration`` s (see
:mod:`bench.pipeline`). Every second the harness records produced vs consumed (the lag) and
the executor's due-but-not-started backlog; the lag must not grow (least-squares slope over
the steady part below 1% of the rate) and start lateness must stay at p99 <= 25 ms.

    python -m bench.e2e                   # full: 5,000 events/s for 60 s
    python -m bench.e2e --rate 2000       # a lighter point on the curve
    python -m bench.e2e --quick           # CI: 300 events/s for 2 s
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.pipeline import Pipeline, run_pipeline
from bench.profiling import Profiler
from bench.report import fmt_ms, plot_cdf, pyplot, verdict
from bench.run import BenchRun, noise, parse_args
from bench.sampling import Sampler
from bench.stack import RECOMMENDED_CONCURRENCY, Stack

TARGET_P99_MS = 25.0


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=None, help="events/s (5000; quick 300)")
    parser.add_argument("--duration", type=float, default=None, help="seconds (60; quick 2)")
    parser.add_argument("--delay-min", type=float, default=None, help="s (2; quick 1)")
    parser.add_argument("--delay-max", type=float, default=None, help="s (10; quick 1.5)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=RECOMMENDED_CONCURRENCY,
        help="executor handler slots (64)",
    )
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument(
        "--pin-servers",
        default=None,
        metavar="CPUS",
        help="pin PostgreSQL, Redis and the broker to these CPUs (taskset list, e.g. 1)",
    )
    parser.add_argument(
        "--pin-roles",
        default=None,
        metavar="CPUS",
        help="pin the producer, consumer and executor processes to these CPUs (e.g. 0)",
    )


def plot(path: Path, r: dict[str, Any], p: Pipeline) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_cdf(
        left,
        {"eventsched, whole pipeline": r["_lateness"]},
        f"start lateness at {p.rate:,.0f} events/s end to end",
        TARGET_P99_MS,
    )
    right.plot(
        [t for t, _ in r["_lag"]],
        [v for _, v in r["_lag"]],
        label="produced - consumed (Kafka lag)",
    )
    right.plot(
        [t for t, _ in r["_backlog"]],
        [v for _, v in r["_backlog"]],
        label="jobs due, not started (executor)",
    )
    right.set_xlabel("seconds since the producer started")
    right.set_ylabel("events")
    right.set_title("lag over time")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__ or "", add_args)
    run = BenchRun("e2e", args)
    quick = args.quick
    p = Pipeline.from_args(args, rate=args.rate or (300.0 if quick else 5000.0))
    sampler = Sampler().start()
    profiler = Profiler(run)
    try:
        with Stack(run) as stack:
            sampler.track_servers(stack.server_pids())
            stack.pin(args.pin_servers, args.pin_roles)
            r = run_pipeline(stack, sampler, p, profiler)
    finally:
        sampler.stop()
    r["profile"] = profiler.finish()

    lat, lag = r["lateness_ms"], r["lag"]
    ok_rows = (
        r["all_ran"]
        and r["outcomes"].get("succeeded", 0) == r["generated"]
        and lat.get("early") == 0
    )
    met = bool(ok_rows and not lag["growing"] and lat.get("p99", 1e9) <= TARGET_P99_MS)
    cores = r["cpu_load"]["cores"]
    table = [
        ["metric", "value", "target", "verdict"],
        ["events generated / run (succeeded)", f"{r['generated']:,} / {r['outcomes'].get('succeeded', 0):,}", "all", verdict(ok_rows)],
        ["achieved rate", f"{r['achieved_rate']:,.0f}/s", f"{p.rate:,.0f}/s", ""],
        ["Kafka lag (produced - consumed): max / last / slope", f"{lag['max']:,.0f} / {lag['last']:,.0f} / {lag['slope_per_s']:+,.1f} per s", "not growing", verdict(not lag["growing"])],
        ["executor backlog (due, not started): max / slope", f"{lag['executor_backlog_max']:,.0f} / {lag['executor_backlog_slope_per_s']:+,.1f} per s", "", ""],
        ["lateness p50 / p99 / max (ms)", f"{fmt_ms(lat.get('p50'))} / {fmt_ms(lat.get('p99'))} / {fmt_ms(lat.get('max'))}", "p99 ≤ 25 ms", verdict(lat.get("p99", 1e9) <= TARGET_P99_MS)],
        ["early starts", str(lat.get("early")), "0", verdict(lat.get("early") == 0)],
        ["ingest latency created → recorded p50 / p99 (ms)", f"{fmt_ms(r['ingest_latency_ms'].get('p50'))} / {fmt_ms(r['ingest_latency_ms'].get('p99'))}", "", ""],
        ["RSS peak MB (producer / consumer / executor)", " / ".join(f"{r['memory'].get(n, {}).get('hwm_mb', 0):.0f}" for n in ("producer", "consumer", "executor")), "", ""],
        ["CPU cores (producer / consumer / executor / postgres / redis / kafka)", " / ".join(f"{cores.get(n, 0):.2f}" for n in ("producer", "consumer", "executor", "postgres", "redis", "kafka")), "", ""],
    ]  # fmt: skip
    notes = [
        f"producer {p.rate:,.0f} events/s for {p.duration:g} s, due {p.delay_min:g}-{p.delay_max:g} s out; one process per role; "
        f"executor concurrency {p.concurrency}, handler `observed` (notes its start, logs), log level {args.log_level}; "
        f"PostgreSQL {'without fsync (--fast-stack)' if args.fast_stack else 'as `eventsched dev` (fsync on)'}",
        f"CPUs: servers {args.pin_servers or 'any'}, roles {args.pin_roles or 'any'} (`--pin-servers`, `--pin-roles`)",
        f"during the load: {noise(r['cpu_load'])}",
        f"target 5 (no growing lag, lateness p99 ≤ 25 ms): {verdict(met)}",
    ]
    results = {
        "pipeline": {k: v for k, v in vars(p).items() if k != "samples"},
        "target_met": met,
        **{k: v for k, v in r.items() if not k.startswith("_")},
        "lag_series": [(round(t, 2), v) for t, v in r["_lag"]],
        "backlog_series": [(round(t, 2), v) for t, v in r["_backlog"]],
    }
    run.finish(results, table, notes, plot=lambda path: plot(path, r, p))


if __name__ == "__main__":
    main()
