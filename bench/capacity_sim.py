"""Where each component saturates as the load rises: a small simulation driven by measured
costs (see docs/capacity.md for the costs, the checks against measured points and the
sizing it supports).

Model: a fluid, discrete-time simulation (ticks of ``dt`` s) of the pipeline's queues.

* Events arrive at an offered rate, spread evenly over Kafka partitions (keys hash
  evenly). Each partition belongs to one consumer process (Kafka's range assignment); a
  consumer takes events from its partitions only.
* Ingested events join the executors' queue (due times are not modelled: in a steady state
  as many events come due per second as arrive). Executors share that queue evenly. An
  attempt fails with probability ``retry`` and runs again (``1 / (1 - retry)`` attempts per
  event; the retry's backoff is not modelled).
* A process (consumer or executor) handles at most ``dt / hold`` events per tick: ``hold``
  is its wall time per event when nothing else limits it (the inverse of the rate one
  process reached in a benchmark; neither role is CPU-bound there, each also waits for
  PostgreSQL and Redis). Each event it handles costs CPU in the process itself, in
  PostgreSQL and in the Redis shard of the event.
* Resources: each process has one core (one Python thread does the work); PostgreSQL has
  ``pg_cores``; each Redis shard one core (single-threaded). When everything shares one host
  (``host_cores``: the benchmark machine), the host's cores are shared max-min fairly
  (water-filling) between what each process asks for, after ``foreign_cores``: what other
  work on the machine used meanwhile (measured in each window).
* In a tick, each process handles what it wants scaled down by its tightest resource (its
  own core, PostgreSQL, its Redis shard): a bottleneck approximation, not a model of
  PostgreSQL's or Redis's internals. Redis shards (``redis.shards``) are modelled as the
  one-Redis cost per event split evenly (an event's jobs live on the shard its id hashes
  to); the 2-shard drain points of ``bench.capacity`` check that, and measure each shard's
  own cost per event.

Run it to regenerate ``bench/capacity.png`` and the checks table::

    python -m bench.capacity_sim                 # plot + checks with the costs below
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

US = 1e-6


@dataclass(frozen=True)
class StageCost:
    """What one event costs a stage (consumer: per event; executor: per attempt)."""

    hold_us: float  # wall time of the process per event at full speed
    cpu_us: float  # the process's own CPU per event
    pg_us: float  # PostgreSQL CPU per event
    redis_us: float  # Redis CPU per event


@dataclass(frozen=True)
class Costs:
    consume: StageCost
    execute: StageCost


@dataclass(frozen=True)
class Deployment:
    partitions: int
    consumers: int
    executors: int
    redis_shards: int = 1
    pg_cores: float = 2.0
    #: All processes on one host with this many cores (None: each has its own).
    host_cores: float | None = None
    #: Cores other work used on that host meanwhile (as measured: taken off the top).
    foreign_cores: float = 0.0
    #: Probability that an attempt fails and runs again.
    retry: float = 0.1


def water_fill(capacity: float, demands: Sequence[float]) -> list[float]:
    """Max-min fair shares of ``capacity``: nobody gets more than it asks for, and what the
    small askers leave is split evenly among the others."""
    shares = [0.0] * len(demands)
    left = capacity
    pending = sorted(range(len(demands)), key=lambda i: demands[i])
    while pending:
        even = left / len(pending)
        i = pending[0]
        if demands[i] <= even:
            shares[i] = max(0.0, demands[i])
            left -= shares[i]
            pending.pop(0)
        else:
            for j in pending:
                shares[j] = even
            break
    return shares


def partition_owners(partitions: int, consumers: int) -> list[int]:
    """The consumer each partition belongs to, as Kafka's range assignor gives them: the
    first ``partitions % consumers`` consumers get one partition more."""
    if consumers < 1:
        return [-1] * partitions
    base, extra = divmod(partitions, consumers)
    owners: list[int] = []
    for c in range(consumers):
        owners += [c] * (base + (1 if c < extra else 0))
    return owners


@dataclass
class State:
    partitions: list[float]  # events waiting in each partition
    due: float  # attempts waiting for an executor
    done: float = 0.0  # events with their final (successful) attempt


@dataclass
class Tick:
    ingested: float
    executed: float  # attempts
    done: float  # events finished
    cores: dict[str, float]  # CPU used per process or server in the tick, in cores
    busy: dict[str, float]  # the share of its capacity each process or server used


def step(state: State, d: Deployment, costs: Costs, dt: float, arrivals: float) -> Tick:
    """Advance ``state`` by one tick of ``dt`` seconds with ``arrivals`` new events."""
    owners = partition_owners(d.partitions, d.consumers)
    for p in range(d.partitions):
        state.partitions[p] += arrivals / d.partitions
    c, e = costs.consume, costs.execute
    # What each process would handle with every resource it needs.
    backlog = [0.0] * d.consumers
    for p, owner in enumerate(owners):
        if owner >= 0:
            backlog[owner] += state.partitions[p]
    want_c = [min(b, dt / (c.hold_us * US)) for b in backlog]
    per_executor = state.due / d.executors if d.executors else 0.0
    want_e = [min(per_executor, dt / (e.hold_us * US))] * d.executors
    # Cores each resource is asked for.
    ask: dict[str, float] = {}
    cap: dict[str, float] = {}
    for i, w in enumerate(want_c):
        ask[f"consumer{i}"], cap[f"consumer{i}"] = w * c.cpu_us * US / dt, 1.0
    for i, w in enumerate(want_e):
        ask[f"executor{i}"], cap[f"executor{i}"] = w * e.cpu_us * US / dt, 1.0
    ask["postgres"] = (sum(want_c) * c.pg_us + sum(want_e) * e.pg_us) * US / dt
    cap["postgres"] = d.pg_cores
    redis = (sum(want_c) * c.redis_us + sum(want_e) * e.redis_us) * US / dt
    for s in range(d.redis_shards):
        ask[f"redis{s}"], cap[f"redis{s}"] = redis / d.redis_shards, 1.0
    if d.host_cores is not None:
        names = list(ask)
        shares = water_fill(
            max(0.0, d.host_cores - d.foreign_cores), [min(ask[n], cap[n]) for n in names]
        )
        cap = {n: min(cap[n], share) for n, share in zip(names, shares, strict=False)}
    scale = {n: min(1.0, cap[n] / ask[n]) if ask[n] > 0 else 1.0 for n in ask}
    # Redis work is spread evenly over the shards: the tightest shard limits everyone.
    shared = min(scale["postgres"], *(scale[f"redis{s}"] for s in range(d.redis_shards)))
    got_c = [w * min(scale[f"consumer{i}"], shared) for i, w in enumerate(want_c)]
    got_e = [w * min(scale[f"executor{i}"], shared) for i, w in enumerate(want_e)]
    for i, got in enumerate(got_c):
        mine = [p for p, owner in enumerate(owners) if owner == i]
        total = sum(state.partitions[p] for p in mine)
        for p in mine:
            state.partitions[p] -= got * state.partitions[p] / total if total else 0.0
    ingested, executed = sum(got_c), sum(got_e)
    state.due += ingested - executed * (1.0 - d.retry)
    finished = executed * (1.0 - d.retry)
    state.done += finished
    cores = {f"consumer{i}": g * c.cpu_us * US / dt for i, g in enumerate(got_c)}
    cores |= {f"executor{i}": g * e.cpu_us * US / dt for i, g in enumerate(got_e)}
    cores["postgres"] = (ingested * c.pg_us + executed * e.pg_us) * US / dt
    for s in range(d.redis_shards):
        cores[f"redis{s}"] = (
            (ingested * c.redis_us + executed * e.redis_us) * US / dt / d.redis_shards
        )
    # A process is busy for its hold time per event (it is not CPU-bound); PostgreSQL and
    # Redis are as busy as their cores.
    busy = {f"consumer{i}": g * c.hold_us * US / dt for i, g in enumerate(got_c)}
    busy |= {f"executor{i}": g * e.hold_us * US / dt for i, g in enumerate(got_e)}
    busy["postgres"] = cores["postgres"] / d.pg_cores
    busy |= {f"redis{s}": cores[f"redis{s}"] for s in range(d.redis_shards)}
    return Tick(ingested, executed, finished, cores, busy)


@dataclass(frozen=True)
class Steady:
    offered: float
    throughput: float  # events finished per second, second half of the run
    utilisation: dict[str, float]  # busiest instance of each component, share of its capacity
    backlog: float  # events waiting at the end (Kafka + executors' queue)


def run_steady(
    costs: Costs, d: Deployment, rate: float, seconds: float = 20.0, dt: float = 0.01
) -> Steady:
    """Offer ``rate`` events/s for ``seconds``; measure the second half."""
    state = State([0.0] * d.partitions, 0.0)
    ticks = round(seconds / dt)
    done_half = 0.0
    busy: dict[str, float] = {}
    for k in range(ticks):
        tick = step(state, d, costs, dt, rate * dt)
        if k >= ticks // 2:
            done_half += tick.done
            for name, share in tick.busy.items():
                busy[name] = busy.get(name, 0.0) + share
            if d.host_cores is not None:
                busy["host"] = busy.get("host", 0.0) + sum(tick.cores.values()) / d.host_cores
    n = ticks - ticks // 2
    by_component: dict[str, float] = {}
    for name, total in busy.items():
        component = name.rstrip("0123456789")
        by_component[component] = max(by_component.get(component, 0.0), total / n)
    return Steady(
        offered=rate,
        throughput=done_half / (n * dt),
        utilisation=by_component,
        backlog=sum(state.partitions) + state.due,
    )


def drain_rate(
    costs: Costs, d: Deployment, *, ingest: int = 0, due: int = 0, dt: float = 0.005
) -> float:
    """Events per second to work off a backlog: ``ingest`` events in Kafka (spread over the
    partitions; measured until all are ingested) or ``due`` attempts due at once (until all
    are executed). As the benchmarks measure: count / time to the last one."""
    state = State([ingest / d.partitions] * d.partitions, float(due))
    t, total = 0.0, 0.0
    while t < 3600.0:
        tick = step(state, d, costs, dt, 0.0)
        total += tick.ingested if ingest else tick.executed
        t += dt
        if total >= (ingest or due) * (1.0 - 1e-9):
            break
    return (ingest or due) / t


def saturation(costs: Costs, d: Deployment, lo: float = 100.0, hi: float = 1e7) -> float:
    """The highest offered rate the deployment keeps up with (bisection on run_steady)."""
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        r = run_steady(costs, d, mid, seconds=10.0, dt=0.02)
        if r.throughput >= 0.995 * mid and r.backlog < 0.5 * mid:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.01:
            break
    return lo


# -- the measured costs and points

#: Costs per event at the batch sizes of a process working flat out, from the quiet-machine
#: runs recorded in bench/RESULTS.md: ingest `dd30672` (one consumer, 24,329 events/s;
#: cores: consumer 0.56, PostgreSQL 0.16, Redis 0.19) and throughput `7e8119b` (one
#: executor, 7,042 and 5,942 executions/s; cores: executor 0.82 / 0.81, PostgreSQL 0.33 /
#: 0.32, Redis 0.21 / 0.22; the mean of the two runs).
RECORDED = Costs(
    consume=StageCost(hold_us=1e6 / 24_329, cpu_us=23.0, pg_us=6.6, redis_us=7.8),
    execute=StageCost(hold_us=1e6 / 6_492, cpu_us=126.0, pg_us=50.4, redis_us=33.4),
)


@dataclass(frozen=True)
class Point:
    """A measured 1 -> 2 scaling step: rates and the foreign cores of each window."""

    what: str  # "consumers" | "executors"
    source: str
    rates: tuple[float, float]
    foreign: tuple[float, float]
    shards: int = 1  # Redis servers (executor points); every executor serves all of them
    #: The run's own cost of the stage, from its one-process point (hold: the inverse of
    #: that rate; CPU per event in that window), for a check that needs no older run.
    own: StageCost | None = None


def with_own(point: Point, costs: Costs) -> Costs:
    """``costs`` with the point's stage replaced by the run's own cost of it."""
    if point.own is None:
        return costs
    if point.what == "consumers":
        return Costs(point.own, costs.execute)
    return Costs(costs.consume, point.own)


def stage_cost(one: dict[str, Any], rate: float, role: str) -> StageCost | None:
    """A one-process point's cost per event (``work.cpu_us``: /proc CPU per event of the
    window, by process name) as a :class:`StageCost`."""
    cpu = one.get("work", {}).get("cpu_us")
    if not cpu or rate <= 0:
        return None
    return StageCost(
        hold_us=1e6 / rate,
        cpu_us=sum(v for k, v in cpu.items() if k.startswith(role)),
        pg_us=cpu.get("postgres", 0.0),
        redis_us=sum(v for k, v in cpu.items() if k.startswith("redis")),
    )


#: bench/RESULTS.md, target 2 (`bench.throughput`, 100,000 events due at once): one and two
#: executor processes in the same run.
RECORD_POINTS = (
    Point("executors", "RESULTS.md throughput 7e8119b 03:47", (7_042, 6_384), (0.03, 0.09)),
    Point("executors", "RESULTS.md throughput 7e8119b 03:58", (5_942, 8_832), (0.05, 0.11)),
    Point("executors", "RESULTS.md throughput dd30672 02:53", (6_170, 8_060), (0.03, 0.09)),
)


#: bench/RESULTS.md, bench.capacity (2026-12-03, machine shared with other sessions' tests):
#: 100,000 events ingested by 1 then 2 consumers, 30,000 due at once drained by 1 then 2
#: executors, with the CPU other processes used in each window.
CAPACITY_POINTS = (
    Point("consumers", "bench.capacity 81c45d9 16:55", (6_095, 15_004), (1.67, 1.42)),
    Point("executors", "bench.capacity 81c45d9 16:55", (961, 1_633), (1.61, 1.47)),
    Point("consumers", "bench.capacity 4c6860f 16:59", (9_614, 6_216), (1.54, 1.64)),
    Point("executors", "bench.capacity 4c6860f 16:59", (1_398, 1_566), (1.54, 1.47)),
    Point("consumers", "bench.capacity 7b8bde5 17:03", (13_278, 16_986), (1.46, 1.33)),
    Point("executors", "bench.capacity 7b8bde5 17:03", (3_222, 2_488), (1.22, 1.24)),
    Point("consumers", "bench.capacity 1cf1914 17:12", (14_157, 18_348), (0.73, 1.14)),
    Point("executors", "bench.capacity 1cf1914 17:12", (2_338, 3_378), (1.07, 0.89)),
)


#: bench/RESULTS.md, `bench.capacity --scaling-only` (2026-12-03 21:12-21:19, after the
#: suite had finished: load average 0.4-0.7 at each start, 0.00-0.13 cores of other
#: processes in each window): 100,000 events ingested by 1 then 2 consumers; 30,000 due at
#: once drained by 1 then 2 executors with one Redis, then with 2 Redis shards (every
#: executor serving both). ``own``: each run's one-process cost (hold, CPU µs per event of
#: the process, PostgreSQL, every Redis), from its JSON via :func:`points_from_run`.
SHARD_RUN_POINTS = (
    Point("consumers", "bench.capacity 2f78f51 21:12", (26_548, 27_476), (0.0, 0.061),
          own=StageCost(37.67, 28.6, 9.7, 10.4)),
    Point("executors", "bench.capacity 2f78f51 21:12", (3_634, 5_392), (0.067, 0.0),
          own=StageCost(275.21, 207.3, 70.0, 50.7)),
    Point("executors", "bench.capacity 2f78f51 21:12", (4_079, 6_287), (0.109, 0.037), shards=2,
          own=StageCost(245.18, 194.7, 58.7, 55.3)),
    Point("consumers", "bench.capacity e8e246f 21:14", (25_656, 30_050), (0.0, 0.073),
          own=StageCost(38.98, 29.5, 9.8, 10.6)),
    Point("executors", "bench.capacity e8e246f 21:14", (3_901, 5_746), (0.084, 0.046),
          own=StageCost(256.34, 197.7, 61.7, 46.3)),
    Point("executors", "bench.capacity e8e246f 21:14", (4_423, 6_771), (0.126, 0.034), shards=2,
          own=StageCost(226.11, 180.7, 55.7, 52.7)),
    Point("consumers", "bench.capacity 6a848c3 21:17", (26_086, 28_464), (0.007, 0.07),
          own=StageCost(38.34, 29.1, 9.9, 10.6)),
    Point("executors", "bench.capacity 6a848c3 21:17", (3_744, 4_521), (0.126, 0.028),
          own=StageCost(267.11, 203.7, 64.7, 48.7)),
    Point("executors", "bench.capacity 6a848c3 21:17", (4_209, 5_131), (0.099, 0.054), shards=2,
          own=StageCost(237.56, 180.0, 103.0, 52.0)),
)  # fmt: skip


def checked_rates(point: Point, costs: Costs, count: int = 30_000) -> tuple[float, float]:
    """The simulated rates of a point's two setups on this machine (2 cores, shared with
    the foreign load its windows measured)."""
    out = []
    for n, foreign in zip((1, 2), point.foreign, strict=True):
        if point.what == "consumers":
            d = Deployment(3, n, 0, host_cores=2.0, foreign_cores=foreign)
            out.append(drain_rate(costs, d, ingest=count))
        else:
            d = Deployment(
                3, 1, n, redis_shards=point.shards, host_cores=2.0, foreign_cores=foreign,
                retry=0.0,
            )  # fmt: skip
            out.append(drain_rate(costs, d, due=count))
    return out[0], out[1]


def points_from_run(doc: dict[str, Any]) -> list[Point]:
    """The 1 -> 2 points of a ``bench.capacity`` run (its JSON)."""
    scaling = doc["results"].get("scaling", {})
    label = f"bench.capacity {doc['git']['label']} {doc['date'][11:16]}"
    out = []
    if len(c := scaling.get("consumers", [])) == 2:
        out.append(
            Point("consumers", label, (c[0]["per_s"], c[1]["per_s"]),
                  (c[0]["cpu"]["foreign_cores"], c[1]["cpu"]["foreign_cores"]),
                  own=stage_cost(c[0], c[0]["per_s"], "consumer"))
        )  # fmt: skip
    for key, e in scaling.items():
        if key.startswith("executors") and len(e) == 2:
            out.append(
                Point("executors", label,
                      (e[0]["throughput_finished"]["per_s"], e[1]["throughput_finished"]["per_s"]),
                      (e[0]["cpu"]["foreign_cores"], e[1]["cpu"]["foreign_cores"]),
                      shards=len(e[0].get("shards", [])) or 1,
                      own=stage_cost(e[0], e[0]["throughput_finished"]["per_s"], "executor"))
            )  # fmt: skip
    return out


def check_table(points: Sequence[Point], costs: Costs) -> list[list[str]]:
    """Each point against the simulation with ``costs``, and, for points of a run that
    measured its own one-process costs, with those (the second executor's or consumer's
    gain predicted from the same run's first)."""
    own = any(pt.own is not None for pt in points)
    rows = [
        ["step", "measured (source)", "foreign cores", "simulated", "ratio measured / simulated"]
        + (["simulated with the run's own 1-process costs"] if own else [])
    ]
    for pt in points:
        sim = checked_rates(pt, costs)
        measured = pt.rates[1] / pt.rates[0]
        simulated = sim[1] / sim[0]
        row = [
            f"1 -> 2 {pt.what}" + (f", {pt.shards} Redis shards" if pt.shards > 1 else ""),
            f"{pt.rates[0]:,.0f} -> {pt.rates[1]:,.0f}/s = {measured:.2f}x ({pt.source})",
            f"{pt.foreign[0]:.2f} / {pt.foreign[1]:.2f}",
            f"{sim[0]:,.0f} -> {sim[1]:,.0f}/s = {simulated:.2f}x",
            f"{measured / simulated:.2f} (rates: {pt.rates[0] / sim[0]:.2f}, {pt.rates[1] / sim[1]:.2f})",
        ]  # fmt: skip
        if own:
            if pt.own is None:
                row.append("")
            else:
                mine = checked_rates(pt, with_own(pt, costs))
                row.append(
                    f"{mine[0]:,.0f} -> {mine[1]:,.0f}/s = {mine[1] / mine[0]:.2f}x "
                    f"(measured / simulated {measured / (mine[1] / mine[0]):.2f})"
                )
        rows.append(row)
    return rows


# -- the curves


#: One billion events a day at 5x the mean at peak (docs/capacity.md): the deployment sized
#: there, on dedicated machines.
BILLION = Deployment(
    partitions=48, consumers=6, executors=16, redis_shards=8, pg_cores=16.0, retry=0.1
)
THIS_MACHINE = Deployment(partitions=3, consumers=1, executors=1, host_cores=2.0, retry=0.1)


COLOURS = {"consumer": "C0", "executor": "C1", "host": "C2", "postgres": "C3", "redis": "C4"}


def sweep(costs: Costs, d: Deployment, rates: Sequence[float]) -> list[Steady]:
    return [run_steady(costs, d, r, seconds=10.0, dt=0.02) for r in rates]


def plot(path: Path, costs: Costs) -> dict[str, float]:
    from bench.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    found: dict[str, float] = {}
    for ax, (title, d, top) in zip(
        axes,
        (
            (
                "this machine: 1 consumer, 1 executor, 1 Redis, all on 2 cores",
                THIS_MACHINE,
                12_000.0,
            ),
            (
                f"1 billion/day sizing: {BILLION.consumers} consumers ({BILLION.partitions} partitions), "
                f"{BILLION.executors} executors,\n{BILLION.redis_shards} Redis shards, "
                f"PostgreSQL {BILLION.pg_cores:g} cores",
                BILLION,
                150_000.0,
            ),
        ),
        strict=True,
    ):
        rates = [top * k / 40 for k in range(1, 41)]
        runs = sweep(costs, d, rates)
        names = sorted({n for r in runs for n in r.utilisation})
        for name in names:
            ax.plot(
                rates,
                [r.utilisation.get(name, 0.0) for r in runs],
                color=COLOURS.get(name),
                label=f"{name} (busiest)" if name != "host" else "host CPU",
            )
        ax.plot(rates, [r.throughput / r.offered for r in runs], "k--", label="finished / offered")
        sat = saturation(costs, d, lo=rates[0], hi=top * 2)
        at = run_steady(costs, d, sat, seconds=10.0, dt=0.02).utilisation
        first = max((n for n in at if n != "host"), key=lambda n: at[n])
        found[title.split(":")[0]] = sat
        ax.axvline(sat, color="grey", linewidth=1)
        ax.annotate(f"saturates at {sat:,.0f}/s: {first}", (sat, 1.02), fontsize=8)
        if d is BILLION:
            for x, label in ((11_574, "mean"), (57_870, "peak")):
                ax.axvline(x, color="green", linestyle=":", linewidth=1)
                ax.annotate(label, (x, 0.05), fontsize=8, color="green")
        ax.set_xlabel("offered events/s (10% of attempts retried)")
        ax.set_ylabel("utilisation (busiest instance)")
        ax.set_ylim(0, 1.1)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return found


def markdown(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, action="append", default=[],
                        help="a bench.capacity JSON (bench/out/) whose 1 -> 2 points to check too")  # fmt: skip
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("capacity.png"))
    args = parser.parse_args(argv)
    points = [*RECORD_POINTS, *CAPACITY_POINTS, *SHARD_RUN_POINTS]
    for path in args.run:
        points += points_from_run(json.loads(path.read_text()))
    print(markdown(check_table(points, RECORDED)))
    found = plot(args.plot, RECORDED)
    for name, sat in found.items():
        print(f"{name}: saturates at {sat:,.0f} events/s")
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
