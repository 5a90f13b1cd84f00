"""Fault injection ("chaos"): prove that nothing is lost or run twice while things break.

On a fresh Docker-free stack (:class:`eventsched.core.operations.devstack.DevStack` in a temp dir) this
runs two consumers and two executors as separate OS processes, produces a steady load from
the harness itself (confluent-kafka, acks=all, idempotent: every acknowledged event id is
recorded, so "what was produced" is exact) and fires a seeded random fault schedule:

* ``kill9_consumer`` / ``kill9_executor``: SIGKILL a random instance, restart it after a pause;
* ``sigterm_consumer`` / ``sigterm_executor``: graceful stop under load, then restart;
* ``redis_flushall`` and ``redis_restart`` (stop, pause, start on the same port);
* ``postgres_restart``: the server is down for a few seconds;
* ``broker_pause``: SIGSTOP/SIGCONT of Tansu (it keeps data in memory: never killed);
* ``bad_burst``: every malformed message of the bad-input corpus (tests/data/bad_messages).

After the load stops and the system drains, a ledger compares what was produced with
PostgreSQL, the DLQ topic and the handler's own journal, prints a table, writes it as JSON
and exits 1 if any event is lost, duplicated or stuck (or a dead letter / malformed message
is missing or misfiled), or if the handler ran in a way docs/execution.md ("Leases") rules out.

The handler (:func:`journaled`, ``simulate`` underneath) appends a line to a journal file
shared by every executor when it is called (``start``) and when it returns (``end``, ok or
failed); a run stopped by its lease or killed has no ``end``. The ledger counts handler
invocations from it, not only attempt rows, and fails on: a run that ended after a later
run of the same event had started (two runs overlapped: the second started while the first
was alive), the same attempt of an event started twice, and a succeeded event with no run
that ended ok.

    python -m bench.chaos                          # 120 s at 150 events/s, random seed
    python -m bench.chaos --seed 7 --duration 40 --fault-gap 0.5-1.5 --rate 100 --delay-max 10
                                                   # the CI run (tests/integration/test_chaos.py)
    python -m bench.chaos --duration 1800 --fault-gap 20-40   # the 30-minute soak
    python -m bench.chaos --seed N ...             # replay a failure with its seed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from bench.run import DEFAULT_OUT, log
from bench.stack import Role, clean_env
from bench.stats import percentiles
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event
from eventsched.core.kafka import ensure_topics
from eventsched.core.operations.devstack import DevStack
from eventsched.core.runtime.contracts import Handler, HandlerContext, HandlerEvent, handler_factory
from eventsched.core.store import migrations
from tests.support.clients import FAST_GROUP_CONFIG, query
from tests.support.journal import append_line
from tests.support.settingsfile import write_settings

TOPIC = "events"
DLQ_TOPIC = "events-dlq"
PARTITIONS = 3
EVENT_TYPE = "chaos.event"
MAX_ATTEMPTS = 3
#: A due time inside [fault start, fault end + this] counts as "inside a fault window":
#: recovery (group rebalance, reconciler pass, backlog) outlives the fault itself.
RECOVERY_TAIL = 10.0
#: Corpus values larger than this are skipped: they exceed the producer's message.max.bytes.
MAX_BAD_VALUE = 512 * 1024
FAULT_KINDS = (
    "kill9_consumer",
    "kill9_executor",
    "sigterm_consumer",
    "sigterm_executor",
    "redis_flushall",
    "redis_restart",
    "postgres_restart",
    "broker_pause",
    "bad_burst",
)


#: Environment variable naming the handler journal of the executors.
JOURNAL_ENV = "CHAOS_HANDLER_JOURNAL"  # not EVENTSCHED_*: that prefix is settings


# --------------------------------------------------------------------------- the handler


def _journal(path: str, what: str, event: HandlerEvent, ok: bool | None = None) -> None:
    line = json.dumps(
        {"what": what, "event": event.id, "attempt": event.attempt, "ok": ok,
         "pid": os.getpid(), "t": time.time()}
    )  # fmt: skip
    append_line(path, line)


@handler_factory
def journaled(context: HandlerContext) -> Handler:
    """The executors' handler in the chaos run: ``simulate``, with every invocation written
    to the journal file named by ``$CHAOS_HANDLER_JOURNAL`` (asyncio side)."""
    from eventsched.plugins.handlers import simulate

    inner = simulate(context)
    path = os.environ[JOURNAL_ENV]

    async def handle(event: HandlerEvent) -> None:
        _journal(path, "start", event)
        try:
            await inner(event)
        except Exception:
            _journal(path, "end", event, ok=False)
            raise
        _journal(path, "end", event, ok=True)

    return handle


@dataclass
class Fault:
    kind: str
    start: float  # epoch seconds
    end: float = 0.0
    detail: str = ""


@dataclass
class Ledger:
    """What the harness produced (only acknowledged messages count)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    produced: dict[str, float] = field(default_factory=dict)  # event id -> due (epoch)
    produce_failed: dict[str, str] = field(default_factory=dict)  # id -> error (in doubt)
    bad: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)  # (p, off) -> case
    bad_failed: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the load


class Load:
    """A steady stream of ``simulate`` events from a harness thread (never forks)."""

    def __init__(self, bootstrap: str, rate: float, delay: tuple[float, float], seed: int) -> None:
        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.max.bytes": 2 * 1024 * 1024,
                # Only critical librdkafka lines: broker pauses make it chatty on stderr.
                "log_level": 2,
            }
        )
        self.rate = rate
        self.delay = delay
        self.rng = random.Random(seed ^ 0x5EED)
        self.ledger = Ledger()
        self.buffer_full = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def _on_event(self, event_id: str, due: float) -> Callable[[Any, Any], None]:
        def report(err: Any, _msg: Any) -> None:
            with self.ledger.lock:
                if err is None:
                    self.ledger.produced[event_id] = due
                else:
                    self.ledger.produce_failed[event_id] = str(err)

        return report

    def _run(self) -> None:
        sent = 0
        t0 = time.monotonic()
        headers: list[tuple[str, str | bytes | None]] = list(kafka_headers())
        while not self.stop.is_set():
            due_count = int((time.monotonic() - t0) * self.rate)
            while sent < due_count:
                now = datetime.now(UTC)
                due = now + timedelta(seconds=self.rng.uniform(*self.delay))
                event = new_event(EVENT_TYPE, {"n": sent}, due, now=None)
                try:
                    self.producer.produce(
                        TOPIC,
                        encode_event(event),
                        kafka_key(event),
                        headers=headers,
                        on_delivery=self._on_event(str(event.id), event.execute_at.timestamp()),
                    )
                except BufferError:  # local queue full (long broker pause): never produced
                    self.buffer_full += 1
                sent += 1
            self.producer.poll(0.01)

    def bad_burst(self) -> int:
        """Produce the malformed corpus; returns how many messages were sent."""
        from tests.support.corpus import load_corpus

        sent = 0
        for case in load_corpus(datetime.now(UTC)):
            if case.expect == "ok" or (case.value is not None and len(case.value) > MAX_BAD_VALUE):
                continue

            def report(
                err: Any, msg: Any, name: str = case.name, expect: str = case.expect
            ) -> None:
                with self.ledger.lock:
                    if err is None:
                        self.ledger.bad[(msg.partition(), msg.offset())] = (name, expect)
                    else:
                        self.ledger.bad_failed.append(f"{name}: {err}")

            headers: list[tuple[str, str | bytes | None]] = list(case.headers.items())
            self.producer.produce(TOPIC, case.value, headers=headers, on_delivery=report)
            sent += 1
        return sent

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()
        remaining = self.producer.flush(120)
        if remaining:
            log(f"producer: {remaining} messages still unacknowledged after 120 s")
        # Disconnect now: on SIGTERM, Tansu waits about 5 s for connected clients to leave,
        # and the stack stops with this run.
        self.producer.close()


# --------------------------------------------------------------------------- processes


class Roles:
    """Two consumers and two executors; restarted in place (same name, same settings)."""

    def __init__(self, settings: Path, env: Mapping[str, str], logdir: Path) -> None:
        self.settings = settings
        self.env = env
        self.logdir = logdir
        self.procs: dict[tuple[str, int], Role] = {}
        self.restarts: Counter[str] = Counter()

    def start(self, role: str, index: int) -> Role:
        proc = Role(role, self.settings, self.env, self.logdir, index)
        self.procs[(role, index)] = proc
        return proc

    def start_all(self) -> None:
        for role in ("consumer", "executor"):
            for index in (0, 1):
                self.start(role, index)
        for proc in self.procs.values():
            proc.wait_ready(90)

    def restart(self, role: str, index: int) -> None:
        old = self.procs[(role, index)]
        with contextlib.suppress(Exception):
            old.stop(5)  # already dead: just closes its log
        self.restarts[role] += 1
        proc = self.start(role, index)
        try:
            proc.wait_ready(60)
        except (TimeoutError, RuntimeError) as err:
            log(f"{proc.name} not ready after restart: {err}")

    def check_alive(self) -> list[str]:
        """Roles that exited on their own (a finding: roles should ride out every fault)."""
        return [
            f"{p.name} (exit {p.proc.returncode}); last lines:\n{p.tail(8)}"
            for p in self.procs.values()
            if not p.alive()
        ]

    def stop_all(self) -> dict[str, int | None]:
        return {p.name: p.stop(20) for p in self.procs.values()}


# --------------------------------------------------------------------------- faults


class Chaos:
    def __init__(self, stack: DevStack, roles: Roles, load: Load, rng: random.Random) -> None:
        self.stack = stack
        self.roles = roles
        self.load = load
        self.rng = rng
        self.faults: list[Fault] = []
        self.role_deaths: list[str] = []

    def schedule(
        self, duration: float, warmup: float, gap: tuple[float, float] = (1.0, 3.0)
    ) -> None:
        """Every kind once (shuffled), then random kinds while time remains; main thread only
        (servers and roles are forked here: their PDEATHSIG is tied to the forking thread)."""
        kinds = list(FAULT_KINDS)
        self.rng.shuffle(kinds)
        t_end = time.monotonic() + duration
        time.sleep(warmup)
        # Every kind fires even when the duration is too short for all of them: the load
        # then simply runs longer (the CI run relies on "every kind at least once").
        while kinds or time.monotonic() < t_end - 8:
            kind = kinds.pop(0) if kinds else self.rng.choice(FAULT_KINDS)
            self.fire(kind)
            time.sleep(self.rng.uniform(*gap))
        time.sleep(max(0.0, t_end - time.monotonic()))

    def fire(self, kind: str) -> None:
        fault = Fault(kind, time.time())
        log(f"fault: {kind}")
        rng = self.rng
        if kind.startswith(("kill9_", "sigterm_")):
            role = kind.split("_", 1)[1]
            index = rng.randrange(2)
            proc = self.roles.procs[(role, index)]
            fault.detail = f"{proc.name} pid {proc.pid}"
            if kind.startswith("kill9_"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.proc.wait(10)
                time.sleep(rng.uniform(2.0, 5.0))
            else:
                code = proc.stop(30)
                fault.detail += f" exit {code}"
                time.sleep(rng.uniform(0.5, 2.0))
            self.roles.restart(role, index)
        elif kind == "redis_flushall":
            assert self.stack.redis is not None
            redis.Redis.from_url(self.stack.redis.url).flushall()
        elif kind == "redis_restart":
            assert self.stack.redis is not None
            self.stack.redis.stop()
            time.sleep(rng.uniform(2.0, 4.0))
            self.stack.redis.start()
        elif kind == "postgres_restart":
            assert self.stack.postgres is not None
            self.stack.postgres.stop()
            time.sleep(rng.uniform(3.0, 6.0))
            self.stack.postgres.start()
        elif kind == "broker_pause":
            assert self.stack.kafka is not None
            self.stack.kafka.pause()
            time.sleep(rng.uniform(3.0, 6.0))
            self.stack.kafka.resume()
        elif kind == "bad_burst":
            fault.detail = f"{self.load.bad_burst()} messages"
        else:
            raise ValueError(kind)
        fault.end = time.time()
        self.faults.append(fault)
        # Like a supervisor (systemd, Kubernetes) would: a role that exited on its own is
        # recorded (a finding for the report) and started again.
        for name in self.roles.check_alive():
            self.role_deaths.append(f"after {kind}: {name}")
            log(f"warning: {name}\nexited on its own during {kind}; restarting it")
        for (role, index), proc in list(self.roles.procs.items()):
            if not proc.alive():
                self.roles.restart(role, index)


# --------------------------------------------------------------------------- the ledger


def sql(dsn: str, statement: str, params: Sequence[Any] | None = None) -> list[Any]:
    """:func:`tests.support.clients.query` that gives up connecting after 5 s (a fault may
    have PostgreSQL down)."""
    return query(dsn, statement, params, connect_timeout=5)


def drained(dsn: str, produced: int) -> bool:
    with contextlib.suppress(psycopg.Error):
        (total, open_, unpublished), *_ = sql(
            dsn,
            "SELECT count(*), count(*) FILTER (WHERE status IN ('scheduled','running','retrying')),"
            " count(*) FILTER (WHERE status = 'dead' AND dlq_published_at IS NULL) FROM events",
        )
        return bool(total >= produced and open_ == 0 and unpublished == 0)
    return False


def read_dlq(bootstrap: str) -> list[Any]:
    """Every DLQ message, from the beginning to the high watermark of each partition."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "chaos-reader", "enable.auto.commit": False}
    )
    try:
        ends = {p: consumer.get_watermark_offsets(TopicPartition(DLQ_TOPIC, p), 10)[1]
                for p in range(PARTITIONS)}  # fmt: skip
        consumer.assign([TopicPartition(DLQ_TOPIC, p, 0) for p in range(PARTITIONS)])
        pos = dict.fromkeys(ends, 0)
        out: list[Any] = []
        deadline = time.monotonic() + 60
        while any(pos[p] < ends[p] for p in ends) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        log(f"dlq read: {error}")
                    continue
                pos[msg.partition() or 0] = (msg.offset() or 0) + 1
                out.append(msg)
        return out
    finally:
        consumer.close()


def split(
    values: Sequence[tuple[float, float]], faults: Sequence[Fault]
) -> tuple[list[float], list[float]]:
    """Lateness (ms) of attempts due inside / outside a fault window (+ recovery tail)."""
    inside: list[float] = []
    outside: list[float] = []
    for due, late in values:
        hit = any(f.start <= due <= f.end + RECOVERY_TAIL for f in faults)
        (inside if hit else outside).append(late)
    return inside, outside


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's lines (a line cut short by a kill -9 is skipped)."""
    out: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), path.open() as f:
        for line in f:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


@dataclass
class Runs:
    """What the handler journal says about handler invocations."""

    invocations: int = 0
    stopped: int = 0  # started, never ended (stopped by a lost lease, or killed)
    overlapping: list[str] = field(default_factory=list)
    attempt_started_twice: list[str] = field(default_factory=list)
    ended_ok: set[str] = field(default_factory=set)
    rerun_after_ok: list[str] = field(default_factory=list)


def runs(journal: Sequence[Mapping[str, Any]]) -> Runs:
    """Handler invocations per event, from the journal (see the module docstring)."""
    by_event: dict[str, list[dict[str, Any]]] = {}
    out = Runs()
    for line in journal:
        event_runs = by_event.setdefault(line["event"], [])
        key = (line["attempt"], line["pid"])
        if line["what"] == "start":
            out.invocations += 1
            if any(r["attempt"] == line["attempt"] for r in event_runs):
                out.attempt_started_twice.append(f"{line['event']} attempt {line['attempt']}")
            event_runs.append({"key": key, "attempt": line["attempt"], "start": line["t"],
                               "end": None, "ok": None})  # fmt: skip
        elif line["what"] == "end":
            for run in reversed(event_runs):
                if run["key"] == key and run["end"] is None:
                    run["end"], run["ok"] = line["t"], line["ok"]
                    break
    for event_id, event_runs in by_event.items():
        for i, first in enumerate(event_runs):
            if first["end"] is None:
                out.stopped += 1
                continue
            if first["ok"]:
                out.ended_ok.add(event_id)
            for later in event_runs[i + 1 :]:
                if first["end"] > later["start"]:
                    out.overlapping.append(
                        f"{event_id}: attempt {first['attempt']} ended after attempt "
                        f"{later['attempt']} had started"
                    )
                elif first["ok"]:
                    out.rerun_after_ok.append(f"{event_id} attempt {later['attempt']}")
    return out


def check(
    dsn: str,
    bootstrap: str,
    ledger: Ledger,
    faults: Sequence[Fault],
    journal: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    rows = sql(
        dsn,
        "SELECT e.id::text, e.status, e.attempts, e.dead_reason,"
        " count(a.id) FILTER (WHERE a.outcome = 'succeeded'),"
        " count(a.id) FILTER (WHERE a.outcome IS NULL OR a.error LIKE 'worker lost%%'"
        "   OR a.error LIKE 'lease lost%%'),"
        " count(a.id),"
        # A failed attempt is either the handler's simulated failure or one the reconciler
        # closed after its worker died ("worker lost"), or one its executor stopped when it
        # could not renew the lease ("lease lost", e.g. PostgreSQL down for stale_after / 2);
        # both count as an attempt by design.
        " count(a.id) FILTER (WHERE a.outcome IN ('retried', 'dead')"
        "   AND coalesce(a.error, '') NOT ILIKE '%%simulated failure%%'"
        "   AND coalesce(a.error, '') NOT LIKE 'worker lost%%'"
        "   AND coalesce(a.error, '') NOT LIKE 'lease lost%%')"
        " FROM events e LEFT JOIN event_attempts a ON a.event_id = e.id GROUP BY e.id, e.status, e.attempts, e.dead_reason",
    )
    events = {r[0]: r[1:] for r in rows}
    produced = ledger.produced
    lost = sorted(i for i in produced if i not in events)
    unknown = sorted(i for i in events if i not in produced and i not in ledger.produce_failed)
    stuck = sorted(i for i, r in events.items() if r[0] not in ("succeeded", "dead"))
    duplicates = sorted(i for i, r in events.items() if r[3] > 1)
    bad_success = sorted(i for i, r in events.items() if r[0] == "succeeded" and r[3] != 1)
    dead = {i: r for i, r in events.items() if r[0] == "dead"}
    bad_dead = sorted(
        i for i, r in dead.items()
        if r[2] != "retries_exhausted" or r[1] != MAX_ATTEMPTS or r[3] != 0 or r[5] != r[1] or r[6]
    )  # fmt: skip
    lost_attempts = sum(r[4] for r in events.values())
    dead_after_lost = sum(1 for r in dead.values() if r[4])

    dlq = read_dlq(bootstrap)
    reasons: Counter[str] = Counter()
    dead_in_dlq: Counter[str] = Counter()
    bad_seen: dict[tuple[int, int], list[str]] = {}
    for msg in dlq:
        headers = {k: (v or b"").decode(errors="replace") for k, v in msg.headers() or []}
        reason = headers.get("dlq-reason", "?")
        reasons[reason] += 1
        if headers.get("source-topic") == TOPIC and "source-offset" in headers:
            src = (int(headers["source-partition"]), int(headers["source-offset"]))
            if src in ledger.bad:
                bad_seen.setdefault(src, []).append(reason)
                continue
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            dead_in_dlq[str(json.loads(msg.value())["id"])] += 1
    dead_missing = sorted(set(dead) - set(dead_in_dlq))
    bad_missing = sorted(f"{n} ({p}/{o})" for (p, o), (n, _) in ledger.bad.items()
                         if (p, o) not in bad_seen)  # fmt: skip
    bad_wrong = sorted(
        f"{ledger.bad[src][0]}: expected {ledger.bad[src][1]}, got {got}"
        for src, got in bad_seen.items()
        if any(r != ledger.bad[src][1] for r in got)
    )

    lateness = sql(
        dsn,
        "SELECT extract(epoch FROM scheduled_for)::float8, lateness_ms FROM event_attempts",
    )
    inside, outside = split(lateness, faults)
    handled = runs(journal)
    succeeded_unrun = sorted(
        i for i, r in events.items() if r[0] == "succeeded" and i not in handled.ended_ok
    )
    problems = {
        "lost": lost,
        "stuck": stuck,
        "duplicates": duplicates,
        "succeeded_without_one_success": bad_success,
        "dead_unexpected": bad_dead,
        "dead_missing_from_dlq": dead_missing,
        "malformed_missing_from_dlq": bad_missing,
        "malformed_wrong_reason": bad_wrong,
        "unknown_events": unknown,
        # Handler invocations (the journal), not rows: two runs of an event overlapped
        # (the second started while the first was alive), an attempt started twice, or an
        # event recorded as succeeded whose handler never returned ok.
        "handler_runs_overlapping": handled.overlapping,
        "handler_attempt_started_twice": handled.attempt_started_twice,
        "succeeded_without_a_handler_run": succeeded_unrun,
    }
    return {
        "produced": len(produced),
        "produce_failed": len(ledger.produce_failed),
        "in_postgres": len(events),
        "succeeded": sum(1 for r in events.values() if r[0] == "succeeded"),
        "dead": len(dead),
        "attempts_lost_to_crashes": lost_attempts,
        "handler_invocations": handled.invocations,
        "handler_runs_stopped_or_killed": handled.stopped,
        "handler_reruns_after_a_run_that_ended_ok": len(handled.rerun_after_ok),
        "dead_with_a_lost_attempt": dead_after_lost,
        "malformed_sent": len(ledger.bad) + len(ledger.bad_failed),
        "malformed_in_dlq": len(bad_seen),
        "dlq_by_reason": dict(sorted(reasons.items())),
        "dlq_redelivered": sum(n - 1 for n in dead_in_dlq.values() if n > 1)
        + sum(len(v) - 1 for v in bad_seen.values()),
        "faults_by_kind": dict(sorted(Counter(f.kind for f in faults).items())),
        "lateness_ms_inside_faults": percentiles(inside),
        "lateness_ms_outside_faults": percentiles(outside),
        "problems": {k: v[:50] for k, v in problems.items()},
        "problem_counts": {k: len(v) for k, v in problems.items()},
        "ok": not any(problems.values()),
    }


def history(dsn: str, event_id: str) -> dict[str, Any]:
    """An event's row and its attempts, for the report of a failure."""
    row = sql(dsn, "SELECT status, attempts, dead_reason, last_error, execute_at::text,"
                   " updated_at::text FROM events WHERE id = %s", [event_id])  # fmt: skip
    attempts = sql(dsn, "SELECT attempt, scheduled_for::text, started_at::text,"
                        " finished_at::text, outcome, error, worker_id FROM event_attempts"
                        " WHERE event_id = %s ORDER BY attempt", [event_id])  # fmt: skip
    return {"event": row[0] if row else None, "attempts": attempts}


def table(r: Mapping[str, Any], seed: int, rate: float, duration: float) -> str:
    def p(d: Mapping[str, Any], k: str) -> str:
        return "-" if not d.get("count") else f"{d[k]:,.0f}"

    pc = r["problem_counts"]
    li, lo = r["lateness_ms_inside_faults"], r["lateness_ms_outside_faults"]
    rows = [
        ("seed / rate / duration", f"{seed} / {rate:g} events/s / {duration:g} s"),
        ("gap between faults", "{:g}-{:g} s".format(*r.get("fault_gap", (1.0, 3.0)))),
        ("events produced (acked)", r["produced"]),
        ("succeeded", r["succeeded"]),
        ("dead (retries exhausted)", r["dead"]),
        ("duplicates (>1 successful attempt)", pc["duplicates"]),
        ("lost", pc["lost"]),
        ("stuck", pc["stuck"]),
        ("other problems", sum(pc.values()) - pc["duplicates"] - pc["lost"] - pc["stuck"]),
        ("attempts lost to a crash or a lost lease", r["attempts_lost_to_crashes"]),
        ("handler invocations (journal)", r["handler_invocations"]),
        ("handler runs that overlapped (must be 0)", pc["handler_runs_overlapping"]),
        ("handler runs stopped (lease lost) or killed", r["handler_runs_stopped_or_killed"]),
        (
            "reruns after a run that ended ok (a crash in between)",
            r["handler_reruns_after_a_run_that_ended_ok"],
        ),
        ("dead events with a lost attempt", r["dead_with_a_lost_attempt"]),
        ("DLQ by reason", ", ".join(f"{k} {v}" for k, v in r["dlq_by_reason"].items())),
        ("malformed sent / in DLQ", f"{r['malformed_sent']} / {r['malformed_in_dlq']}"),
        ("dead letters published twice (at-least-once, after a crash)", r["dlq_redelivered"]),
        ("faults by kind", ", ".join(f"{k} {v}" for k, v in r["faults_by_kind"].items())),
        ("lateness in faults p50 / p99 ms", f"{p(li, 'p50')} / {p(li, 'p99')} (n={li['count']})"),
        ("lateness outside p50 / p99 ms", f"{p(lo, 'p50')} / {p(lo, 'p99')} (n={lo['count']})"),
        ("roles that exited on their own", len(r.get("unexpected_role_exits", []))),
        ("drain after load stopped", f"{r.get('drain_s', '-')} s"),
        ("verdict", "PASS" if r["ok"] else "FAIL"),
    ]
    lines = ["| measure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def role_settings(path: Path, args: argparse.Namespace) -> Path:
    return write_settings(
        path,
        {
            "kafka": {"partitions": PARTITIONS},
            "kafka.consumer_client": dict(FAST_GROUP_CONFIG),
            "handlers": {"default": "bench.chaos:journaled"},
            "executor": {"concurrency": 20, "max_retries": MAX_ATTEMPTS},
            "executor.retry_backoff": {"base": "500ms", "factor": 2.0, "max": "3s", "jitter": 0.2},
            "executor.simulate": {
                "duration": f"{args.handler_ms}ms",
                "error_rate": args.error_rate,
            },
            # Short enough that crashed work is picked up again within the drain timeout.
            "reconciler": {"interval": "2s", "grace": "3s", "stale_after": "10s"},
            "consumer": {"backoff_max": "2s"},
            "logging": {"format": "json", "level": "info"},
            "shutdown": {"grace": "5s"},
        },
    )


def _gap(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    try:
        gap = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX seconds, got {text!r}") from None
    if not 0 <= gap[0] <= gap[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, got {text!r}")
    return gap


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="load seconds (120)")
    parser.add_argument("--seed", type=int, default=None, help="fault/load seed (random)")
    parser.add_argument("--rate", type=float, default=150.0, help="events/s (150)")
    parser.add_argument("--delay-min", type=float, default=1.0, help="due time, s out (1)")
    parser.add_argument("--delay-max", type=float, default=15.0, help="due time, s out (15)")
    parser.add_argument("--error-rate", type=float, default=0.2, help="simulate failures (0.2)")
    parser.add_argument(
        "--handler-ms", type=int, default=100, help="simulate duration: kills hit running jobs"
    )
    parser.add_argument(
        "--fault-gap",
        type=_gap,
        default=(1.0, 3.0),
        metavar="MIN-MAX",
        help="seconds between two faults, uniform (1-3: faults back to back; a soak that "
        "measures lateness between faults wants e.g. 20-40)",
    )
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="s (120)")
    parser.add_argument("--json", type=Path, default=None, help="result file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    log(
        f"chaos seed {seed} (replay: --seed {seed}); {args.rate:g} events/s for {args.duration:g} s"
    )

    workdir = Path(tempfile.mkdtemp(prefix="eventsched-chaos-"))
    logdir = workdir / "logs"
    logdir.mkdir()
    stack = DevStack(workdir / "stack", fast=True)
    info = (
        stack.start()
    )  # main thread: see the PDEATHSIG note in eventsched/core/operations/devstack.py
    assert info.postgres_dsn and info.kafka_bootstrap
    dsn, bootstrap = info.postgres_dsn, info.kafka_bootstrap
    journal = workdir / "journal.jsonl"
    role_env = clean_env({**info.as_env(), JOURNAL_ENV: str(journal)})
    roles = Roles(role_settings(workdir / "roles.toml", args), role_env, logdir)
    load: Load | None = None
    try:
        migrations.up(dsn, migrations.default_sql_dir())
        ensure_topics(bootstrap, {TOPIC: PARTITIONS, DLQ_TOPIC: PARTITIONS})
        roles.start_all()
        log("roles ready; load starts")
        load = Load(bootstrap, args.rate, (args.delay_min, args.delay_max), seed)
        load.thread.start()
        chaos = Chaos(stack, roles, load, random.Random(seed))
        chaos.schedule(args.duration, warmup=min(8.0, args.duration / 10), gap=args.fault_gap)
        load.finish()
        log(f"load stopped: {len(load.ledger.produced)} acked; draining")
        drain_start = time.monotonic()
        deadline = drain_start + args.drain_timeout
        while time.monotonic() < deadline and not drained(dsn, len(load.ledger.produced)):
            time.sleep(1.0)
        drain_s = round(time.monotonic() - drain_start, 1)
        log(f"drained in {drain_s} s" if drain_s < args.drain_timeout else "drain timed out")
        time.sleep(2.0)  # the last DLQ deliveries of the consumers
        result = check(dsn, bootstrap, load.ledger, chaos.faults, read_journal(journal))
        result["producer_queue_full"] = load.buffer_full
        result["histories"] = {
            i: history(dsn, i)
            for kind in (
                "stuck",
                "duplicates",
                "dead_unexpected",
                "succeeded_without_one_success",
                "succeeded_without_a_handler_run",
            )
            for i in result["problems"][kind][:5]
        }
    finally:
        if load is not None and not load.stop.is_set():
            load.stop.set()
        exits = roles.stop_all()
        stack.stop()
    result.update(
        seed=seed, rate=args.rate, duration=args.duration, fault_gap=args.fault_gap,
        drain_s=drain_s, role_exits=exits,
        role_restarts=dict(roles.restarts), workdir=str(workdir),
        faults=[vars(f) for f in chaos.faults], unexpected_role_exits=chaos.role_deaths,
    )  # fmt: skip
    text = table(result, seed, args.rate, args.duration)
    print(text)
    if not result["ok"]:
        print(json.dumps({"problems": result["problems"], "histories": result["histories"]},
                         indent=1, default=str))  # fmt: skip
    out = args.json or DEFAULT_OUT / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "table": text}, indent=1, default=str))
    log(f"result: {out}; logs: {logdir}")
    if result["ok"] and not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
