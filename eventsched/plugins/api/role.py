"""The api role plugin: serve the HTTP API on ``api.host:api.port`` with hypercorn on trio.

Runs on the trio side. ``check_settings`` refuses ``[api]`` settings the role must not
start with (no token with ``auth = "token"``, ``auth = "none"`` on a non-loopback host, an
unreadable token file) before anything is connected; a port that cannot be bound is a
ConfigError naming ``api.port``. The role is ready once the port is bound: PostgreSQL or
Kafka being down shows as 503 answers (and on ``/readyz``), not as a role that waits.
On ``ctx.stopping`` the server stops accepting connections and lets requests in flight
finish (hypercorn's graceful timeout, ``shutdown.grace``).
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import Framework

from eventsched.core.domain.decode import DecodeLimits
from eventsched.core.runtime.contracts import RoleContext
from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.settings import Settings
from eventsched.plugins.api.app import ApiConfig, api_limits, build_app
from eventsched.plugins.api.auth import check_api_settings, load_tokens

log = get_logger(__name__)


class Api:
    """The api role plugin (see the module docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset({"postgres", "kafka_producer"})

    @staticmethod
    def check_settings(settings: Settings) -> None:
        check_api_settings(settings.api)

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        s = ctx.settings
        self.config = ApiConfig(
            topic=s.kafka.topic,
            limits=api_limits(DecodeLimits.from_settings(s.consumer)),
            produce_timeout=float(s.api.produce_timeout),
            tokens=None if s.api.auth == "none" else load_tokens(s.api.tokens),
        )
        self.app = build_app(
            self.config, ctx.resources.require_db(), ctx.resources.require_kafka_producer()
        )
        self._log = log.bind(role=ctx.role)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        api = self.ctx.settings.api
        stop = trio.Event()
        config = _hypercorn_config(api.host, api.port, float(self.ctx.settings.shutdown.grace))

        async def serving(*, task_status: trio.TaskStatus[Any]) -> None:
            await serve(
                cast("Framework", self.app),
                config,
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )

        async with trio.open_nursery() as nursery:
            try:
                binds = await nursery.start(serving)
            except* OSError as group:
                raise _bind_error(group, api.host, api.port) from None
            port = int(str(binds[0]).rsplit(":", 1)[1]) if binds else api.port
            self._log.info(
                "api_listening", host=api.host, port=port, auth=api.auth, tokens=len(api.tokens)
            )
            task_status.started()
            await self.ctx.stopping.wait()
            stop.set()
        self._log.info("api_stopped")


def _hypercorn_config(host: str, port: int, grace: float) -> Config:
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None  # requests are counted in metrics; headers hold tokens
    config.errorlog = None
    config.h11_max_incomplete_size = 16 * 1024  # request line and headers
    config.keep_alive_timeout = 30
    config.graceful_timeout = grace
    config.include_server_header = False
    return config


def _bind_error(group: BaseExceptionGroup[OSError], host: str, port: int) -> ConfigError:
    err: BaseException = group
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    assert isinstance(err, OSError)
    reason = {
        errno.EADDRINUSE: "address in use",
        errno.EACCES: "permission denied",
        errno.EADDRNOTAVAIL: "address not available on this host",
    }.get(err.errno or 0, err.strerror or str(err))
    return ConfigError("api.port", f"cannot listen on {host}:{port}: {reason}")
