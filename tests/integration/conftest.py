"""This tier's fixtures: the servers (``tests.support.servers``) and the loopback receivers
(``tests.support.webhook``), each defined once there."""

from tests.support.servers import (  # noqa: F401
    clean_queue,
    database,
    dlq_topic,
    empty_database,
    executor_state,
    kafka_bootstrap,
    make_settings,
    names,
    own_broker,
    own_postgres,
    own_redis,
    pg_admin_dsn,
    redis_url,
    services_dir,
    shards,
)
from tests.support.webhook import closed_port, not_http, receiver  # noqa: F401
