"""Target 2 — execution throughput: N events all due at once, 1 and 2 executor processes, vs
stock SAQ.

For each executor count: fresh tables and queue, the executors start and become ready
(idle), then ``bench.feeder preload`` writes N rows and N jobs all due at the same instant
``T`` (``--lead`` s ahead, so the load finishes before ``T``; the JSON says if it did not).
From ``T`` the executors drain the burst: claim in PostgreSQL, handler
``bench.observe:observed`` (notes its start, then logs), outcome and attempt row in
PostgreSQL. Throughput = (N - 1) / (last ``finished_at`` - first), also
given from ``events.updated_at`` (when the outcome statement ran). Then a stock
``saq.Worker`` (concurrency 10, no-op, own process, plain asyncio) drains N stock jobs due
at one instant the same way.

How soon a burst starts is read from the handler's journal (``bench.observe``: its first
line notes the time): the first handler start after the due instant, and the lateness of
the first ``--concurrency`` (64) and first 1,000 starts (``first_starts`` in the JSON).

Targets: >= 3,000 executions/s for one executor (100,000 events), two executors >= 1.7x one.

    python -m bench.throughput                        # full: 100,000 events, 1 and 2 executors
    python -m bench.throughput --count 20000 --executors 1
    python -m bench.throughput --quick                # CI: 800 events
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.profiling import Profiler
from bench.report import fmt_ms, pyplot, ratio, verdict
from bench.run import BenchRun, log, noise, parse_args, quietest
from bench.sampling import Sampler
from bench.stack import PEER_CONCURRENCY, RECOMMENDED_CONCURRENCY, Stack, executions_done
from bench.stats import (
    lateness_summary,
    percentiles,
    rate_series,
    read_attempts,
    stats_delta,
    throughput,
    wait_for_count,
)
from tests.support.clients import status_counts

TARGET_ONE = 3000.0
TARGET_SCALING = 1.7


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=None, help="events (100000; quick 800)")
    parser.add_argument("--executors", default="1,2", help="executor process counts to run")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=RECOMMENDED_CONCURRENCY,
        help="handler slots per executor (64)",
    )
    parser.add_argument(
        "--saq-concurrency", type=int, default=PEER_CONCURRENCY, help="stock SAQ worker slots (10)"
    )
    parser.add_argument(
        "--lead", type=float, default=None, help="s from load start to due (25; quick 2)"
    )
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument("--no-baseline", action="store_true")


def first_starts(lateness_ms: Sequence[float], firsts: Sequence[int]) -> dict[str, Any]:
    """How the burst started, from the lateness at the handler of every start: every event is
    due at the same instant, so the first starts are the least late ones. ``first_ms``: the
    first start after the due instant; ``first_<n>``: the lateness of the first ``n``."""
    ordered = sorted(lateness_ms)
    out: dict[str, Any] = {"first_ms": round(ordered[0], 2) if ordered else None}
    for n in firsts:
        out[f"first_{n}"] = percentiles(ordered[:n])
    return out


def starts_note(starts: dict[str, Any]) -> str:
    firsts = "; ".join(
        f"first {k.removeprefix('first_')} starts' lateness p50 {fmt_ms(v.get('p50'))} / "
        f"p99 {fmt_ms(v.get('p99'))} ms"
        for k, v in starts.items()
        if k != "first_ms"
    )
    return f"first handler start {fmt_ms(starts['first_ms'])} ms after due; {firsts}"


def drain_timeout(count: int) -> float:
    # Bounded: at worst 100 jobs/s, plus start-up slack.
    return 60.0 + count / 100.0


def run_ours(
    run: BenchRun,
    stack: Stack,
    sampler: Sampler,
    count: int,
    lead: float,
    processes: int,
    attempt: int = 0,
    redis_shards: Sequence[str] = (),
) -> dict[str, Any]:
    """``count`` events due at once drained by ``processes`` executors; with
    ``redis_shards`` (two or more URLs) the jobs are spread over those Redis shards and
    every executor serves all of them."""
    args = run.args
    stack.sql("TRUNCATE events, event_attempts, event_keys, event_commands")
    shards = list(redis_shards) if len(redis_shards) > 1 else [stack.redis_url]
    tag = f"{processes}-{attempt}" + (f"-s{len(shards)}" if len(shards) > 1 else "")
    queue = f"tp{tag}"
    settings = stack.settings(
        f"executor-{tag}", executor={"concurrency": args.concurrency}, redis={"queue": queue}
    )
    executors = [
        stack.role("executor", settings, index=i, redis_shards=shards) for i in range(processes)
    ]
    for ex in executors:
        ex.wait_ready()
        sampler.track(ex.name, ex.pid)
    due = time.time() + lead
    feeder = stack.helper(
        f"preload-{tag}",
        "bench.feeder",
        ["preload", "--dsn", stack.dsn, "--redis", ",".join(shards), "--queue", queue,
         "--count", str(count), "--due", repr(due)],
    )  # fmt: skip
    feeder.wait(lead + 300)
    loaded = feeder.result()
    if loaded["lead_left_s"] < 0.5:
        log(f"WARNING: the load overran the lead ({loaded['lead_left_s']} s left): raise --lead")
    time.sleep(max(0.0, due - time.time()))
    profiler = Profiler(run)
    if args.profile and processes == 1:
        profiler.start("executor", executors[0].pid, args.profile_seconds)
    sampler.mark(f"ours{tag}_start")
    work_before = stack.server_stats()
    finished = wait_for_count(
        lambda: executions_done(executors),
        count,
        stall=30,
        cap=drain_timeout(count),
        what=f"{count} events succeeded",
    )
    sampler.mark(f"ours{tag}_end")
    memory = {ex.name: sampler.memory().get(ex.name, {}) for ex in executors}
    time.sleep(1.2)  # PostgreSQL flushes its statistics about once a second
    work = stats_delta(work_before, stack.server_stats(), count)
    codes = [ex.stop() for ex in executors]
    attempts = read_attempts(stack)
    cpu = sampler.cpu_between(f"ours{tag}_start", f"ours{tag}_end")
    executor_cpu = sum(v for k, v in cpu["cpu_s"].items() if k.startswith("executor"))
    return {
        "processes": processes,
        "count": count,
        "load": loaded,
        "all_finished": finished,
        "statuses": status_counts(stack.dsn),
        "outcomes": dict(attempts.outcomes),
        "throughput_finished": throughput(attempts.finished),
        "throughput_pg_updated": throughput(attempts.pg_updated),
        "burst_lateness_ms": lateness_summary(attempts.lateness_ms, attempts.early_by_timestamps),
        "first_starts": first_starts(attempts.lateness_ms, (args.concurrency, 1000)),
        "unobserved": attempts.unobserved,
        "service_ms": percentiles(attempts.service_ms),
        "server_work": work,
        "executor_cpu_ms_per_job": round(1000 * executor_cpu / max(1, len(attempts.finished)), 3),
        "cpu": cpu,
        "memory": memory,
        "exit_codes": codes,
        "profile": profiler.finish(),
        "_finished": attempts.finished,
        "_t0": due,
    }


def run_stock(
    run: BenchRun, stack: Stack, sampler: Sampler, count: int, lead: float, attempt: int = 0
) -> dict[str, Any]:
    args = run.args
    queue = f"stock{attempt}"
    worker = stack.helper(
        f"saq-worker{attempt}",
        "bench.stock_saq",
        ["worker", "--redis", stack.redis_url, "--queue", queue, "--expect", str(count),
         "--concurrency", str(args.saq_concurrency), "--timeout", str(lead + drain_timeout(count))],
    )  # fmt: skip
    worker.wait_for(lambda x: x.get("event") == "ready", 30)
    sampler.track("stock_saq", worker.pid)
    due = time.time() + lead
    loader = stack.helper(
        f"saq-preload{attempt}",
        "bench.stock_saq",
        ["preload", "--redis", stack.redis_url, "--queue", queue, "--count", str(count), "--due", repr(due)],
    )  # fmt: skip
    loader.wait(lead + 300)
    time.sleep(max(0.0, due - time.time()))
    sampler.mark(f"stock{attempt}_start")
    worker.wait(lead + drain_timeout(count) + 30)
    sampler.mark(f"stock{attempt}_end")
    result = worker.result()
    finished = [end for _, _, end in result["jobs"] if end]
    lateness = [(start - scheduled) * 1000 for scheduled, start, _ in result["jobs"]]
    return {
        "count": count,
        "load": loader.result(),
        "finished": result["finished"],
        "throughput_finished": throughput(finished),
        "burst_lateness_ms": lateness_summary(lateness),
        "first_starts": first_starts(lateness, (args.saq_concurrency, 1000)),
        # The worker exits inside the window: its own CPU figure (from the drain's start).
        "servers_cpu": sampler.cpu_between(
            f"stock{attempt}_start",
            f"stock{attempt}_end",
            exited={"stock_saq": result["cpu_work_s"]},
        ),
        "cpu_ms_per_job": round(1000 * result["cpu_work_s"] / max(1, result["finished"]), 3),
        "memory": {**sampler.memory().get("stock_saq", {}), "hwm_mb": result["vm_hwm_mb"]},
        "_finished": finished,
        "_t0": due,
    }


def plot(path: Path, ours: list[dict[str, Any]], stock: dict[str, Any] | None) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for data in ours:
        n = data["processes"]
        xs, ys = rate_series(data["_finished"], data["_t0"])
        ax.plot(
            xs,
            ys,
            label=f"eventsched, {n} executor{'s' if n > 1 else ''} ({data['throughput_finished']['per_s']:,.0f}/s)",
        )
    if stock:
        xs, ys = rate_series(stock["_finished"], stock["_t0"])
        ax.plot(xs, ys, label=f"stock SAQ worker ({stock['throughput_finished']['per_s']:,.0f}/s)")
    ax.axhline(TARGET_ONE, color="grey", linestyle="--", linewidth=1, label="target, one executor")
    ax.set_xlabel("seconds since the burst was due")
    ax.set_ylabel("completions per second")
    count = ours[0]["count"] if ours else 0
    ax.set_title(f"draining {count:,} jobs due at once")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__ or "", add_args)
    run = BenchRun("throughput", args)
    count = args.count or (800 if args.quick else 100_000)
    lead = args.lead or (2.0 if args.quick else 25.0)
    process_counts = [int(x) for x in args.executors.split(",") if x.strip()]
    sampler = Sampler().start()
    ours: list[dict[str, Any]] = []
    stock: dict[str, Any] | None = None
    try:
        with Stack(run, kafka=True) as stack:
            sampler.track_servers(stack.server_pids())
            for processes in process_counts:

                def phase(attempt: int, k: int = processes) -> dict[str, Any]:
                    return run_ours(run, stack, sampler, count, lead, k, attempt)

                ours.append(quietest(run, f"{processes} executor(s)", phase, lambda r: r["cpu"]))
                log(f"{processes} executor(s): {ours[-1]['throughput_finished']}")
            if not args.no_baseline:
                stock = quietest(
                    run,
                    "stock SAQ run",
                    lambda n: run_stock(run, stack, sampler, count, lead, n),
                    lambda r: r["servers_cpu"],
                )
                log(f"stock SAQ: {stock['throughput_finished']}")
    finally:
        sampler.stop()

    by_n = {d["processes"]: d for d in ours}
    one = by_n.get(1)
    two = by_n.get(2)
    s_rate = stock["throughput_finished"]["per_s"] if stock else 0.0
    rows = [
        [
            "setup",
            "jobs done",
            "executions/s",
            "vs stock SAQ",
            "CPU ms/job (workers)",
            "first start after due, ms",
            "RSS peak MB",
            "target",
            "verdict",
        ]
    ]
    for d in ours:
        n = d["processes"]
        rate = d["throughput_finished"]["per_s"]
        target, ok = ("", None)
        if n == 1:
            target, ok = "≥ 3,000/s", rate >= TARGET_ONE
        elif n == 2 and one:
            scale = rate / max(1e-9, one["throughput_finished"]["per_s"])
            target, ok = f"≥ 1.7x one (got {scale:.2f}x)", scale >= TARGET_SCALING
        hwm = max((m.get("hwm_mb", 0.0) for m in d["memory"].values()), default=0.0)
        rows.append([
            f"eventsched, {n} executor process{'es' if n > 1 else ''}",
            f"{d['throughput_finished']['count']:,} / {d['count']:,}",
            f"{rate:,.0f}", ratio(rate, s_rate) if stock else "-",
            f"{d['executor_cpu_ms_per_job']:.2f}", fmt_ms(d["first_starts"]["first_ms"]),
            f"{hwm:.0f}", target, verdict(ok),
        ])  # fmt: skip
    if stock:
        rows.append([
            "stock SAQ Worker (1 process)", f"{stock['finished']:,} / {stock['count']:,}",
            f"{s_rate:,.0f}", "1.0x", f"{stock['cpu_ms_per_job']:.2f}",
            fmt_ms(stock["first_starts"]["first_ms"]), f"{stock['memory'].get('hwm_mb', 0):.0f}",
            "", "",
        ])  # fmt: skip
    notes = [
        f"{count:,} events due at one instant; executor concurrency {args.concurrency}, handler `observed` (notes its start, logs), "
        f"log level {args.log_level}; PostgreSQL {'without fsync (--fast-stack)' if args.fast_stack else 'as `eventsched dev` (fsync on)'}",
    ]
    for d in ours:
        servers = ", ".join(f"{k} {v:.2f}" for k, v in d["cpu"]["cores"].items())
        notes.append(
            f"{d['processes']} executor(s): CPU cores during the drain: {servers}; "
            f"throughput by PG updated_at {d['throughput_pg_updated']['per_s']:,.0f}/s; "
            f"burst lateness p50 {fmt_ms(d['burst_lateness_ms'].get('p50'))} ms; "
            f"{starts_note(d['first_starts'])}; {noise(d['cpu'])}"
        )
    if stock:
        notes.append(
            f"stock SAQ run: {starts_note(stock['first_starts'])}; {noise(stock['servers_cpu'])}"
        )
    results = {
        "count": count,
        "lead_s": lead,
        "targets": {
            "one_executor_met": bool(one and one["throughput_finished"]["per_s"] >= TARGET_ONE),
            "scaling": (
                round(
                    two["throughput_finished"]["per_s"]
                    / max(1e-9, one["throughput_finished"]["per_s"]),
                    3,
                )
                if one and two
                else None
            ),
        },
        "ours": [{k: v for k, v in d.items() if not k.startswith("_")} for d in ours],
        "stock_saq": {k: v for k, v in stock.items() if not k.startswith("_")} if stock else None,
    }
    run.finish(results, rows, notes, plot=lambda p: plot(p, ours, stock))


if __name__ == "__main__":
    main()
