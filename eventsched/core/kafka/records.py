"""What the consumer hands to trio: records, batches, commit results, statistics.

Plain immutable values, built on the consumer thread and read in trio.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

#: ``(topic, partition)``: how partitions are named everywhere in this package's API.
TopicPartitionKey = tuple[str, int]

#: An async callable run in trio on rebalance, with the partitions concerned.
RebalanceHook = Callable[[frozenset[TopicPartitionKey]], Awaitable[None]]


class Record(NamedTuple):
    """One consumed message, copied out of confluent's Message on the consumer thread.

    A NamedTuple, not a frozen dataclass: equally immutable, and about three times cheaper
    to build, which matters once per message on the consumer thread (it holds the GIL).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    #: Milliseconds since the epoch, or None when the broker gave no timestamp.
    timestamp_ms: int | None

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or None."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Batch:
    """Records from one ``consume`` call, stamped with the assignment generation.

    Pass ``generation`` back to :meth:`KafkaConsumer.commit`; offsets of partitions that
    were revoked (or revoked and assigned again) since this batch was fetched are refused.
    """

    records: tuple[Record, ...]
    generation: int

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def next_offsets(self) -> dict[TopicPartitionKey, int]:
        """Per partition, the offset to commit once every record here is processed."""
        offsets: dict[TopicPartitionKey, int] = {}
        for record in self.records:
            key = (record.topic, record.partition)
            offsets[key] = max(offsets.get(key, 0), record.offset + 1)
        return offsets


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What :meth:`KafkaConsumer.commit` did with each partition's offset."""

    committed: Mapping[TopicPartitionKey, int]
    #: Not committed because this consumer no longer owns the partition, or owns it again
    #: only since after the batch was fetched. Those records are redelivered to the owner.
    stale: Mapping[TopicPartitionKey, int]


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """Counters for metrics and tests (read from trio; written by the consumer thread)."""

    batches_fetched: int
    batches_delivered: int
    records_fetched: int
