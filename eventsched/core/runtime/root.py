"""The composition root: settings → adapters → plugins, one nursery, trio owns the signals.

Start-up order: role plugins are imported and checked, with the settings they load
(``check_settings``, e.g. the executor's handlers), before anything is connected; then the
HTTP server (so ``/healthz`` answers and ``/readyz`` says 503 while roles start), dependency
monitoring, then every role with ``await nursery.start(plugin.run)`` in its own task (a role
waiting for PostgreSQL does not hold up another role). A bad plugin or setting, including an
HTTP port that cannot be bound, leaves :meth:`Runtime.run` as its ConfigError/PluginError.

Shutdown is two-phase: the first SIGTERM/SIGINT sets ``stopping`` (roles stop intake and
drain) and puts a deadline of ``shutdown.grace`` on the roles; a second signal cancels
everything at once. Adapters are closed under a shield with a time limit.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
import trio_asyncio

from eventsched.core.runtime import bootstrap, metrics, tracing
from eventsched.core.runtime.contracts import Resources, RoleContext, RoleFactory, load_role_factory
from eventsched.core.runtime.errors import ConfigError, DependencyError, PluginError, describe
from eventsched.core.runtime.health import Health, serve_http
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.profiling import start_profiling, stop_profiling
from eventsched.core.runtime.settings import (
    DEFAULT_PORTS,
    NAMED_ROLES,
    ROLES,
    Settings,
    require_kafka,
    require_postgres,
    require_redis,
)

log = get_logger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1  # a role or the runtime itself failed
EXIT_FORCED = 130  # a second signal: we stopped without draining


def expand_roles(roles: Iterable[str]) -> list[str]:
    """``all`` means producer, consumer and executor (``api`` runs only when named); order
    is fixed (producer, consumer, executor, api), no repeats."""
    wanted: set[str] = set()
    for role in roles:
        wanted.update(ROLES if role == "all" else (role,))
    return [r for r in (*ROLES, *NAMED_ROLES) if r in wanted]


def http_port(settings: Settings, roles: list[str]) -> int:
    """The configured port, or the first role's default (one server per process)."""
    return settings.http.port or DEFAULT_PORTS[roles[0]]


@dataclass
class RunResult:
    exit_code: int
    drained: bool


class Runtime:
    """Runs the given roles in this process until a signal or until every role returns."""

    def __init__(
        self,
        settings: Settings,
        roles: list[str],
        *,
        port: int | None = None,
        on_ready: Callable[[int], Awaitable[None]] | None = None,
        extra_tasks: list[Callable[[Runtime], Awaitable[None]]] | None = None,
    ) -> None:
        self.settings = settings
        self.roles = roles
        self.port = http_port(settings, roles) if port is None else port
        self.port_setting = "http.port" if port is None else "--port"
        # Plugins are imported and checked here, before anything is connected: a bad one
        # is a PluginError (one line, exit 2), not a failure after start-up.
        self.factories: dict[str, RoleFactory] = {
            role: load_role_factory(role, getattr(settings.plugins, role)) for role in roles
        }
        for factory in self.factories.values():
            check_settings = getattr(factory, "check_settings", None)
            if check_settings is not None:
                check_settings(settings)
        self.needs: set[str] = set()
        for factory in self.factories.values():
            self.needs |= set(getattr(factory, "needs", frozenset()))
        if "redis" in self.needs:
            from eventsched.core.jobqueue import check_saq_version  # SAQ only for queue roles

            check_saq_version()  # the job queue relies on SAQ internals of one release
        self.health = Health()
        self.stopping = trio.Event()
        self.all_ready = trio.Event()
        self.forced = False
        self.on_ready = on_ready
        self.extra_tasks = extra_tasks or []
        self.bound_port: int | None = None
        self.resources: Resources | None = None

    async def run(self) -> RunResult:
        bootstrap.install()  # a no-op after the CLI's; needed where the runtime is embedded
        metrics.configure_process()
        # OTEL_* variables: spans exported when they say so (a bad value exits 2 naming it).
        tracing.configure("eventsched", {"eventsched.roles": ",".join(self.roles)})
        profiling = start_profiling(self.settings, self.roles)
        try:
            async with trio_asyncio.open_loop():
                return await self._run_in_loop()
        except Exception as err:  # nurseries raise ExceptionGroups; report, exit non-zero
            bad = _bad_setting(err)
            if bad is not None:
                raise bad from None  # the CLI prints one line naming it and exits 2
            log.error("runtime_failed", error=describe(err), exc_info=err)
            return RunResult(EXIT_FAILED, False)
        finally:
            if profiling:
                stop_profiling()
            # Exports the spans still buffered: a few seconds at most when the collector is
            # down (the exporter's retries), in a thread as any blocking call.
            if tracing.configured():
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(tracing.shutdown)

    async def _run_in_loop(self) -> RunResult:
        drained = True
        http_stop = trio.Event()
        async with trio.open_nursery() as root:
            await root.start(self._watch_signals, root.cancel_scope)
            # HTTP first: /healthz answers and /readyz says what is missing while the
            # adapters wait for their dependencies.
            self.bound_port = await root.start(self._serve_http, http_stop)
            async with self._resources() as resources:
                self.resources = resources
                root.start_soon(self.health.monitor)
                # Side tasks (live summary, a --duration timer) run until the roles are done.
                for task in self.extra_tasks:
                    root.start_soon(task, self)
                ctx_for = {
                    role: RoleContext(role, self.settings, resources, self.health, self.stopping)
                    for role in self.roles
                }
                with trio.CancelScope() as roles_scope:
                    self._roles_scope = roles_scope
                    async with trio.open_nursery() as roles_nursery:
                        # Stopped while waiting for a dependency: no role to start.
                        for role in self.roles if not self.stopping.is_set() else ():
                            self.health.expect_role(role)
                            roles_nursery.start_soon(
                                self._start_role, roles_nursery, role, ctx_for[role]
                            )
                        if self.on_ready is not None:
                            roles_nursery.start_soon(self._notify_ready)
                if roles_scope.cancelled_caught:
                    drained = False
                    log.warning("shutdown_deadline_exceeded", grace=self.settings.shutdown.grace)
                http_stop.set()
                root.cancel_scope.cancel()
        if self.forced:
            log.warning("shutdown_forced")
            return RunResult(EXIT_FORCED, False)
        log.info("shutdown_complete", drained=drained)
        return RunResult(EXIT_OK, drained)

    async def _serve_http(self, stop: trio.Event, *, task_status: trio.TaskStatus[int]) -> None:
        await serve_http(
            self.health,
            self.settings.http.host,
            self.port,
            shutdown=stop,
            task_status=task_status,
            setting=self.port_setting,
        )

    async def _start_role(self, nursery: trio.Nursery, role: str, ctx: RoleContext) -> None:
        plugin = self.factories[role](ctx)
        log.info("role_starting", role=role)
        await nursery.start(plugin.run)
        self.health.role_ready(role)
        log.info("role_ready", role=role)
        if all(self.health.roles.values()):
            # Everything allocated at start-up (modules, pools, clients) lives until exit:
            # moving it out of the collector's generations removes 40-60 ms GC pauses that
            # otherwise show up directly as execution lateness.
            gc.freeze()
            self.all_ready.set()

    async def _notify_ready(self) -> None:
        await self.all_ready.wait()
        assert self.on_ready is not None and self.bound_port is not None
        await self.on_ready(self.bound_port)

    async def _watch_signals(
        self, root_scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.stopping.is_set():
                    log.info("shutdown_requested", signal=name, grace=self.settings.shutdown.grace)
                    self.request_stop()
                else:
                    log.warning("shutdown_now", signal=name)
                    self.forced = True
                    root_scope.cancel()
                    return

    def request_stop(self) -> None:
        """Phase one: stop intake and give in-flight work ``shutdown.grace`` to drain."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        for role in self.roles:
            self.health.role_ready(role, False)
        scope = getattr(self, "_roles_scope", None)
        if scope is not None:
            scope.deadline = trio.current_time() + self.settings.shutdown.grace

    @asynccontextmanager
    async def _resources(self) -> AsyncIterator[Resources]:
        resources = Resources()
        s = self.settings
        try:
            if "postgres" in self.needs:
                from eventsched.core.store.pool import Database

                resources.db = await Database.open(
                    require_postgres(s),
                    min_size=s.postgres.pool_min,
                    max_size=s.postgres.pool_max,
                    connect_timeout=s.postgres.connect_timeout,
                )
                self.health.add_check("postgres", resources.db.ping)
            if "redis" in self.needs:
                from eventsched.core.jobqueue import ShardedQueue

                resources.queue = ShardedQueue(require_redis(s), name=s.redis.queue)
                # One check per shard: /readyz names the shard that is down.
                for shard in resources.queue.shards:
                    self.health.add_check(shard.dependency, shard.ping)
                for shard in resources.queue.shards:
                    await self._until_connected(shard.dependency, shard.connect)
            async with self._kafka_producer(resources):
                if self.needs & {"kafka", "kafka_producer"}:
                    self.health.add_check("kafka", self._kafka_check)
                yield resources
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                if resources.queue is not None:
                    await _quietly("redis", resources.queue.close())
                if resources.db is not None:
                    await _quietly("postgres", resources.db.close())

    async def _until_connected(
        self, dependency: str, connect: Callable[[], Awaitable[None]]
    ) -> None:
        """Retry ``connect`` with exponential backoff until it works or a stop is requested.

        A process that starts while Redis restarts must wait for it, not exit: the outage is
        logged and shown on /readyz meanwhile (found by the chaos run).
        """
        delay = 0.2
        while not self.stopping.is_set():
            try:
                await connect()
            except DependencyError as err:
                self.health.mark(dependency, err.problem)
                with trio.move_on_after(delay):
                    await self.stopping.wait()
                delay = min(delay * 2, 5.0)
            else:
                self.health.mark(dependency, None)
                return

    @asynccontextmanager
    async def _kafka_producer(self, resources: Resources) -> AsyncIterator[None]:
        if "kafka_producer" not in self.needs:
            yield
            return
        from eventsched.core.kafka import ClientKind, KafkaProducer, config_from_settings

        config = config_from_settings(self.settings, ClientKind.PRODUCER)
        async with KafkaProducer.open(
            config, flush_timeout=self.settings.shutdown.grace
        ) as producer:
            resources.kafka_producer = producer
            yield

    async def _kafka_check(self) -> None:
        from eventsched.core.kafka import check_broker

        k = self.settings.kafka
        await check_broker(
            require_kafka(self.settings), dict(k.client), topics=(k.topic, k.dlq_topic)
        )


def _bad_setting(err: BaseException) -> ConfigError | PluginError | None:
    """The ConfigError/PluginError that stopped the runtime (a port that cannot be bound, a
    handler factory that fails), when it is the only error; None for anything else."""
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    return err if isinstance(err, ConfigError | PluginError) else None


async def _quietly(dependency: str, closing: Awaitable[None]) -> None:
    try:
        await closing
    except (DependencyError, OSError) as err:
        log.warning("close_failed", dependency=dependency, error=str(err))
