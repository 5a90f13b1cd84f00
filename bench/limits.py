"""Per-type limits beside unlimited work: the on-time target holds for a type without limits
while two limited types are saturated in the same executor.

One executor process (``executor.concurrency`` 64) with two limited types:

* ``bench.slow``: ``concurrency = 2`` across all executors, handler ``simulate`` (50 ms, no
  failures): ``--slow-count`` events (3,000: about 75 s of work) due at once;
* ``bench.rated``: ``rate = 5`` starts/s, ``burst = 1``, handler ``bench.observe:observed`` (notes its start, logs): ``--rated-count``
  events (400: 80 s) due at once;

both due 1 s after they are loaded, then ``bench.event`` (no limits, handler ``bench.observe:observed`` (notes its start, logs)) fed at
``--rate`` events/s for ``--duration`` s, due 2-10 s out, as in ``bench.lateness``. Lateness of
``bench.event`` is read from its attempt rows; the limited types are checked from theirs: at
most 2 ``bench.slow`` attempts overlap, ``bench.rated`` starts at most 5 a second (plus its
burst), and both still have a backlog when the unlimited feed ends (saturated throughout).

    python -m bench.limits                 # 1,000/s for 60 s beside the two backlogs
    python -m bench.limits --quick         # 200/s for 5 s, backlogs 800 and 120
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.report import fmt_ms, plot_cdf, pyplot, verdict
from bench.run import BenchRun, log, noise, parse_args
from bench.sampling import Sampler
from bench.stack import RECOMMENDED_CONCURRENCY, Stack
from bench.stats import lateness_summary, rate_series, read_attempts, wait_for_count
from tests.support.execution import max_overlap

TARGET_P99_MS = 10.0
TARGET_MAX_MS = 50.0
FREE = "bench.event"
SLOW = "bench.slow"
RATED = "bench.rated"
SLOW_CONCURRENCY = 2
RATED_RATE = 5.0
QUEUE = "limits"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=None, help="events/s (1000; quick 200)")
    parser.add_argument("--duration", type=float, default=None, help="seconds (60; quick 5)")
    parser.add_argument("--slow-count", type=int, default=None, help="(3000; quick 800)")
    parser.add_argument("--rated-count", type=int, default=None, help="(400; quick 120)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=RECOMMENDED_CONCURRENCY,
        help="executor handler slots (64)",
    )


def per_second(starts: list[float]) -> int:
    """The most starts in any one-second window."""
    starts = sorted(starts)
    most = lo = 0
    for hi, t in enumerate(starts):
        while t - starts[lo] >= 1.0:
            lo += 1
        most = max(most, hi - lo + 1)
    return most


def feeder_args(stack: Stack, mode: str, type_: str, lane: str, **kw: float) -> list[str]:
    args = ["--dsn", stack.dsn, "--redis", stack.redis_url, "--queue", QUEUE, "--type", type_]
    if lane:
        args += ["--lane", lane]
    for key, value in kw.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return [mode, *args]


def plot(
    path: Path, lateness_ms: list[float], slow: list[float], rated: list[float], t0: float
) -> None:
    """The unlimited type's lateness CDF; the limited types' starts per second."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_cdf(left, {FREE: lateness_ms}, f"{FREE} (no limits): start lateness", TARGET_P99_MS)
    for label, starts in ((f"{SLOW} (concurrency 2)", slow), (f"{RATED} (5/s)", rated)):
        xs, ys = rate_series(starts, t0)
        right.plot(xs, ys, label=label)
    right.set_xlabel("seconds since the unlimited feed started")
    right.set_ylabel("starts per second")
    right.set_title("limited types: starts per second")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__ or "", add_args)
    quick = args.quick
    rate = args.rate or (200.0 if quick else 1000.0)
    duration = args.duration or (5.0 if quick else 60.0)
    slow_count = args.slow_count or (800 if quick else 3000)
    rated_count = args.rated_count or (120 if quick else 400)
    run = BenchRun("limits", args)
    sampler = Sampler().start()
    try:
        with Stack(run, kafka=True) as stack:
            sampler.track_servers(stack.server_pids())
            settings = stack.settings(
                "executor",
                executor={
                    "concurrency": args.concurrency,
                    "simulate": {"duration": "50ms", "error_rate": 0.0},
                },
                redis={"queue": QUEUE},
                types={
                    SLOW: {
                        "concurrency": SLOW_CONCURRENCY,
                        "handler": "eventsched.plugins.handlers:simulate",
                    },
                    RATED: {"rate": RATED_RATE, "burst": 1},
                },
            )
            executor = stack.role("executor", settings)
            executor.wait_ready()
            sampler.track("executor", executor.pid)
            for type_, count in ((SLOW, slow_count), (RATED, rated_count)):
                loader = stack.helper(
                    f"backlog-{type_}",
                    "bench.feeder",
                    feeder_args(
                        stack, "backlog", type_, type_, count=count, delay_min=1, delay_max=1
                    ),
                )
                loader.wait(120)
                log(f"{type_}: {loader.result()['enqueued']} due at once")
            time.sleep(2)  # both lanes are full before the unlimited feed starts
            sampler.mark("start")
            feeder = stack.helper(
                "feeder",
                "bench.feeder",
                feeder_args(
                    stack,
                    "steady",
                    FREE,
                    "",
                    rate=rate,
                    duration=duration,
                    delay_min=2,
                    delay_max=10,
                ),
            )
            feeder.wait(duration + 120)
            fed = feeder.result()
            log(f"fed {fed['sent']} {FREE} at {fed['achieved_rate']}/s")
            wait_for_count(
                lambda: int(
                    stack.sql(
                        f"SELECT count(*) FROM events WHERE type = '{FREE}'"
                        " AND status = 'succeeded'"
                    )[0][0]
                ),
                fed["sent"],
                stall=30,
                cap=duration + 120,
                what=f"every {FREE} succeeded",
            )
            sampler.mark("end")
            ended = time.time()
            left = dict(
                stack.sql(
                    "SELECT type, count(*) FROM events WHERE status = 'scheduled'"
                    f" AND type IN ('{SLOW}', '{RATED}') GROUP BY type"
                )
            )
            executor.stop()
            free = read_attempts(stack, f"e.type = '{FREE}'")
            slow = stack.sql(
                "SELECT extract(epoch FROM a.started_at)::float8,"
                " extract(epoch FROM coalesce(a.finished_at, now()))::float8"
                f" FROM event_attempts a JOIN events e ON e.id = a.event_id WHERE e.type = '{SLOW}'"
            )
            rated = [
                r[0]
                for r in stack.sql(
                    "SELECT extract(epoch FROM a.started_at)::float8 FROM event_attempts a"
                    f" JOIN events e ON e.id = a.event_id WHERE e.type = '{RATED}'"
                )
            ]
            cpu = sampler.cpu_between("start", "end")
    finally:
        sampler.stop()

    lat = lateness_summary(free.lateness_ms, free.early_by_timestamps)
    window = ended - fed["started_at"]
    overlap = max_overlap(slow)
    rated_peak = per_second(rated)
    saturated = left.get(SLOW, 0) > 0 and left.get(RATED, 0) > 0
    ok = lat.get("count") == fed["sent"] and lat.get("early") == 0
    met = (
        ok
        and saturated
        and overlap <= SLOW_CONCURRENCY
        and rated_peak <= RATED_RATE + 1
        and lat["p99"] <= TARGET_P99_MS
        and lat["max"] <= TARGET_MAX_MS
    )
    rows = [
        ["metric", "value", "target", "verdict"],
        [f"{FREE} runs / fed", f"{lat.get('count', 0):,} / {fed['sent']:,}", "all", verdict(ok)],
        [f"{FREE} lateness p50 (ms)", fmt_ms(lat.get("p50")), "", ""],
        [f"{FREE} lateness p99 (ms)", fmt_ms(lat.get("p99")), "≤ 10 ms",
         verdict(lat.get("p99", 1e9) <= TARGET_P99_MS)],
        [f"{FREE} lateness max (ms)", fmt_ms(lat.get("max")), "≤ 50 ms",
         verdict(lat.get("max", 1e9) <= TARGET_MAX_MS)],
        [f"{FREE} early starts", str(lat.get("early")), "0", verdict(lat.get("early") == 0)],
        [f"{SLOW} most attempts at once", str(overlap), f"≤ {SLOW_CONCURRENCY}",
         verdict(overlap <= SLOW_CONCURRENCY)],
        [f"{RATED} most starts in 1 s", str(rated_peak), f"≤ {RATED_RATE:g} + burst 1",
         verdict(rated_peak <= RATED_RATE + 1)],
        ["backlog left when the feed ended", f"{SLOW} {left.get(SLOW, 0)}, {RATED} {left.get(RATED, 0)}",
         "> 0 each (saturated)", verdict(saturated)],
    ]  # fmt: skip
    notes = [
        f"{FREE}: {rate:,.0f}/s for {duration:g} s, due 2-10 s out, handler `observed` (notes its start, logs); {SLOW}:"
        f" {slow_count:,} due at once, concurrency {SLOW_CONCURRENCY}, handler `simulate` 50 ms;"
        f" {RATED}: {rated_count:,} due at once, rate {RATED_RATE:g}/s burst 1, handler `observed` (notes its start, logs);"
        f" one executor, concurrency {args.concurrency}; PostgreSQL as `eventsched dev`",
        f"over {window:.0f} s: {SLOW} {len(slow):,} attempts started, {RATED} {len(rated):,}"
        f" ({len(rated) / max(window, 1):.2f}/s)",
        f"CPU cores used: {', '.join(f'{k} {v:.2f}' for k, v in cpu['cores'].items())};"
        f" {noise(cpu)}",
        f"on time beside saturated limited types (p99 ≤ 10 ms, max ≤ 50 ms, never early): {verdict(met)}",
    ]
    results = {
        "rate": rate,
        "duration": duration,
        "fed": fed,
        "lateness_ms": lat,
        "slow": {"count": slow_count, "attempts": len(slow), "max_overlap": overlap},
        "rated": {"count": rated_count, "attempts": len(rated), "max_per_second": rated_peak},
        "backlog_left": left,
        "target_met": met,
        "cpu": cpu,
    }
    slow_starts = [s for s, _ in slow]
    run.finish(
        results,
        rows,
        notes,
        plot=lambda p: plot(p, free.lateness_ms, slow_starts, rated, fed["started_at"]),
    )


if __name__ == "__main__":
    main()
