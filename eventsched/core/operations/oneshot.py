"""What the one-shot operator commands (``send``, ``status``, ``dlq``) share: the time
limit of each request, and confluent-kafka's blocking clients.

These commands are short-lived command-line actions, not part of the trio runtime, so their
Kafka parts use the blocking clients directly: created, used and closed on one thread (the
calling thread, or the one worker thread a command hands its Kafka part to).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

from confluent_kafka import Consumer, KafkaException

from eventsched.core.kafka import ClientKind, config_from_settings
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.settings import Settings

T = TypeVar("T")

#: Seconds each ``status`` section (and each Kafka request) may take.
SECTION_TIMEOUT: Final = 5.0


def new_client(cls: Callable[[dict[str, Any]], T], config: dict[str, Any]) -> T:
    # librdkafka would print every client error to stderr; keep the command's output clean
    # and let the calls' own errors speak.
    config.setdefault("error_cb", lambda err: None)
    config.setdefault("log_level", 0)
    try:
        return cls(config)
    except (KafkaException, ValueError, TypeError) as err:
        raise DependencyError("kafka", f"cannot create client: {err}") from err


def new_reader(settings: Settings, group: str, **extra: Any) -> Consumer:
    return new_client(
        Consumer,
        config_from_settings(
            settings,
            ClientKind.READER,
            own={
                "group.id": group,
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                # Short long-polls: an empty partition answers (EOF) quickly.
                "fetch.wait.max.ms": 100,
                **extra,
            },
        ),
    )


def topic_partitions(consumer: Consumer, topic: str, timeout: float) -> list[int]:
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
    except KafkaException as err:
        raise DependencyError("kafka", f"cannot list topic {topic}: {err}") from err
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise DependencyError("kafka", f"topic {topic} does not exist")
    return sorted(info.partitions)
