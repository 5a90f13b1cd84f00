"""The HTTP API: ``POST /v1/events`` throughput and latency, every event acknowledged.

One api process (``python -m eventsched run --role api``) on the embedded stack; the
harness is the client (raw HTTP/1.1 keep-alive connections on trio, in this process: the
request's bytes are built once and answers are parsed minimally, since a pooled client such
as httpx, or even h11 per request, costs a large share of what the api does). A 202
means the broker acknowledged the event, so the count of 202s is the count of events in
Kafka; the harness checks that against the topic's offsets at the end.

* **throughput**: ``--connections`` clients send back to back (closed loop) for
  ``--duration`` s; events/s = 202 answers / elapsed.
* **latency at a fixed rate**: requests start on a fixed schedule of ``--rate`` per second
  (open loop: a slow answer does not delay the next request) for ``--duration`` s;
  p50/p99/max of the request time as the client sees it; a request refused or unanswered
  within ``TIMEOUT`` counts as status 0.

Cores used by the api, the client (this process), each server and the whole machine are
measured per phase; ``--profile`` samples the api with py-spy during the closed loop.

``--batch N`` sends N events per request to ``POST /v1/events/batch``: ``--rate`` stays in
events per second and a 202 counts N events. Both phases send events due an hour out with
no idempotency key (no PostgreSQL read on the path). Numbers include the client's own cost: on a 2-core machine the client and the api
process share the CPUs.

    python -m bench.api                           # 10 s each, 32 connections, 200/s
    python -m bench.api --duration 30 --rate 500
    python -m bench.api --batch 50 --rate 2000    # 50 events per POST /v1/events/batch
    python -m bench.api --quick                   # CI: 2 s each
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import h11
import trio
from confluent_kafka import Consumer, KafkaError, TopicPartition

from bench.profiling import Profiler
from bench.report import pyplot
from bench.run import BenchRun, log, parse_args, step
from bench.sampling import Sampler
from bench.stack import Role, Stack
from bench.stats import percentiles
from tests.support.proc import free_port

TOKEN = "bench-token-0123456789abcdef"
BODY = b'{"type": "bench.event", "payload": {"n": 1, "text": "hello"}, "delay_ms": 3600000}'
#: Seconds after which the open loop gives up on a request (status 0).
TIMEOUT = 10.0
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=32, help="throughput clients")
    parser.add_argument("--rate", type=float, default=200.0, help="fixed-rate phase, per s")
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="events per request: 1 = POST /v1/events, N > 1 = POST /v1/events/batch",
    )


def request_body(batch: int) -> tuple[str, bytes]:
    """The target and body of every request: one event, or ``batch`` of them."""
    if batch == 1:
        return "/v1/events", BODY
    return "/v1/events/batch", b'{"events": [' + b", ".join([BODY] * batch) + b"]}"


class Connection:
    """One keep-alive HTTP/1.1 connection on a trio stream. The request's bytes are built
    once (h11 checks them); each answer is parsed just enough for its status line and
    ``Content-Length``: a fraction of the client CPU of h11 or a pooled client, so the api,
    not the harness, is measured."""

    def __init__(self, host: str, port: int, batch: int = 1) -> None:
        self.host, self.port = host, port
        self.stream: trio.SocketStream | None = None
        self.buffer = b""
        conn = h11.Connection(h11.CLIENT)
        target, body = request_body(batch)
        request = h11.Request(
            method="POST",
            target=target,
            headers=[
                ("Host", f"{host}:{port}"),
                *HEADERS.items(),
                ("Content-Length", str(len(body))),
            ],
        )
        self.request = b"".join(
            conn.send(event) or b"" for event in (request, h11.Data(data=body), h11.EndOfMessage())
        )

    async def post(self) -> int:
        """Send the event; the answer's status code."""
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(self.host, self.port)
        await self.stream.send_all(self.request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._receive()
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(self.buffer) < end + 4 + length:
            await self._receive()
        self.buffer = self.buffer[end + 4 + length :]
        return status

    async def _receive(self) -> None:
        assert self.stream is not None
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("closed by the server")
        self.buffer += data

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


async def closed_loop(
    host: str, port: int, connections: int, duration: float, batch: int = 1
) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    deadline = trio.current_time() + duration

    async def client() -> None:
        connection = Connection(host, port, batch)
        try:
            while trio.current_time() < deadline:
                began = time.perf_counter()
                statuses[await connection.post()] += 1
                latencies.append((time.perf_counter() - began) * 1000)
        finally:
            await connection.aclose()

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(client)
    elapsed = time.perf_counter() - began
    return {
        "connections": connections,
        "elapsed_s": round(elapsed, 3),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "acknowledged": statuses[202] * batch,
        "events_per_s": round(statuses[202] * batch / elapsed, 1),
        "latency_ms": percentiles(latencies),
        "latencies": latencies,
    }


async def open_loop(
    host: str, port: int, rate: float, duration: float, batch: int = 1
) -> dict[str, Any]:
    """Requests on a fixed schedule (``rate`` events/s: ``rate / batch`` requests/s); each
    takes an idle connection or opens one."""
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    rate = rate / batch  # requests per second from here on
    count = math.floor(rate * duration)
    idle: list[Connection] = []
    opened: list[Connection] = []
    starts: list[float] = []  # seconds from the phase's start, in the order of latencies
    t0 = time.perf_counter()

    async def one() -> None:
        connection = idle.pop() if idle else Connection(host, port, batch)
        if connection not in opened:
            opened.append(connection)
        began = time.perf_counter()
        status = 0
        try:
            with trio.move_on_after(TIMEOUT):
                status = await connection.post()
        except (OSError, trio.BrokenResourceError):
            pass
        if status == 0:
            # A server that cannot keep up refuses connections beyond its backlog, or keeps
            # a request past TIMEOUT: counted as status 0 (failed), its time included.
            statuses[0] += 1
            latencies.append((time.perf_counter() - began) * 1000)
            starts.append(began - t0)
            return
        statuses[status] += 1
        latencies.append((time.perf_counter() - began) * 1000)
        starts.append(began - t0)
        idle.append(connection)

    origin = trio.current_time()
    late_starts = 0
    async with trio.open_nursery() as nursery:
        for i in range(count):
            due = origin + i / rate
            if trio.current_time() > due + 0.01:
                late_starts += 1  # the client itself could not keep the schedule
            await trio.sleep_until(due)
            nursery.start_soon(one)
    for connection in opened:
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            await connection.aclose()
    return {
        "rate": rate * batch,
        "requests": count,
        "connections": len(opened),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "acknowledged": statuses[202] * batch,
        "late_starts": late_starts,
        "latency_ms": percentiles(latencies),
        # (start s, ms) of the ten slowest: whether slow answers cluster in time
        "slowest": sorted(
            ((round(s, 3), round(ms, 1)) for s, ms in zip(starts, latencies, strict=True)),
            key=lambda pair: -pair[1],
        )[:10],
        "latencies": latencies,
    }


def server_time(api: Role, batch: int, since: tuple[float, float] | None = None) -> Any:
    """The api's own time per request: (sum s, count) now, or the mean ms since ``since``."""
    samples = api.metrics()
    target, _ = request_body(batch)
    labels = f'method="POST",route="{target}"'
    total = samples.get(f"eventsched_api_request_duration_seconds_sum{{{labels}}}", 0.0)
    count = samples.get(f"eventsched_api_request_duration_seconds_count{{{labels}}}", 0.0)
    if since is None:
        return (total, count)
    done = count - since[1]
    return round((total - since[0]) / done * 1000, 2) if done else None


def topic_messages(bootstrap: str, topic: str) -> int:
    """Messages in the topic, counted by reading it to the end of every partition (the
    high watermarks Tansu reports can trail the messages it acknowledged)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-api-count",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        done: set[int] = set()
        total = 0
        deadline = time.monotonic() + 120
        while len(done) < len(partitions) and time.monotonic() < deadline:
            for message in consumer.consume(10_000, 0.5):
                error = message.error()
                if error is None:
                    total += 1
                    done.discard(message.partition())
                elif error.code() == KafkaError._PARTITION_EOF:
                    done.add(message.partition())
        return total
    finally:
        consumer.close()


def cpu_note(name: str, phase: dict[str, Any]) -> str:
    """Cores each process used during a phase (api, client, servers, anything else)."""
    cpu = phase["cpu"]
    wall = cpu["wall_s"]
    shares = {**cpu["cores"], "client": round(phase["client_cpu_s"] / wall, 2)}
    text = ", ".join(f"{k} {v:.2f}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
    return f"{name}, cores used: {text}; whole machine {cpu['machine_busy_cores']:.2f} of 2"


def plot(path: Path, throughput: dict[str, Any], fixed: dict[str, Any]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in (
        (f"closed loop, {throughput['connections']} connections", throughput["latencies"]),
        (f"open loop, {fixed['rate']:g}/s", fixed["latencies"]),
    ):
        if values:
            xs = sorted(values)
            ax.plot(
                xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{label} (n={len(xs):,})"
            )
    ax.set_xscale("log")
    ax.set_xlabel("POST /v1/events request time (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("HTTP API: schedule latency (broker acknowledged)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], add_args)
    if args.quick:
        args.duration, args.connections, args.rate = 2.0, 8, 50.0
    run = BenchRun("api", args)
    sampler = Sampler().start()
    profiler = Profiler(run)
    try:
        with Stack(run) as stack:
            sampler.track_servers(stack.server_pids())
            phases = measure(args, stack, sampler, profiler)
            profile = profiler.finish()
    finally:
        sampler.stop()
    warm_up, throughput, fixed, in_topic = phases
    throughput["cpu"] = sampler.cpu_between("closed_start", "closed_end")
    fixed["cpu"] = sampler.cpu_between("open_start", "open_end")
    report(run, args, warm_up, throughput, fixed, in_topic, profile)


def measure(
    args: argparse.Namespace, stack: Stack, sampler: Sampler, profiler: Profiler
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], int]:
    """Start the api, run the warm-up and both phases; the number of messages in the topic
    that the three added."""
    port = free_port()
    settings = stack.settings("api", api={"port": port})
    # write_toml writes scalars and lists of them; a token is a table.
    with settings.open("a") as f:
        f.write(f'\n[[default.api.tokens]]\nname = "bench"\ntoken = "{TOKEN}"\n')
    api = stack.role("api", settings)
    with step("api role starting"):
        api.wait_ready()
    sampler.track_cpu("api", api.pid)
    before = topic_messages(stack.kafka, "events")
    with step("warm-up (not measured): 4 connections, 1 s"):
        # The producer's first message to each partition waits for metadata and a
        # broker connection: seconds of latency that say nothing about the api.
        warm_up = trio.run(closed_loop, "127.0.0.1", port, 4, 1.0, args.batch)
    with step(f"closed loop, {args.connections} connections, {args.duration:g} s"):
        server = server_time(api, args.batch)
        if args.profile:
            profiler.start("api", api.pid, min(args.profile_seconds, args.duration))
        sampler.mark("closed_start")
        client = time.process_time()
        throughput = trio.run(
            closed_loop, "127.0.0.1", port, args.connections, args.duration, args.batch
        )
        throughput["client_cpu_s"] = round(time.process_time() - client, 3)
        sampler.mark("closed_end")
        throughput["server_mean_ms"] = server_time(api, args.batch, since=server)
    with step(f"open loop, {args.rate:g}/s, {args.duration:g} s"):
        server = server_time(api, args.batch)
        sampler.mark("open_start")
        client = time.process_time()
        fixed = trio.run(open_loop, "127.0.0.1", port, args.rate, args.duration, args.batch)
        fixed["client_cpu_s"] = round(time.process_time() - client, 3)
        sampler.mark("open_end")
        fixed["server_mean_ms"] = server_time(api, args.batch, since=server)
    in_topic = topic_messages(stack.kafka, "events") - before
    return warm_up, throughput, fixed, in_topic


def report(
    run: BenchRun,
    args: argparse.Namespace,
    warm_up: dict[str, Any],
    throughput: dict[str, Any],
    fixed: dict[str, Any],
    in_topic: int,
    profile: dict[str, Any],
) -> None:
    acknowledged = sum(p["acknowledged"] for p in (warm_up, throughput, fixed))
    log(f"acknowledged {acknowledged}, in the topic {in_topic}")
    t, f = throughput["latency_ms"], fixed["latency_ms"]
    table = [
        ["phase", "events/s acknowledged", "p50 ms", "p99 ms", "max ms", "api mean ms", "answers"],
        [
            f"closed loop, {args.connections} connections",
            f"{throughput['events_per_s']:,.0f}",
            f"{t.get('p50', 0):.1f}",
            f"{t.get('p99', 0):.1f}",
            f"{t.get('max', 0):.1f}",
            str(throughput["server_mean_ms"]),
            str(throughput["statuses"]),
        ],
        [
            f"open loop, {args.rate:g}/s",
            f"{fixed['acknowledged'] / args.duration:,.0f}",
            f"{f.get('p50', 0):.1f}",
            f"{f.get('p99', 0):.1f}",
            f"{f.get('max', 0):.1f}",
            str(fixed["server_mean_ms"]),
            str(fixed["statuses"]),
        ],
    ]
    results = {
        "duration_s": args.duration,
        "throughput": {k: v for k, v in throughput.items() if k != "latencies"},
        "fixed_rate": {k: v for k, v in fixed.items() if k != "latencies"},
        "acknowledged": acknowledged,
        "in_topic": in_topic,
        "profile": profile,
    }
    target, _ = request_body(args.batch)
    notes = [
        f"{args.batch} event(s) per request, POST {target}; latencies are per request",
        f"every 202 is an event the broker acknowledged: {acknowledged} answered"
        f" (warm-up included), {in_topic} in the topic",
        "client (raw HTTP/1.1 on trio) and api process share the machine; api mean ms is the"
        " api's own time per POST (eventsched_api_request_duration_seconds)",
        *(
            cpu_note(name, phase)
            for name, phase in (("closed loop", throughput), ("open loop", fixed))
        ),
    ]
    run.finish(results, table, notes, plot=lambda p: plot(p, throughput, fixed))


if __name__ == "__main__":
    main()
