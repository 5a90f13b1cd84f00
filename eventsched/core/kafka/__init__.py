"""Trio-native Kafka adapter around confluent-kafka (librdkafka), which is blocking.

The only package of eventsched that imports ``confluent_kafka`` (besides the operator
commands and the dev stack, which drive blocking clients of their own); roles use what it
exports here. It may import ``eventsched.core`` modules (config, errors, metrics) and
nothing of ``eventsched.plugins``.

* :mod:`~eventsched.core.kafka.clientconfig`: :func:`client_config`, the one function that
  builds a librdkafka configuration, and the built-in defaults.
* :mod:`~eventsched.core.kafka.admin`: :func:`ensure_topics` (sync) creates missing topics
  and grows partition counts (``eventsched topics ensure``, the dev stack);
  :func:`check_broker` (readiness probe); :class:`Admin` (the consumer role's offset
  queries).
* :mod:`~eventsched.core.kafka.producer`: :class:`KafkaProducer`; ``send`` / ``send_many``
  await the broker's delivery reports.
* :mod:`~eventsched.core.kafka.consumer` (trio side) and
  :mod:`~eventsched.core.kafka.consumerthread` (worker thread): :class:`KafkaConsumer`,
  batch consumption with manual, generation-checked commits; the values it hands over
  are in :mod:`~eventsched.core.kafka.records`.
* :mod:`~eventsched.core.kafka.bridge`: the trio <-> worker-thread bridge all clients run
  on; its docstring describes the threading model.
"""

from eventsched.core.kafka.admin import Admin, EmptyPartitions, check_broker, ensure_topics
from eventsched.core.kafka.clientconfig import (
    CONSUMER_CLIENT_DEFAULTS,
    CONSUMER_DEFAULTS,
    NO_AUTO_CREATE,
    PRODUCER_DEFAULTS,
    ClientKind,
    client_config,
    config_from_settings,
)
from eventsched.core.kafka.consumer import KafkaConsumer
from eventsched.core.kafka.producer import DeliveryReport, KafkaProducer, OutboundMessage
from eventsched.core.kafka.records import (
    Batch,
    CommitResult,
    ConsumerStats,
    RebalanceHook,
    Record,
    TopicPartitionKey,
)

__all__ = [
    "CONSUMER_CLIENT_DEFAULTS",
    "CONSUMER_DEFAULTS",
    "NO_AUTO_CREATE",
    "PRODUCER_DEFAULTS",
    "Admin",
    "Batch",
    "ClientKind",
    "CommitResult",
    "ConsumerStats",
    "DeliveryReport",
    "EmptyPartitions",
    "KafkaConsumer",
    "KafkaProducer",
    "OutboundMessage",
    "RebalanceHook",
    "Record",
    "TopicPartitionKey",
    "check_broker",
    "client_config",
    "config_from_settings",
    "ensure_topics",
]
