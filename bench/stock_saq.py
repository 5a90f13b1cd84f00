"""The baseline: a stock SAQ worker on a stock ``saq.Queue`` (Redis), on plain asyncio.

This module imports nothing from eventsched, so the baseline runs exactly as SAQ users run
it: ``asyncio.run``, ``saq.Worker(queue, functions, concurrency=10)``, SAQ's own schedule
timer, ``BLMOVE`` per slot and status writes. The job function is a no-op that records
``time.time()`` when it starts; an ``after_process`` hook records when SAQ finished the job
(status written to Redis). Lateness = start - the job's ``scheduled`` (the float epoch we
enqueued, the same due times eventsched gets).

Commands::

    worker   --expect N [--concurrency 10]    run until N jobs finished (or --timeout)
    feed     --rate R --duration D ...        steady stock ``queue.enqueue`` calls
    preload  --count N --due T                N jobs due at T, written in SAQ's own format

``preload`` writes what SAQ's enqueue script writes for a scheduled job (``SET`` of the
serialized job, ``ZADD incomplete <scheduled> <id>``), pipelined, because 100,000 stock
``enqueue`` round trips would take longer than the benchmark itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from redis import asyncio as aioredis
from saq import Job, Queue, Worker
from saq.job import Status
from saq.queue.redis import RedisQueue
from saq.types import Context
from saq.utils import now

FUNCTION = "noop"
JOB_TIMEOUT = 330  # as eventsched's executor jobs


def _job(key: str, scheduled: float) -> Job:
    return Job(function=FUNCTION, key=key, scheduled=scheduled, timeout=JOB_TIMEOUT, retries=1)  # type: ignore[arg-type]  # SAQ stores any JSON number


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    queue = Queue.from_url(args.redis, name=args.queue)
    records: dict[str, list[float]] = {}
    finished = 0
    done = asyncio.Event()
    cpu_first = 0.0  # process CPU when the first job started
    cpu_last = [0.0]  # ... and when the last one finished

    async def noop(ctx: Context) -> None:
        nonlocal cpu_first
        job = ctx["job"]
        if not records:
            cpu_first = time.process_time()
        records[job.key] = [float(job.scheduled), time.time(), 0.0]

    async def after(ctx: Context) -> None:
        nonlocal finished
        record = records.get(ctx["job"].key)
        if record is not None and record[2] == 0.0:
            record[2] = time.time()
            finished += 1
            if finished >= args.expect:
                cpu_last[0] = time.process_time()
                done.set()

    async def ready(ctx: Context) -> None:
        print(json.dumps({"event": "ready"}), flush=True)

    w = Worker(
        queue,
        functions=[(FUNCTION, noop)],
        concurrency=args.concurrency,
        startup=[ready],
        after_process=[after],
    )
    began = time.time()
    task = asyncio.create_task(w.start())
    try:
        await asyncio.wait_for(done.wait(), args.timeout)
    except TimeoutError:
        print(json.dumps({"event": "timeout", "finished": finished}), flush=True)
    await w.stop()
    await task
    await queue.disconnect()
    return {
        "concurrency": args.concurrency,
        "expected": args.expect,
        "finished": finished,
        "elapsed_s": round(time.time() - began, 3),
        # CPU from the first job's start to the last one's finish (the measured window).
        "cpu_work_s": round((cpu_last[0] or time.process_time()) - cpu_first, 3),
        "vm_hwm_mb": _hwm_mb(),
        "jobs": list(records.values()),  # [scheduled, started, finished]
    }


async def feed(args: argparse.Namespace) -> dict[str, Any]:
    """Steady stock ``enqueue`` calls; due offsets identical to bench.feeder's (same seed).
    With ``--count``, exactly that many jobs (at ``--rate``), else ``rate * duration``."""
    queue = Queue.from_url(args.redis, name=args.queue)
    await queue.connect()
    rng = random.Random(args.seed)
    sent = 0
    origin = time.time()
    end = origin + args.duration
    total = args.count if args.count > 0 else None
    lead_min = float("inf")
    while True:
        t = time.time()
        if (total is None and t >= end) or (total is not None and sent >= total):
            break
        due_count = int((t - origin) * args.rate) - sent
        if total is not None:
            due_count = min(due_count, total - sent)
        if due_count > 0:
            jobs = [
                _job(
                    uuid.uuid4().hex,
                    round((t + rng.uniform(args.delay_min, args.delay_max)) * 1000) / 1000,
                )
                for _ in range(due_count)
            ]
            await asyncio.gather(*(queue.enqueue(job) for job in jobs))
            lead_min = min(lead_min, min(float(j.scheduled) for j in jobs) - time.time())
            sent += due_count
        await asyncio.sleep(args.tick)
    elapsed = time.time() - origin
    await queue.disconnect()
    return {
        "mode": "steady",
        "sent": sent,
        "elapsed_s": round(elapsed, 3),
        "achieved_rate": round(sent / elapsed, 1),
        "min_lead_s": round(lead_min, 3),
    }


async def preload(args: argparse.Namespace) -> dict[str, Any]:
    redis = aioredis.from_url(args.redis)
    queue = RedisQueue(redis, name=args.queue)
    began = time.time()
    queued_ms = now()
    incomplete = queue.namespace("incomplete")
    for start in range(0, args.count, 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(start, min(args.count, start + 5000)):
                job = _job(uuid.uuid4().hex, args.due)
                job.queue = queue
                job.queued = queued_ms
                job.status = Status.QUEUED
                pipe.set(job.id, queue.serialize(job))
                pipe.zadd(incomplete, {job.id: args.due})
            await pipe.execute()
    done = time.time()
    await redis.aclose()
    return {
        "mode": "preload",
        "count": args.count,
        "load_s": round(done - began, 3),
        "lead_left_s": round(args.due - done, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("command", choices=["worker", "feed", "preload"])
    parser.add_argument("--redis", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--delay-min", type=float, default=2.0)
    parser.add_argument("--delay-max", type=float, default=10.0)
    parser.add_argument(
        "--count", type=int, default=0, help="jobs (preload; feed: 0 = rate x duration)"
    )
    parser.add_argument("--due", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--tick", type=float, default=0.1)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    if "eventsched" in sys.modules:  # the baseline must stay stock
        raise SystemExit("bench.stock_saq must not import eventsched")
    run = {"worker": worker, "feed": feed, "preload": preload}[args.command]
    result = asyncio.run(run(args))
    result["cpu_s"] = round(time.process_time(), 3)
    args.result.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
