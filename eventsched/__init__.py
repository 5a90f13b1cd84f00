"""eventsched: a deferred-event scheduler (Kafka in, PostgreSQL log, SAQ on Redis out)."""

__version__ = "0.1.0"
