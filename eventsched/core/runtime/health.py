"""The health/metrics HTTP server: ``/metrics``, ``/healthz``, ``/readyz``.

Served by hypercorn on trio (a well-kept ASGI server, so request parsing, size limits and
keep-alive are not ours to get wrong) with a tiny ASGI app: three read-only endpoints need
no framework.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import Framework

from eventsched.core.runtime import metrics
from eventsched.core.runtime.errors import ConfigError, describe
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.redaction import redact

log = get_logger(__name__)

Check = Callable[[], Awaitable[None]]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class Health:
    """Readiness state: which roles are ready and whether each dependency answers.

    Dependency checks run in :meth:`monitor` on an interval (so ``/readyz`` is cheap and a
    flood of probes cannot overload PostgreSQL); their results also drive the
    ``eventsched_dependency_up`` gauge.
    """

    check_timeout: float = 2.0
    roles: dict[str, bool] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    checked: trio.Event = field(default_factory=trio.Event)
    #: (role, reason) -> (what is wrong, monotonic time since when); see :meth:`stall`.
    stalls: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)

    def expect_role(self, role: str) -> None:
        self.roles[role] = False
        metrics.ROLE_READY.labels(role).set(0)

    def role_ready(self, role: str, ready: bool = True) -> None:
        self.roles[role] = ready
        metrics.ROLE_READY.labels(role).set(1 if ready else 0)

    def add_check(self, dependency: str, check: Check) -> None:
        self.checks[dependency] = check
        self.failures.setdefault(dependency, "not checked yet")

    def mark(self, dependency: str, problem: str | None) -> None:
        """Record a dependency's state (also called by adapters that saw it fail)."""
        previous = self.failures.get(dependency)
        if problem is None:
            self.failures.pop(dependency, None)
            metrics.DEPENDENCY_UP.labels(dependency).set(1)
            if previous is not None and previous != "not checked yet":
                log.info("dependency_recovered", dependency=dependency)
        else:
            problem = redact(problem)
            self.failures[dependency] = problem
            metrics.DEPENDENCY_UP.labels(dependency).set(0)
            if previous != problem:
                log.warning("dependency_down", dependency=dependency, error=problem)

    def stall(self, role: str, reason: str, what: str, since: float | None = None) -> None:
        """Mark ``role`` alive but not making progress, for ``reason`` (a short fixed label
        such as ``unassigned`` or ``dlq_failing``; it is the metric's label).

        ``what`` says what is wrong in words (``no partitions assigned``); ``since`` is the
        :func:`time.monotonic` instant it started (default: now, or the instant already
        recorded for this role and reason). ``/readyz`` answers 503 while any stall is set and
        names it as ``"<role>: <what> for <N>s"``; ``eventsched_role_stalled{role_name,reason}``
        is 1 meanwhile. Idempotent: call it on every check that still sees the problem."""
        key = (role, reason)
        known = self.stalls.get(key)
        if since is None:
            since = known[1] if known is not None else time.monotonic()
        self.stalls[key] = (what, since)
        metrics.ROLE_STALLED.labels(role, reason).set(1)
        if known is None or known[0] != what:
            log.warning("role_stalled", stalled_role=role, reason=reason, problem=what)

    def unstall(self, role: str, reason: str) -> None:
        """Clear a stall set by :meth:`stall` (a no-op when none is set)."""
        if self.stalls.pop((role, reason), None) is not None:
            metrics.ROLE_STALLED.labels(role, reason).set(0)
            log.info("role_progressing", stalled_role=role, reason=reason)

    def stalled(self) -> list[str]:
        """The stalls in words, e.g. ``consumer: no partitions assigned for 42s``."""
        now = time.monotonic()
        return sorted(
            f"{role}: {what} for {max(0.0, now - since):.0f}s"
            for (role, _reason), (what, since) in self.stalls.items()
        )

    async def run_checks(self) -> None:
        async def one(name: str, check: Check) -> None:
            try:
                with trio.fail_after(self.check_timeout):
                    await check()
            except trio.TooSlowError:
                self.mark(name, f"no answer within {self.check_timeout:g}s")
            except Exception as err:  # any failure of the dependency means "not ready"
                self.mark(name, describe(err))
            else:
                self.mark(name, None)

        async with trio.open_nursery() as nursery:
            for name, check in self.checks.items():
                nursery.start_soon(one, name, check)
        self.checked.set()

    async def monitor(self, interval: float = 1.0) -> None:
        while True:
            await self.run_checks()
            await trio.sleep(interval)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        not_ready = sorted(role for role, ok in self.roles.items() if not ok)
        stalled = self.stalled()
        body: dict[str, Any] = {
            "ready": not not_ready and not self.failures and not stalled,
            "roles": dict(self.roles),
            "dependencies": {name: self.failures.get(name, "ok") for name in self.checks},
        }
        if not_ready:
            body["not_ready_roles"] = not_ready
        if self.failures:
            body["failing"] = sorted(self.failures)
        if stalled:
            body["stalled"] = stalled
        return bool(body["ready"]), body


def make_app(health: Health) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", "text/plain")
        elif path == "/metrics":
            await _respond(send, 200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/healthz":
            await _respond(send, 200, b'{"alive": true}\n', "application/json")
        elif path == "/readyz":
            ready, body = health.readiness()
            payload = (json.dumps(body, sort_keys=True) + "\n").encode()
            await _respond(send, 200 if ready else 503, payload, "application/json")
        else:
            await _respond(send, 404, b"not found\n", "text/plain")

    return app


async def _respond(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def hypercorn_config(host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    # Bounded inputs: these endpoints take no body; small header limits and short keep-alive.
    config.h11_max_incomplete_size = 16 * 1024
    config.wsgi_max_body_size = 0
    config.keep_alive_timeout = 5
    config.graceful_timeout = 1
    return config


async def serve_http(
    health: Health,
    host: str,
    port: int,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    setting: str = "http.port",
) -> None:
    """Serve until ``shutdown`` is set; ``task_status.started`` gets the bound port.

    A port that cannot be bound (in use, privileged) is a :class:`ConfigError` naming
    ``setting`` (the option or setting the port came from): retrying cannot help.
    """

    async def started_wrapper(*, task_status: trio.TaskStatus[list[str]]) -> None:
        # Our app takes plain mappings; hypercorn types its scope/event unions precisely.
        app = cast("Framework", make_app(health))
        await serve(
            app,
            hypercorn_config(host, port),
            shutdown_trigger=shutdown.wait,
            task_status=task_status,
        )

    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(started_wrapper)
        except* OSError as group:
            raise _bind_error(group, host, port, setting) from None
        bound = int(str(binds[0]).rsplit(":", 1)[1]) if binds else port
        log.info("http_listening", host=host, port=bound)
        task_status.started(bound)


def _bind_error(
    group: BaseExceptionGroup[OSError], host: str, port: int, setting: str
) -> ConfigError:
    """One line for a failed bind (hypercorn raises it from inside its nurseries)."""
    err = group.exceptions[0]
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    reason = {
        errno.EADDRINUSE: "address in use",
        errno.EACCES: "permission denied",
        errno.EADDRNOTAVAIL: "address not available on this host",
    }.get(err.errno or 0, err.strerror or str(err))
    return ConfigError(setting, f"cannot listen on {host}:{port}: {reason}")
