"""The sections of the settings: one frozen struct per table (``[kafka]``, ``[executor]``,
...), with its keys, their types and their defaults.

:class:`eventsched.core.runtime.settings.Settings` gathers them, and
:mod:`eventsched.core.runtime.settings` reads, converts and checks them; ``[scheduler]``
and ``[schedules.<name>]`` are :mod:`eventsched.core.runtime.schedulesettings`, ``[types]``
is :mod:`eventsched.core.runtime.typesettings`. What a key means for operators is
docs/settings.md and the comments of config/settings.toml.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from eventsched.core.runtime.units import ByteSize, Duration


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base for settings sections: immutable, and a misspelt key is an error, not ignored."""


class KafkaSettings(Section, frozen=True):
    bootstrap_servers: str = ""
    topic: str = "events"
    dlq_topic: str = "events-dlq"
    partitions: int = 3
    replication_factor: int = 1
    consumer_group: str = "eventsched-consumer"
    replay_group: str = "eventsched-dlq-replay"
    # Extra librdkafka properties merged into every client (e.g. security settings).
    client: dict[str, str | int | float | bool] = {}
    # Extra properties for consumers only (group timeouts such as session.timeout.ms): a
    # producer or admin client given consumer properties warns about each one.
    consumer_client: dict[str, str | int | float | bool] = {}


class PostgresSettings(Section, frozen=True):
    dsn: str = ""
    pool_min: int = 1
    pool_max: int = 10
    connect_timeout: Duration = Duration(5.0)


class RedisSettings(Section, frozen=True):
    # One shard: `url`; several: `shards` (set one of the two). See eventsched.core.jobqueue.shards.
    url: str = ""
    shards: tuple[str, ...] = ()
    queue: str = "eventsched"


class HttpSettings(Section, frozen=True):
    host: str = "127.0.0.1"
    # 0 means "the first role's default port" (producer 8080, consumer 8081, executor 8082,
    # api 8085).
    port: int = 0


class LoggingSettings(Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    # `eventsched run`: debug and info lines are written together at most this late (0: each
    # at once); warnings and errors always at once. See eventsched.core.runtime.logs.LineWriter.
    flush_interval: Duration = Duration(0.05)


class ShutdownSettings(Section, frozen=True):
    grace: Duration = Duration(10.0)


class ProducerSettings(Section, frozen=True):
    interval: Duration = Duration(2.0)
    # Events per second; 0 means "one event every `interval`".
    rate: float = 0.0
    batch_size: int = 500
    event_types: tuple[str, ...] = (
        "user.created",
        "order.placed",
        "payment.processed",
        "notification.sent",
    )
    delay_min: Duration = Duration(1.0)
    delay_max: Duration = Duration(10.0)
    # Batches (with rate > 0) whose delivery reports may be outstanding at once; when all
    # are, generation waits: back-pressure instead of an ever-growing local queue.
    max_in_flight: int = 8


class ConsumerSettings(Section, frozen=True):
    max_batch: int = 1000
    batch_timeout: Duration = Duration(0.1)
    max_retries: int = 5
    max_message_bytes: int = 1_048_576
    max_payload_depth: int = 32
    # Due times further in the past than this go to the DLQ; closer ones run now, flagged late.
    max_past: Duration = Duration(86_400.0)
    # Due times further in the future than this go to the DLQ.
    horizon: Duration = Duration(365 * 86_400.0)
    # Retries while PostgreSQL, Redis or the broker is down: exponential backoff with jitter
    # from backoff_initial up to backoff_max, for as long as it takes (nothing is skipped).
    backoff_initial: Duration = Duration(0.1)
    backoff_max: Duration = Duration(5.0)
    # On a rebalance, how long the revoke hook waits for the batch in flight to be recorded
    # and committed before the partitions go (keep it well below max.poll.interval.ms).
    revoke_wait: Duration = Duration(5.0)
    # How often the consumer_lag_messages gauge is refreshed from the broker.
    lag_interval: Duration = Duration(5.0)
    # A consumer with no partitions for this long, while records of its topic wait that no
    # member commits, is stalled: /readyz answers 503 (checked every lag_interval).
    unassigned_grace: Duration = Duration(30.0)
    # A consumer stalled that way (above) for this long leaves the group, has the broker
    # forget the group's state (its committed offsets are committed back) and joins again;
    # each further try waits twice as long, up to 8 times this. 0: never. For the dev
    # broker, which can wedge a group (`eventsched dev` sets 30s); not needed with Kafka.
    rejoin_after: Duration = Duration(0.0)


class RetryBackoffSettings(Section, frozen=True):
    base: Duration = Duration(1.0)
    factor: float = 2.0
    max: Duration = Duration(60.0)
    jitter: float = 0.2


class SimulateSettings(Section, frozen=True):
    duration: Duration = Duration(0.05)
    error_rate: float = 0.1


class WebhookSettings(Section, frozen=True):
    # Whole request (connect, send, response) time limit of the webhook handler.
    timeout: Duration = Duration(10.0)
    # Whether an event's payload field `webhook_url` may choose the URL (else only
    # [webhooks] is used). Needs allowed_hosts: whoever produces events picks the targets.
    allow_payload_url: bool = False
    # Hosts a payload URL may name: "hooks.example.com", "*.example.com", "*" (any host),
    # or addresses/networks ("10.1.0.0/16"). Names reach public addresses only; a loopback,
    # private, link-local, multicast or unspecified address must be inside a listed network.
    allowed_hosts: tuple[str, ...] = ()
    # Regular expressions: a URL path segment matching one in full is shown as *** in error
    # texts and logs (segments of 20+ token characters always are).
    secret_path_patterns: tuple[str, ...] = ()


#: Handlers one executor process runs at once when ``executor.concurrency`` is 0 (the
#: default): enough for 1,000 events/s of handlers that take up to ~40 ms (rate x handler
#: time, with headroom), while a handler slot costs a few KB. See docs/settings.md.
DEFAULT_CONCURRENCY = 64


class ExecutorSettings(Section, frozen=True):
    # 0 means DEFAULT_CONCURRENCY.
    concurrency: int = 0
    max_retries: int = 3
    retry_backoff: RetryBackoffSettings = RetryBackoffSettings()
    simulate: SimulateSettings = SimulateSettings()
    job_timeout: Duration = Duration(300.0)
    webhook: WebhookSettings = WebhookSettings()
    # Payload bytes one process holds at once (0: no bound); see eventsched.core.jobqueue.budget.
    inflight_bytes: ByteSize = ByteSize(64 * 1024 * 1024)
    # The shards (0-based positions in redis.shards) this executor claims jobs from; empty: all.
    shards: tuple[int, ...] = ()


class ReconcilerSettings(Section, frozen=True):
    enabled: bool = True
    interval: Duration = Duration(5.0)
    grace: Duration = Duration(10.0)
    stale_after: Duration = Duration(600.0)
    batch: int = 1000
    # How often the leader refreshes the eventsched_events / eventsched_queue_jobs gauges.
    gauge_interval: Duration = Duration(5.0)


class ApiToken(Section, frozen=True):
    """One bearer token of the HTTP API: the token itself or a file holding it."""

    name: str
    token: str = ""
    token_file: str = ""
    # A read-only token may read (GET); writes answer 403.
    read_only: bool = False

    def __repr__(self) -> str:  # the token never reaches a log or a traceback
        return f"ApiToken(name={self.name!r}, read_only={self.read_only})"


class ApiSettings(Section, frozen=True):
    host: str = "127.0.0.1"
    port: int = 8084
    # "token": a bearer token for every request; "none" (loopback hosts only): reads and
    # writes without one.
    auth: Literal["token", "none"] = "token"
    tokens: tuple[ApiToken, ...] = ()
    # How long POST answers wait for the broker's acknowledgement before answering 503.
    produce_timeout: Duration = Duration(10.0)


class PluginSettings(Section, frozen=True):
    producer: str = "eventsched.plugins.producer:RandomProducer"
    consumer: str = "eventsched.plugins.consumer:IngestConsumer"
    executor: str = "eventsched.plugins.executor:Executor"
    api: str = "eventsched.plugins.api:Api"


class PyroscopeSettings(Section, frozen=True):
    enabled: bool = False
    server: str = "http://127.0.0.1:4040"
    sample_rate: int = 100
    upload_interval: Duration = Duration(10.0)


class RetentionSettings(Section, frozen=True):
    """``[retention]``: the time-partitioned log's maintenance duty (docs/retention.md). The
    rules are the domain's (``eventsched.core.domain.retention.policy_from_settings``, which
    the CLI applies at start-up, as for schedules)."""

    # The executors' leader creates partitions ahead and retires old ones (false: nobody
    # does; `eventsched retention enforce` still can).
    enabled: bool = True
    keep: Duration = Duration(30 * 86400.0)
    ahead: Duration = Duration(7 * 86400.0)
    interval: Duration = Duration(3600.0)
    archive_dir: str = ""


class DevSettings(Section, frozen=True):
    data_dir: str = ".eventsched/dev"
