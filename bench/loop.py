"""Event-loop cost per asyncio task wake-up: plain asyncio, stock trio-asyncio, batched.

The executor and consumer run SAQ, redis.asyncio and psycopg inside trio through
trio-asyncio, whose loop runs one asyncio callback per trio scheduler pass.
:mod:`eventsched.core.runtime.aioloop` runs the ready ones in batches. This measures what one
wake-up costs in each setup: 50 tasks, each waiting on its own ``asyncio.Queue``, woken
round after round (the shape of the executor's slots waiting for jobs). Each setup runs in
a fresh interpreter, best of ``--repeat``.

    python -m bench.loop            # 2,000 rounds x 50 tasks, best of 5
    python -m bench.loop --quick    # CI: checks it runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence

SETUPS = ("asyncio", "trio-asyncio stock", "trio-asyncio batched")
TASKS = 50


async def _rounds(rounds: int) -> float:
    import asyncio

    async def worker(queue: asyncio.Queue[int]) -> None:
        for _ in range(rounds):
            await queue.get()

    queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(TASKS)]
    tasks = [asyncio.ensure_future(worker(q)) for q in queues]
    began = time.perf_counter()
    for _ in range(rounds):
        for queue in queues:
            queue.put_nowait(1)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return (time.perf_counter() - began) / (rounds * TASKS) * 1e6


def _measure(setup: str, rounds: int) -> float:
    """In this interpreter: microseconds per task wake-up."""
    if setup == "asyncio":
        import asyncio

        return asyncio.run(_rounds(rounds))
    import trio
    import trio_asyncio

    from eventsched.core.runtime import aioloop, bootstrap

    bootstrap.install()  # the batched step, as in every eventsched process

    if setup == "trio-asyncio stock":
        assert aioloop._original is not None
        trio_asyncio._base.BaseTrioEventLoop._main_loop_one = aioloop._original  # type: ignore[method-assign]
    else:
        assert aioloop.installed(), "batched step not installed (unchecked trio-asyncio?)"

    async def main() -> float:
        async with trio_asyncio.open_loop():
            return float(await trio_asyncio.aio_as_trio(_rounds)(rounds))

    return trio.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--one", choices=SETUPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rounds, repeat = (50, 1) if args.quick else (args.rounds, args.repeat)
    if args.one:
        print(_measure(args.one, rounds))
        return 0
    best: dict[str, float] = {}
    for setup in SETUPS:
        runs = []
        for _ in range(repeat):
            out = subprocess.run(
                [sys.executable, "-m", "bench.loop", "--one", setup, "--rounds", str(rounds)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs.append(float(out.stdout.strip().splitlines()[-1]))
        best[setup] = round(min(runs), 2)
    result = {
        "benchmark": "loop",
        "quick": args.quick,
        "rounds": rounds,
        "tasks": TASKS,
        "us_per_wakeup": best,
        "stock_vs_batched": round(best["trio-asyncio stock"] / best["trio-asyncio batched"], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
