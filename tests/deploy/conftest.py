"""The server fixtures (one definition, in ``tests.support.servers``) for this tier."""

from tests.support.servers import (  # noqa: F401
    database,
    dlq_topic,
    empty_database,
    executor_state,
    kafka_bootstrap,
    make_settings,
    names,
    pg_admin_dsn,
    redis_url,
    services_dir,
)
