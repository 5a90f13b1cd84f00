"""Prometheus metrics: the one module-level registry the style guide allows.

Names say what they count; label sets are bounded (event types come from settings and
handlers, DLQ reasons from a fixed list of decode/execute reasons, partitions from the topic).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Latency buckets from 1 ms to 10 s: fine enough to show the on-time target (10 ms p99)
# and the peers' one-second lateness on the same histogram.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1,
    0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# A wait for a lease or token lasts as long as the type's backlog: up to hours.
HELD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

EVENTS_PRODUCED = Counter(
    "eventsched_events_produced",
    "Events the producer had acknowledged by Kafka",
    ["type"],
    registry=REGISTRY,
)
PRODUCE_ERRORS = Counter(
    "eventsched_produce_errors",
    "Kafka delivery failures reported to the producer",
    registry=REGISTRY,
)
EVENTS_CONSUMED = Counter(
    "eventsched_events_consumed",
    "Messages the consumer processed, by result",
    ["result"],  # new | duplicate | invalid
    registry=REGISTRY,
)
DLQ_MESSAGES = Counter(
    "eventsched_dlq_messages",
    "Messages published to the dead-letter topic",
    ["reason"],
    registry=REGISTRY,
)
CONSUMER_BATCH_MESSAGES = Histogram(
    "eventsched_consumer_batch_messages",
    "Messages per consumed batch",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000),
    registry=REGISTRY,
)
INGEST_LATENCY = Histogram(
    "eventsched_ingest_latency_seconds",
    "Kafka message timestamp to offsets committed",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
CONSUMER_LAG_MESSAGES = Gauge(
    "eventsched_consumer_lag_messages",
    "Messages behind the high watermark",
    ["partition"],
    registry=REGISTRY,
)
COMMANDS = Counter(
    "eventsched_commands",
    "Commands the consumer applied (cancel, reschedule, retry), by result",
    ["op", "result"],  # applied | cancel_requested | not_applicable | refused | unknown_event
    registry=REGISTRY,  # | repeated (the same command_id was applied before)
)
JOBS_SCHEDULED = Counter(
    "eventsched_jobs_scheduled", "SAQ jobs enqueued for recorded events", registry=REGISTRY
)
DEPENDENCY_UP = Gauge(
    "eventsched_dependency_up",
    "1 when the dependency answered its last check",
    ["dependency"],  # postgres | redis | kafka
    registry=REGISTRY,
)
EXECUTIONS = Counter(
    "eventsched_executions",
    "Execution attempts by outcome",
    ["type", "outcome"],  # succeeded | retried | dead | cancelled | skipped_duplicate
    registry=REGISTRY,
)
EXECUTION_DURATION = Histogram(
    "eventsched_execution_duration_seconds",
    "Handler run time",
    ["type"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
EXECUTION_LATENESS = Histogram(
    "eventsched_execution_lateness_seconds",
    "Handler invocation minus due time, of attempts free to run when due (not held by a limit)",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
EXECUTION_HELD = Histogram(
    "eventsched_execution_held_seconds",
    "Handler invocation minus due time, of attempts a limit of their type held back",
    ["type", "reason"],  # reason: concurrency | rate
    buckets=HELD_BUCKETS,
    registry=REGISTRY,
)
QUEUE_JOBS = Gauge(
    "eventsched_queue_jobs", "SAQ jobs by state", ["state"], registry=REGISTRY
)  # queued | scheduled | active (| lanes), summed over the shards
QUEUE_SHARD_JOBS = Gauge(
    "eventsched_queue_shard_jobs",
    "SAQ jobs by shard (position in redis.shards) and state",
    ["shard", "state"],
    registry=REGISTRY,
)
QUEUE_SHARD_UP = Gauge(
    "eventsched_queue_shard_up",
    "1 if the reconciler leader's last gauge refresh could read the shard, else 0",
    ["shard"],
    registry=REGISTRY,
)
EVENTS_BY_STATUS = Gauge(
    "eventsched_events",
    "Events in PostgreSQL by status (exact up to 10,000 per status, estimated above)",
    ["status"],
    registry=REGISTRY,
)
RECONCILER_REQUEUED = Counter(
    "eventsched_reconciler_requeued",
    "Events the reconciler enqueued again",
    ["reason"],  # overdue | retry_overdue | stale_running | redis_lost | taken_by_lost_worker
    registry=REGISTRY,
)
SCHEDULE_OCCURRENCES = Counter(
    "eventsched_schedule_occurrences",
    "Occurrences of recurring schedules the schedule leader handled, by result",
    ["result"],  # published | failed (not acknowledged: again next pass) | too_old | cancelled
    registry=REGISTRY,
)
RETENTION_DROPPED = Counter(
    "eventsched_retention_dropped",
    "Rows retention dropped with their day partitions (docs/retention.md), by table",
    ["table"],  # events | event_attempts
    registry=REGISTRY,
)
RETENTION_HOPPED = Counter(
    "eventsched_retention_hopped",
    "Events retention moved out of a retired day into today's partition (unfinished, or"
    " finished within retention.keep)",
    registry=REGISTRY,
)
CLAIMS_NOT_DUE = Counter(
    "eventsched_claims_not_due",
    "Jobs whose claim was refused because the event is not due yet (put back at its due time)",
    registry=REGISTRY,
)
# The label is `role_name`, not `role`: Prometheus scrape configs commonly attach a target
# label `role` (ours do), which would turn an exposed `role` into `exported_role`.
ROLE_READY = Gauge(
    "eventsched_role_ready", "1 once a role is ready", ["role_name"], registry=REGISTRY
)
ROLE_STALLED = Gauge(
    "eventsched_role_stalled",
    "1 while a role is alive but not making progress, by reason (/readyz names it)",
    ["role_name", "reason"],  # e.g. consumer/unassigned, consumer/dlq_failing, executor/dlq_failing
    registry=REGISTRY,
)
OLDEST_OVERDUE = Gauge(
    "eventsched_oldest_overdue_seconds",
    "How long the oldest scheduled event is past its due time (0: none overdue); refreshed by"
    " the reconciler leader",
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "eventsched_build_info",
    "1, labelled with the running version and the commit it was built from"
    " (EVENTSCHED_BUILD_COMMIT; unknown when not set)",
    ["version", "commit"],
    registry=REGISTRY,
)

DLQ_UNDELIVERABLE = Counter(
    "eventsched_dlq_undeliverable",
    "Dead-letter copies the DLQ topic refused for what they are, kept in PostgreSQL instead",
    ["reason"],  # the dlq-reason of the message
    registry=REGISTRY,
)
KAFKA_PRODUCER_REBUILDS = Counter(
    "eventsched_kafka_producer_rebuilds",
    "Kafka producer clients replaced because they could no longer deliver",
    ["reason"],  # fatal | stuck_pid (the broker keeps refusing our producer id)
    registry=REGISTRY,
)

API_REQUESTS = Counter(
    "eventsched_api_requests",
    "HTTP API requests answered, by route template, method and status code",
    ["route", "method", "status"],  # route: /v1/events/{id}, ... or unmatched
    registry=REGISTRY,
)
API_REQUEST_DURATION = Histogram(
    "eventsched_api_request_duration_seconds",
    "HTTP API request time (a POST includes the broker's acknowledgement)",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)


def render() -> bytes:
    """The registry in Prometheus text format."""
    return generate_latest(REGISTRY)


def configure_process(environ: Mapping[str, str] | None = None) -> None:
    """Process-wide choices, made by the composition root of a service (not at import: a
    program that only uses the client keeps prometheus_client as it had it):

    - no ``<name>_created`` series: one more series per counter and histogram child that no
      query here uses, stored by Prometheus like any other;
    - ``eventsched_build_info``: the installed version and ``EVENTSCHED_BUILD_COMMIT``.
    """
    env = os.environ if environ is None else environ
    disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
    BUILD_INFO.clear()
    BUILD_INFO.labels(_package_version(), env.get("EVENTSCHED_BUILD_COMMIT") or "unknown").set(1)


def _package_version() -> str:
    try:
        return version("eventsched")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"
