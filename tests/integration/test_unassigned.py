"""Readiness of a consumer that has no partitions (real PostgreSQL, Redis and broker).

Specification: a consumer with no partitions assigned for ``consumer.unassigned_grace``,
while records of its topic wait that no member of its group commits, is stalled:
``/readyz`` answers 503 with ``"stalled": ["consumer: no partitions assigned for Ns"]`` and
``eventsched_role_stalled{role_name="consumer",reason="unassigned"}`` is 1, until partitions
arrive. A spare consumer (other members hold every partition and keep up) stays ready.
A consumer stalled in a group the broker wedged (Tansu) recovers with
``consumer.rejoin_after``: it leaves, has the broker forget the group (offsets kept) and
joins again.

The other members of the group are plain confluent-kafka consumers driven from a thread
(:class:`_Member`): one that holds its partitions without reading them stands for a member
that does not progress, one that reads and commits for a healthy one. Their ``client.id``
starts with ``aaa`` so that the range assignor, which orders members by member id (the
client id plus a suffix), gives them the partition of a one-partition topic before the
eventsched consumer (``eventsched-consumer-...``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from confluent_kafka import Consumer, TopicPartition

from eventsched.core.kafka import ensure_topics
from tests.support.clients import FAST_GROUP_CONFIG, query
from tests.support.ingest import (
    commit_offsets,
    count_rows,
    event_message,
    make_events,
    produce,
    rows_reach,
    running_consumer,
)
from tests.support.metrics import metric_value
from tests.support.servers import Names
from tests.support.waiting import wait_until

STALL_TEXT = re.compile(r"consumer: no partitions assigned for \d+s")
STALL_LABELS = {"role_name": "consumer", "reason": "unassigned"}
# The group timing these tests were measured with (a 6 s session, for the members and the
# consumer): Tansu's wedge below depends on it.
GROUP_CONFIG = {**FAST_GROUP_CONFIG, "session.timeout.ms": 6000}
# A short grace and a quick check, so that a stall shows within seconds. The grace stays
# above the time a rebalance takes (Tansu completes a join in about half the session
# timeout, 3 s here), during which nobody holds the partitions.
QUICK_WATCH = {"unassigned_grace": "6s", "lag_interval": "200ms"}


def watched(make_settings: Any, **kafka: Any) -> Any:
    """Settings of the consumer under test: the quick watch, this module's group timing."""
    return make_settings(consumer=QUICK_WATCH, kafka={"consumer_client": GROUP_CONFIG, **kafka})


@pytest.fixture
def one_partition(kafka_bootstrap: str, names: Names) -> Iterator[Names]:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    yield names


class _Member:
    """Another member of the group, polled on its own thread until :meth:`leave`.

    ``commits``: read every record and commit it at once (a healthy member); otherwise
    hold the assigned partitions paused, reading and committing nothing."""

    def __init__(self, bootstrap: str, group: str, topic: str, *, commits: bool) -> None:
        self._consumer = Consumer(
            {
                **GROUP_CONFIG,
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "client.id": "aaa-test-member",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self._commits = commits
        self._topic = topic
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._owned: set[int] = set()
        self.committed = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def owned(self) -> set[int]:
        with self._lock:
            return set(self._owned)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.assign(partitions)
        if not self._commits:
            consumer.pause(partitions)
        with self._lock:
            self._owned |= {tp.partition for tp in partitions}

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            self._owned -= {tp.partition for tp in partitions}

    def _run(self) -> None:
        consumer = self._consumer
        try:
            consumer.subscribe(
                [self._topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
            while not self._stop.is_set():
                for message in consumer.consume(100, 0.1):
                    if message.error() is None and self._commits:
                        consumer.commit(message=message, asynchronous=False)
                        self.committed += 1
        except BaseException as err:  # reported by leave()
            self.error = err
        finally:
            consumer.close()  # leaves the group

    def leave(self) -> None:
        self.stop()
        self._thread.join(30)
        assert self.error is None, self.error

    def stop(self) -> None:
        """Ask the thread to leave the group (:meth:`leave` waits for it)."""
        self._stop.set()


async def _member_owns(member: _Member, partitions: set[int]) -> None:
    async def check() -> bool:
        return member.owned() == partitions

    await wait_until(check, limit=30)


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    return response.status_code, response.json()


async def _readiness(port: int) -> tuple[int, dict[str, Any]]:
    return await trio.to_thread.run_sync(_readyz, port)


async def _wait_readyz(port: int, status: int, *, limit: float = 30.0) -> dict[str, Any]:
    seen: list[tuple[int, dict[str, Any]]] = []

    async def check() -> bool:
        seen.append(await _readiness(port))
        return seen[-1][0] == status

    try:
        await wait_until(check, limit=limit, interval=0.2)
    except trio.TooSlowError:
        raise AssertionError(f"/readyz never answered {status}; last: {seen[-1:]}") from None
    return seen[-1][1]


async def _wait_stalled(port: int, *, limit: float = 30.0) -> dict[str, Any]:
    """Wait for a 503 that names a stall (not one for a dependency check)."""
    seen: list[tuple[int, dict[str, Any]]] = []

    async def check() -> bool:
        seen.append(await _readiness(port))
        return seen[-1][0] == 503 and bool(seen[-1][1].get("stalled"))

    try:
        await wait_until(check, limit=limit, interval=0.2)
    except trio.TooSlowError:
        raise AssertionError(f"/readyz never named a stall; last: {seen[-1:]}") from None
    return seen[-1][1]


def _metric_line(port: int) -> str:
    """The ``unassigned`` series of the stall gauge (the registry is the process's: earlier
    tests leave series of other reasons in it)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return next(
        (
            line
            for line in text.splitlines()
            if line.startswith('eventsched_role_stalled{reason="unassigned",')
        ),
        "",
    )


# -- (a) no partitions while work waits --------------------------------------------------


async def test_a_consumer_without_partitions_while_records_wait_is_not_ready_until_it_gets_one(
    make_settings: Any,
    one_partition: Names,
    database: str,
    kafka_bootstrap: str,
    clean_queue: str,
) -> None:
    names = one_partition
    events = make_events(20)
    await trio.to_thread.run_sync(
        produce, kafka_bootstrap, names.topic, [event_message(e) for e in events]
    )
    # A member that holds the only partition and reads nothing: the records wait.
    holder = _Member(kafka_bootstrap, names.group, names.topic, commits=False)
    try:
        await _member_owns(holder, {0})
        settings = watched(make_settings)
        async with running_consumer(settings) as port:
            body = await _wait_stalled(port)
            # The rebalance is over (the holder has the partition again) and the consumer
            # is still stalled.
            await _member_owns(holder, {0})
            status, body = await _readiness(port)
            assert status == 503
            assert len(body["stalled"]) == 1 and STALL_TEXT.fullmatch(body["stalled"][0]), body
            assert body["dependencies"] == {"postgres": "ok", "redis": "ok", "kafka": "ok"}
            assert metric_value("eventsched_role_stalled", **STALL_LABELS) == 1
            assert 'reason="unassigned",role_name="consumer"} 1.0' in await trio.to_thread.run_sync(
                _metric_line, port
            )
            assert await trio.to_thread.run_sync(count_rows, database) == 0

            # The holder leaves: the partition comes to the consumer, which is ready again.
            await trio.to_thread.run_sync(holder.leave)
            body = await _wait_readyz(port, 200)
            assert "stalled" not in body
            assert metric_value("eventsched_role_stalled", **STALL_LABELS) == 0
            await rows_reach(database, len(events))
    finally:
        holder.leave()


# -- (b) a spare consumer ----------------------------------------------------------------


async def test_a_spare_consumer_beside_a_member_that_keeps_up_stays_ready(
    make_settings: Any,
    one_partition: Names,
    kafka_bootstrap: str,
    clean_queue: str,
) -> None:
    names = one_partition
    worker = _Member(kafka_bootstrap, names.group, names.topic, commits=True)
    try:
        await _member_owns(worker, {0})
        settings = watched(make_settings)
        async with running_consumer(settings) as port:
            await _wait_readyz(port, 200)
            # New records keep arriving (so there is lag now and then) and the member keeps
            # committing them: well past the grace, the spare stays ready.
            deadline = trio.current_time() + 10.0
            sent = 0
            while trio.current_time() < deadline:
                batch = make_events(5, start=sent)
                await trio.to_thread.run_sync(
                    produce, kafka_bootstrap, names.topic, [event_message(e) for e in batch]
                )
                sent += len(batch)
                status, body = await _readiness(port)
                assert status == 200, body
                await trio.sleep(0.3)
            assert worker.owned() == {0}, "the spare took the partition: no test"
            assert metric_value("eventsched_role_stalled", **STALL_LABELS) == 0

            async def all_committed() -> bool:
                return worker.committed >= sent

            await wait_until(all_committed)  # the member kept up
            # Ready for the grace and more once everything is committed: the next test
            # checks that state for 8 s.
    finally:
        worker.leave()


async def test_a_spare_consumer_stays_ready_with_nothing_to_read(
    make_settings: Any,
    one_partition: Names,
    kafka_bootstrap: str,
    clean_queue: str,
) -> None:
    """An idle spare: no records at all, then records that the member read and committed,
    and readiness for longer than the grace with everything committed."""
    names = one_partition
    worker = _Member(kafka_bootstrap, names.group, names.topic, commits=True)
    try:
        await _member_owns(worker, {0})
        async with running_consumer(watched(make_settings)) as port:
            await trio.sleep(7.0)
            status, body = await _readiness(port)
            assert status == 200, body
            events = make_events(10)
            await trio.to_thread.run_sync(
                produce, kafka_bootstrap, names.topic, [event_message(e) for e in events]
            )

            async def all_committed() -> bool:
                return worker.committed >= len(events)

            await wait_until(all_committed)
            for _ in range(40):
                status, body = await _readiness(port)
                assert status == 200, body
                await trio.sleep(0.2)
            assert worker.owned() == {0}
    finally:
        worker.leave()


# -- (c) Tansu's wedged group ------------------------------------------------------------

#: Seconds between the consumer's start and the departure of the member that holds every
#: partition. Tansu (0.6) wedges the group when its leader leaves while another member is
#: joining: the departed member stays the leader of the re-forming group, and every member
#: that joins afterwards waits for its assignment, for good (a new member id included).
#: Measured: 6 of 6 wedged with 0.5, 1 and 2 s.
LEADER_LEAVES_AFTER = 1.0


async def _wedge(holder: _Member) -> None:
    """Call right after the consumer started: the holder (the group's leader) leaves while
    the consumer joins."""
    await trio.sleep(LEADER_LEAVES_AFTER)
    await trio.to_thread.run_sync(holder.leave)


async def test_readyz_catches_a_group_that_assigns_nothing_after_its_leader_left(
    make_settings: Any,
    kafka_bootstrap: str,
    names: Names,
    database: str,
    clean_queue: str,
) -> None:
    """Tansu: the group's leader leaves while the consumer joins; the consumer gets no
    partitions at all, and without ``consumer.rejoin_after`` (0, the default) it stays so.
    The records wait; /readyz must say so."""
    ensure_topics(kafka_bootstrap, {names.topic: 3, names.dlq_topic: 1})
    await trio.to_thread.run_sync(
        produce, kafka_bootstrap, names.topic, [event_message(e) for e in make_events(30)]
    )
    holder = _Member(kafka_bootstrap, names.group, names.topic, commits=False)
    try:
        await _member_owns(holder, {0, 1, 2})
        settings = watched(make_settings)
        assert settings.consumer.rejoin_after == 0
        async with running_consumer(settings) as port:
            await _wedge(holder)
            seen: list[tuple[int, dict[str, Any]]] = []

            async def verdict() -> bool:
                seen.append(await _readiness(port))
                rows = await trio.to_thread.run_sync(count_rows, database)
                return bool(seen[-1][1].get("stalled")) or rows > 0

            await wait_until(verdict, limit=40, interval=0.3)
            status, body = seen[-1]
            if not body.get("stalled"):
                pytest.skip("Tansu assigned the partitions: no wedge to catch")
            assert status == 503
            assert len(body["stalled"]) == 1 and STALL_TEXT.fullmatch(body["stalled"][0]), body
            assert metric_value("eventsched_role_stalled", **STALL_LABELS) == 1
            # It stays stalled: the wedge does not end by itself.
            await trio.sleep(8.0)
            status, body = await _readiness(port)
            assert status == 503 and STALL_TEXT.fullmatch(body["stalled"][0]), body
            assert await trio.to_thread.run_sync(count_rows, database) == 0
    finally:
        holder.leave()


# -- "work is waiting" against the real broker ---------------------------------------------


def test_waiting_work_sees_records_inside_the_last_batch(
    kafka_bootstrap: str, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tansu answers ListOffsets(latest) with the start of the last record batch, so the
    end minus the committed offset reads 0 for records inside that batch; they still wait."""
    from confluent_kafka.admin import AdminClient

    from eventsched.core.kafka import admin as admin_module
    from eventsched.core.kafka.admin import EmptyPartitions, waiting_work

    fetched: list[dict[int, int]] = []
    fetch = admin_module._records_at

    def counted(*args: Any) -> tuple[set[int], set[int]]:
        fetched.append(dict(args[3]))
        return fetch(*args)

    monkeypatch.setattr(admin_module, "_records_at", counted)

    ensure_topics(kafka_bootstrap, {names.topic: 2})
    # One produce call, one partition: ten records in one batch (linger 5 ms).
    produce(kafka_bootstrap, names.topic, [event_message(e, 0) for e in make_events(10)])
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    probe = {"bootstrap.servers": kafka_bootstrap}

    def commit(offset: int) -> None:
        consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": names.group})
        try:
            consumer.commit(offsets=[TopicPartition(names.topic, 0, offset)], asynchronous=False)
        finally:
            consumer.close()

    empty = EmptyPartitions()

    def waiting() -> dict[int, tuple[int, bool]]:
        return waiting_work(admin, probe, names.group, names.topic, {}, empty, 5.0)

    # Nothing committed: everything waits on partition 0, nothing on the empty partition 1.
    assert waiting() == {0: (-1001, True), 1: (-1001, False)}
    commit(5)
    assert waiting() == {0: (5, True), 1: (-1001, False)}
    commit(9)
    assert waiting() == {0: (9, True), 1: (-1001, False)}
    commit(10)
    fetched.clear()
    assert waiting() == {0: (10, False), 1: (-1001, False)}
    assert fetched == [{0: 10}]  # partition 1 was found empty before and did not change
    assert waiting() == {0: (10, False), 1: (-1001, False)}
    assert fetched == [{0: 10}]  # nothing changed: no fetch
    # New records after that are seen (a new batch moves the ListOffsets answer).
    produce(kafka_bootstrap, names.topic, [event_message(e, 0) for e in make_events(3)])
    assert waiting() == {0: (10, True), 1: (-1001, False)}
    produce(kafka_bootstrap, names.topic, [event_message(e, 1) for e in make_events(1)])
    assert waiting() == {0: (10, True), 1: (-1001, True)}


# -- (d) the dev stack recovers from the wedge by itself -----------------------------------


async def test_a_consumer_in_a_wedged_group_rejoins_and_keeps_the_committed_offsets(
    make_settings: Any,
    kafka_bootstrap: str,
    names: Names,
    database: str,
    clean_queue: str,
) -> None:
    """The wedge of (c): the member that holds every partition (and leads the group) leaves
    while the consumer is joining, and Tansu keeps it as the leader of the re-forming group,
    so the consumer gets no partitions (a new member id alone does not help). With ``consumer.rejoin_after`` the consumer leaves, has the broker
    forget the group (its committed offsets committed back) and joins again: it gets the
    partitions and resumes at the committed offsets, reading nothing twice."""
    ensure_topics(kafka_bootstrap, {names.topic: 3, names.dlq_topic: 1})
    events = make_events(30)
    await trio.to_thread.run_sync(
        produce,
        kafka_bootstrap,
        names.topic,
        [event_message(e, i % 3) for i, e in enumerate(events)],
    )
    # Records 0-3 of each partition were processed before: committed, never to be read again.
    await trio.to_thread.run_sync(
        commit_offsets, kafka_bootstrap, names.group, names.topic, {0: 4, 1: 4, 2: 4}
    )
    holder = _Member(kafka_bootstrap, names.group, names.topic, commits=False)
    try:
        await _member_owns(holder, {0, 1, 2})
        settings = make_settings(
            consumer={**QUICK_WATCH, "rejoin_after": "2s"},
            kafka={"consumer_client": GROUP_CONFIG},
        )
        async with running_consumer(settings) as port:
            await _wedge(holder)
            seen: list[tuple[int, dict[str, Any]]] = []

            async def stalled_or_rows() -> bool:
                seen.append(await _readiness(port))
                return bool(seen[-1][1].get("stalled")) or (
                    await trio.to_thread.run_sync(count_rows, database) > 0
                )

            await wait_until(stalled_or_rows, limit=30, interval=0.2)
            if not seen[-1][1].get("stalled"):
                pytest.skip("Tansu assigned the partitions: no wedge to recover from")
            assert await trio.to_thread.run_sync(count_rows, database) == 0
            # The rejoin: 2 s after the stall, then a join (Tansu takes ~3 s).
            await rows_reach(database, 18, limit=30)
            await _wait_readyz(port, 200)
            await trio.sleep(1.0)
            # Exactly the records behind the committed offsets, none of those before them.
            assert await trio.to_thread.run_sync(count_rows, database) == 18
            rows = await trio.to_thread.run_sync(
                query, database, "SELECT payload->>'n' FROM events ORDER BY 1"
            )
            assert sorted(int(n) for (n,) in rows) == list(range(12, 30))
    finally:
        holder.leave()
