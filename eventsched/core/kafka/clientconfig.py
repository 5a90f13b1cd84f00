"""The one place where a librdkafka configuration is put together.

Every client eventsched makes (the roles' producer and consumer, the operator commands'
producers, readers and admin clients, the readiness probe, the dev stack's probe) gets its
configuration from :func:`client_config`, so all of them layer the same settings in the
same order. Pure functions: they run on whichever side calls them (trio or a worker
thread) and touch no client.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final

from eventsched.core.runtime.settings import Settings, require_kafka

PRODUCER_DEFAULTS: Final[Mapping[str, Any]] = {
    # No duplicates or reordering on internal retries; requires acks=all.
    "enable.idempotence": True,
    "acks": "all",
    # A few ms of batching costs little latency and saves many requests.
    "linger.ms": 5,
    # Upper bound on how long ``send`` waits for a delivery report (librdkafka's default is
    # 5 minutes, far too long for a caller that awaits each report).
    "message.timeout.ms": 30_000,
}

CONSUMER_DEFAULTS: Final[Mapping[str, Any]] = {
    # Offsets are committed explicitly, only after PostgreSQL and Redis succeeded.
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    # Liveness is judged by heartbeats from librdkafka's own thread: a dead process loses
    # its partitions after session.timeout.ms; the heartbeat interval stays at most a
    # third of it. (Tansu takes about session.timeout.ms / 2 to complete a group join.)
    "session.timeout.ms": 10_000,
    "heartbeat.interval.ms": 1_000,
    # Progress is judged by the time between consume() calls. Slow processing in trio does
    # not count against it: when trio leaves a batch untaken, the worker pauses fetching
    # and keeps calling consume() (see _ConsumerWorker.HOLD_AFTER). What does count is time
    # the worker spends elsewhere: a rebalance hook (bounded by hook_timeout), a commit or
    # lag query (bounded by socket.timeout.ms). librdkafka's default is ample for those.
    "max.poll.interval.ms": 300_000,
    # Bounds each broker request, notably the synchronous commit the consumer thread waits
    # on, well below librdkafka's 60 s default.
    "socket.timeout.ms": 10_000,
}

#: librdkafka properties of the consumer role's consumer that settings may override: a
#: small prefetch that is refilled at once (docs/design-notes.md, "Consumer prefetch").
#: librdkafka prefetches up to 64 MB per consumer by default, in fetches of up to 1 MB per
#: partition, and once that queue is full waits a whole second before it fetches again.
#: The consumer's memory goes with the prefetch (RSS peak of an ingest burst: ~155 MB with
#: 16 MB queued, ~107 MB with this); the rate holds only if the queue is refilled as soon
#: as there is room, hence the 1 ms backoff and fetches small enough to fit the queue.
CONSUMER_CLIENT_DEFAULTS: Final[Mapping[str, Any]] = {
    # About 3,000 events of ~300 bytes: one or two batches (consumer.max_batch) ahead.
    "queued.max.messages.kbytes": 1024,
    # A full queue postpones the next fetch this long (librdkafka: 1000 ms, which starves a
    # small queue; 20 ms still cost a tenth of the rate).
    "fetch.queue.backoff.ms": 1,
    # Fetches that fit the queue: 256 KB per partition, 1 MB per request in all (a bigger
    # message still comes alone, librdkafka and the broker never refuse it for this).
    "max.partition.fetch.bytes": 262_144,
    "fetch.max.bytes": 1_048_576,
}


class ClientKind(enum.Enum):
    """What a configuration is for; it decides the defaults and which settings apply."""

    #: A producer: the roles' shared :class:`KafkaProducer`, ``eventsched send``, the
    #: producer of ``eventsched dlq replay``.
    PRODUCER = "producer"
    #: The consumer role's group member (:class:`KafkaConsumer`).
    GROUP_CONSUMER = "group_consumer"
    #: A consumer that reads topics for an operator command (its own group id, no role).
    READER = "reader"
    #: An ``AdminClient`` (topics, offsets, the readiness probe).
    ADMIN = "admin"


#: No client of eventsched creates a topic by naming it. librdkafka lets a producer's (and an
#: admin client's) metadata request create a missing topic on a broker that allows it, with
#: the broker's default partition count (the dev broker made `events` with 4 partitions
#: instead of kafka.partitions' 3 that way); topics come from `eventsched topics ensure` or
#: the dev stack, and a role that finds one missing says so on /readyz.
NO_AUTO_CREATE: Final[Mapping[str, Any]] = {"allow.auto.create.topics": False}

_DEFAULTS: Final[Mapping[ClientKind, Mapping[str, Any]]] = {
    ClientKind.PRODUCER: {**PRODUCER_DEFAULTS, **NO_AUTO_CREATE},
    ClientKind.GROUP_CONSUMER: {**CONSUMER_DEFAULTS, **CONSUMER_CLIENT_DEFAULTS, **NO_AUTO_CREATE},
    ClientKind.READER: NO_AUTO_CREATE,
    ClientKind.ADMIN: NO_AUTO_CREATE,
}
_CONSUMER_KINDS: Final = frozenset({ClientKind.GROUP_CONSUMER, ClientKind.READER})


def client_config(
    kind: ClientKind,
    bootstrap: str,
    *,
    client: Mapping[str, Any] | None = None,
    consumer_client: Mapping[str, Any] | None = None,
    own: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The librdkafka configuration of one client; a later layer wins over an earlier one:

    1. the kind's built-in defaults (:data:`PRODUCER_DEFAULTS`; :data:`CONSUMER_DEFAULTS`
       and :data:`CONSUMER_CLIENT_DEFAULTS` for the group consumer; none otherwise);
    2. ``client`` (setting ``kafka.client``, for every client);
    3. ``consumer_client`` (setting ``kafka.consumer_client``), for consumers only
       (:attr:`ClientKind.GROUP_CONSUMER`, :attr:`ClientKind.READER`); ignored otherwise;
    4. ``bootstrap.servers`` = ``bootstrap`` (setting ``kafka.bootstrap_servers``);
    5. ``own``: the keys the caller sets itself (``group.id``, ``client.id``, callbacks,
       timeouts of a command, ...).

    One exception to 4: a producer takes ``bootstrap`` beneath layer 2, so a
    ``bootstrap.servers`` in ``kafka.client`` points every producer (and only producers)
    at another cluster, while consumers, admin clients and the readiness probe keep
    ``kafka.bootstrap_servers``.
    """
    config: dict[str, Any] = dict(_DEFAULTS[kind])
    if kind is ClientKind.PRODUCER:
        config["bootstrap.servers"] = bootstrap
    config.update(client or {})
    if kind in _CONSUMER_KINDS:
        config.update(consumer_client or {})
    if kind is not ClientKind.PRODUCER:
        config["bootstrap.servers"] = bootstrap
    config.update(own or {})
    return config


def config_from_settings(
    settings: Settings, kind: ClientKind, own: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """:func:`client_config` with its layers taken from ``settings.kafka``.

    Raises:
        ConfigError: ``kafka.bootstrap_servers`` is not set.
    """
    return client_config(
        kind,
        require_kafka(settings),
        client=settings.kafka.client,
        consumer_client=settings.kafka.consumer_client,
        own=own,
    )
