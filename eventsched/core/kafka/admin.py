"""Kafka administration: topics, broker probe, partition counts and end offsets.

Owns :func:`ensure_topics` (``eventsched topics ensure`` and the dev stack),
:func:`check_broker` (the readiness probe) and :class:`Admin`, the blocking offset queries
of the consumer role (lag, and whether records wait while it has no partitions). Every
function here is blocking and runs on a worker thread, except :func:`check_broker`, which
runs in trio and hops to a thread itself.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import structlog
import trio
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka import admin as kafka_admin
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewPartitions, NewTopic

from eventsched.core.kafka.bridge import _code, _describe
from eventsched.core.kafka.clientconfig import ClientKind, client_config
from eventsched.core.kafka.records import TopicPartitionKey
from eventsched.core.runtime.errors import ConfigError, DependencyError

# OffsetSpec is public API, but confluent-kafka's stubs neither export nor type it.
_LATEST: Final = kafka_admin.OffsetSpec.latest()  # type: ignore[attr-defined,no-untyped-call]
_EARLIEST: Final = kafka_admin.OffsetSpec.earliest()  # type: ignore[attr-defined,no-untyped-call]

# One logger name for the whole adapter: its lines are found under one name.
log = structlog.get_logger("eventsched.core.kafka")


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    timeout: float = 10.0,
    config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Make each topic exist with at least the wanted number of partitions.

    Idempotent: missing topics are created, topics with fewer partitions are grown, and
    topics with more are reported and left alone (partitions are never removed). Returns
    one human line per topic saying what was found or done. ``config`` holds extra client
    settings (security...). Blocking: call it from a thread when inside trio.

    Raises:
        ConfigError: a partition count or the replication factor is below 1.
        DependencyError: the broker is unreachable or refused an operation; the message
            lists every topic that failed.
    """
    for name, partitions in topics.items():
        if partitions < 1:
            raise ConfigError(f"topics.{name}", f"partition count must be >= 1, got {partitions}")
    if replication_factor < 1:
        raise ConfigError("replication_factor", f"must be >= 1, got {replication_factor}")
    # The AdminClient must stay referenced until every future it returned has resolved:
    # if it is garbage-collected first, librdkafka destroys the handle and the futures
    # fail with _DESTROY. It lives in this frame until we return.
    admin = AdminClient(client_config(ClientKind.ADMIN, bootstrap, client=config))
    existing = _partition_counts(admin, timeout)
    missing = {name: n for name, n in topics.items() if name not in existing}
    created, problems = _create_topics(admin, missing, replication_factor, timeout)
    if set(missing) - set(created):
        # Someone else created some of them meanwhile (TOPIC_ALREADY_EXISTS): look again.
        existing = _partition_counts(admin, timeout)
    lines: list[str] = []
    grow: dict[str, int] = {}
    for name, wanted in topics.items():
        have = existing.get(name)
        if name in created:
            lines.append(f"created {name} with {wanted} partitions")
        elif have is None:
            continue  # creation failed; already in problems
        elif have == wanted:
            lines.append(f"{name} exists with {have} partitions")
        elif have > wanted:
            lines.append(
                f"{name} has {have} partitions, more than the {wanted} wanted; "
                "left as is (partitions are never removed)"
            )
        else:
            grow[name] = wanted
    grown, grow_problems = _add_partitions(admin, grow, existing, timeout)
    lines.extend(f"grew {name} from {existing[name]} to {grow[name]} partitions" for name in grown)
    problems.extend(grow_problems)
    for line in lines:
        log.info("kafka_topic_ensured", detail=line)
    if problems:
        raise DependencyError("kafka", "; ".join(problems))
    return lines


async def check_broker(
    bootstrap: str,
    config: Mapping[str, Any] | None = None,
    *,
    topics: Sequence[str] = (),
    request_timeout: float = 2.0,
    limiter: trio.CapacityLimiter | None = None,
) -> None:
    """Readiness probe: the broker must answer a metadata request within ``request_timeout`` s
    and list every one of ``topics`` (no client creates them: `eventsched topics ensure`).

    Runs in a thread (a fresh AdminClient each time, created and destroyed there); if the
    caller is cancelled the thread is abandoned and ends by itself within ``request_timeout``.
    Pass a ``limiter`` to keep probes off trio's default thread limiter.

    Raises:
        DependencyError: no answer, no broker in the answer, or a topic missing.
    """
    probe = functools.partial(
        _probe_broker, bootstrap, dict(config or {}), request_timeout, tuple(topics)
    )
    await trio.to_thread.run_sync(probe, abandon_on_cancel=True, limiter=limiter)


def _probe_broker(
    bootstrap: str, config: dict[str, Any], timeout: float, topics: tuple[str, ...] = ()
) -> None:
    admin = AdminClient(client_config(ClientKind.ADMIN, bootstrap, client=config))
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as err:
        raise DependencyError("kafka", f"broker {bootstrap}: {_describe(err)}") from err
    if not metadata.brokers:
        raise DependencyError("kafka", f"broker {bootstrap}: metadata lists no broker")
    listed = {name for name, topic in metadata.topics.items() if topic.error is None}
    missing = [name for name in topics if name not in listed]
    if missing:
        raise DependencyError(
            "kafka",
            f"topic {', '.join(missing)} does not exist: create it with `eventsched topics ensure`",
        )


def _partition_counts(admin: AdminClient, timeout: float) -> dict[str, int]:
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as err:
        raise DependencyError("kafka", f"cannot list topics: {_describe(err)}") from err
    return {
        name: len(topic.partitions)
        for name, topic in metadata.topics.items()
        if topic.error is None
    }


def _create_topics(
    admin: AdminClient, wanted: Mapping[str, int], replication_factor: int, timeout: float
) -> tuple[set[str], list[str]]:
    """Create topics; returns (created, problems). Existing ones count as neither."""
    if not wanted:
        return set(), []
    futures = admin.create_topics(
        [NewTopic(name, n, replication_factor) for name, n in wanted.items()],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    created: set[str] = set()
    problems: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout + 1)
        except KafkaException as err:
            if _code(err) != KafkaError.TOPIC_ALREADY_EXISTS:
                problems.append(f"cannot create topic {name}: {_describe(err)}")
        except TimeoutError:
            problems.append(f"cannot create topic {name}: no answer within {timeout} s")
        else:
            created.add(name)
    return created, problems


def _add_partitions(
    admin: AdminClient, wanted: Mapping[str, int], existing: Mapping[str, int], timeout: float
) -> tuple[list[str], list[str]]:
    """Grow partition counts; returns (grown, problems)."""
    if not wanted:
        return [], []
    futures = admin.create_partitions(
        [NewPartitions(name, n) for name, n in wanted.items()],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    grown: list[str] = []
    problems: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout + 1)
        except KafkaException as err:
            reason = _describe(err)
            if _code(err) in (
                KafkaError._UNSUPPORTED_FEATURE,
                KafkaError.UNSUPPORTED_VERSION,
                KafkaError.INVALID_REQUEST,
            ):
                reason = "broker does not support adding partitions (CreatePartitions)"
            problems.append(
                f"cannot grow {name} from {existing[name]} to {wanted[name]} partitions: {reason}"
            )
        except TimeoutError:
            problems.append(f"cannot grow {name}: no answer within {timeout} s")
        else:
            grown.append(name)
    return grown, problems


class Admin:
    """One ``AdminClient`` for a role's blocking offset queries (:meth:`latest_offsets`,
    :meth:`waiting_work`). Made on the caller's side; its methods block and run on a
    worker thread, one at a time (give their thread a ``CapacityLimiter(1)``).

    ``config`` comes from :func:`client_config` (kind :attr:`ClientKind.ADMIN`); the probe
    consumer of :meth:`waiting_work` uses it too, with its own group id."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = dict(config)
        self._admin = AdminClient(self._config)

    def latest_offsets(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        """Blocking: see :func:`latest_offsets`."""
        return latest_offsets(self._admin, partitions)

    def waiting_work(
        self,
        group: str,
        topic: str,
        known_ends: dict[int, int],
        empty: EmptyPartitions,
        timeout: float,
    ) -> dict[int, tuple[int, bool]]:
        """Blocking: see :func:`waiting_work`."""
        return waiting_work(self._admin, self._config, group, topic, known_ends, empty, timeout)

    def reset_group(self, group: str, timeout: float) -> dict[TopicPartitionKey, int] | None:
        """Blocking: see :func:`reset_group`."""
        return reset_group(self._admin, self._config, group, timeout)


#: DeleteGroups answers that leave the group as it was: members are in it (Kafka refuses to
#: delete such a group), or it is not there.
_GROUP_KEPT: Final = frozenset({KafkaError.NON_EMPTY_GROUP, KafkaError.GROUP_ID_NOT_FOUND})


def reset_group(
    admin: AdminClient, config: Mapping[str, Any], group: str, timeout: float
) -> dict[TopicPartitionKey, int] | None:
    """Delete ``group``'s state on the broker and commit its offsets back: the way out of a
    group the broker has wedged, for a member that has left it.

    Tansu (the dev broker) can keep a member that left as the leader of a group that is
    re-forming: every member that joins afterwards waits for that leader's assignment, which
    never comes, and a new member id does not help; only deleting the group clears it.
    Deleting also drops the committed offsets, so they are read first and committed again
    (by a consumer that does not join). Kafka refuses to delete a group that has members
    (``NON_EMPTY_GROUP``): then nothing changes. Returns the offsets committed back, or None
    when the group was left as it was.

    Between the deletion and the commit a member that joins finds no committed offset and
    starts from ``auto.offset.reset``: records it reads again are recognised as duplicates
    downstream. Raises DependencyError when the broker does not answer.
    """
    try:
        listed = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
        found = listed[group].result(timeout)
        saved = [
            TopicPartition(tp.topic, tp.partition, tp.offset)
            for tp in found.topic_partitions or []
            if tp.offset >= 0
        ]
        try:
            admin.delete_consumer_groups([group], request_timeout=timeout)[group].result(timeout)
        except KafkaException as err:
            if _code(err) in _GROUP_KEPT:
                return None
            raise
        if saved:
            committer = Consumer({**config, "group.id": group, "enable.auto.commit": False})
            try:
                committer.commit(offsets=saved, asynchronous=False)
            finally:
                committer.close()
    except (KafkaException, concurrent.futures.TimeoutError) as err:
        raise DependencyError("kafka", f"cannot reset group {group}: {_describe(err)}") from err
    return {(tp.topic, tp.partition): tp.offset for tp in saved}


class EmptyPartitions:
    """What the last fetches found: per partition, the (start offset, ListOffsets(latest)
    answer) at which a fetch saw no record. While both stay the same no record has been
    added (a new record batch moves the answer, on Tansu too), so no fetch is needed.
    Touched only by :func:`waiting_work`, one call at a time."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[int, int]] = {}


def waiting_work(
    admin: AdminClient,
    client: dict[str, Any],
    group: str,
    topic: str,
    known_ends: dict[int, int],
    empty: EmptyPartitions,
    timeout: float,
) -> dict[int, tuple[int, bool]]:
    """Blocking (worker thread): per partition of ``topic``, the committed offset of
    ``group`` (negative when none) and whether records wait at or past it.

    A record waits when the end of the partition is beyond the committed offset (or the
    earliest offset when nothing is committed). The end is the larger of ListOffsets(latest)
    and ``known_ends`` (what this consumer fetched); when that does not show a waiting
    record, a fetch from the committed offset decides, because Tansu answers
    ListOffsets(latest) with the start of the last record batch, not its end. The fetch
    uses a consumer of its own that only ``assign``s (it joins no group, commits nothing)
    with ``client``'s connection settings; its group id is never used for a commit. It is
    skipped where ``empty`` shows that nothing changed since a fetch found no record.

    Raises:
        DependencyError: the broker did not answer.
    """
    try:
        metadata = admin.list_topics(topic, timeout=timeout)
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            problem = found.error if found is not None else "missing"
            raise DependencyError("kafka", f"cannot describe topic {topic}: {problem}")
        keys = [TopicPartition(topic, p) for p in sorted(found.partitions)]
        if not keys:
            return {}
        answer = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, keys)], request_timeout=timeout
        )[group].result(timeout + 1)
        committed = {tp.partition: tp.offset for tp in answer.topic_partitions}
        ends = _offsets(admin, keys, _LATEST, timeout)
        starts = _offsets(admin, keys, _EARLIEST, timeout)
    except (KafkaException, TimeoutError) as err:
        raise DependencyError("kafka", f"cannot read the group's offsets: {err}") from err
    result: dict[int, tuple[int, bool]] = {}
    unsure: dict[int, int] = {}
    for tp in keys:
        p = tp.partition
        offset = committed.get(p, -1)
        start = offset if offset >= 0 else starts.get(p, 0)
        end = ends.get(p, 0)
        result[p] = (offset, max(end, known_ends.get(p, 0)) > start)
        if not result[p][1] and empty.seen.get(p) != (start, end):
            unsure[p] = start
    if unsure:
        with_records, at_end = _records_at(client, group, topic, unsure, timeout)
        for p, start in unsure.items():
            if p in with_records:
                result[p] = (result[p][0], True)
                empty.seen.pop(p, None)
            elif p in at_end:
                empty.seen[p] = (start, ends.get(p, 0))
    return result


def _offsets(
    admin: AdminClient, keys: Sequence[TopicPartition], spec: Any, timeout: float
) -> dict[int, int]:
    futures = admin.list_offsets(
        {TopicPartition(tp.topic, tp.partition): spec for tp in keys}, request_timeout=timeout
    )
    return {tp.partition: f.result(timeout + 1).offset for tp, f in futures.items()}


def _records_at(
    client: dict[str, Any], group: str, topic: str, starts: dict[int, int], timeout: float
) -> tuple[set[int], set[int]]:
    """Blocking: fetch from each partition's start offset; returns (the partitions with a
    record at or past it, those found at their end). A partition in neither gave no answer
    within ``timeout``; callers count it as empty: this check must not call a consumer
    stalled on a guess."""
    probe = Consumer(
        {
            **client,
            "group.id": f"{group}.unassigned-probe",
            "client.id": "eventsched-unassigned-probe",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "latest",
            "max.partition.fetch.bytes": 65536,
            "queued.max.messages.kbytes": 64,
        }
    )
    found: set[int] = set()
    at_end: set[int] = set()
    try:
        probe.assign([TopicPartition(topic, p, offset) for p, offset in starts.items()])
        deadline = time.monotonic() + timeout
        while len(found) + len(at_end) < len(starts) and time.monotonic() < deadline:
            for message in probe.consume(len(starts), 0.2):
                partition, error = message.partition(), message.error()
                if partition is None or partition not in starts or partition in found:
                    continue
                if error is None:
                    offset = message.offset()
                    if offset is not None and offset >= starts[partition]:
                        found.add(partition)
                        at_end.discard(partition)
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(partition)
    finally:
        probe.close()
    return found, at_end


def latest_offsets(
    admin: AdminClient, partitions: Sequence[TopicPartitionKey]
) -> dict[TopicPartitionKey, int]:
    """Blocking: the latest offset of every partition, in one ListOffsets request."""
    if not partitions:
        return {}
    futures = admin.list_offsets(
        {TopicPartition(topic, p): _LATEST for topic, p in partitions}, request_timeout=5.0
    )
    try:
        return {(tp.topic, tp.partition): f.result(6.0).offset for tp, f in futures.items()}
    except (KafkaException, TimeoutError) as err:
        raise DependencyError("kafka", f"cannot read the end offsets: {err}") from err
