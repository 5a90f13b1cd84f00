"""Plugin contracts and loading.

settings.toml names each implementation as ``"module:attr"``. A role plugin is a factory
(usually a class) called with a :class:`RoleContext`; the object it returns has
``async def run(self, *, task_status)`` which calls ``task_status.started()`` only once the
role can do its work, returns when intake has stopped (``ctx.stopping``) and in-flight work
is drained, and declares which shared adapters it needs in ``needs``. A factory may also
have ``check_settings(settings)``, which the runtime calls before connecting anything: it
raises :class:`PluginError`/:class:`ConfigError` for settings the role would fail on
(the executor checks its ``[handlers]`` there).

Event handlers follow the handler contract of :mod:`eventsched.core.domain.handler`
(public as ``eventsched.HandlerEvent`` etc.); this module loads and checks them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import trio

# The handler contract lives in eventsched.core.domain.handler (public as eventsched.*);
# re-exported here for the plugins and tests that load and check handlers.
from eventsched.core.domain.handler import Handler as Handler
from eventsched.core.domain.handler import HandlerContext as HandlerContext
from eventsched.core.domain.handler import HandlerEvent as HandlerEvent
from eventsched.core.domain.handler import HandlerFactory as HandlerFactory
from eventsched.core.domain.handler import PermanentError as PermanentError
from eventsched.core.domain.handler import handler_factory as handler_factory
from eventsched.core.domain.handler import is_handler_factory
from eventsched.core.runtime.errors import EventschedError, PluginError

if TYPE_CHECKING:
    from eventsched.core.jobqueue import ShardedQueue
    from eventsched.core.kafka import KafkaProducer
    from eventsched.core.runtime.health import Health
    from eventsched.core.runtime.settings import Settings
    from eventsched.core.store.pool import Database


@dataclass
class Resources:
    """Adapters the runtime opened for the roles of this process (None when no role needs one)."""

    db: Database | None = None
    queue: ShardedQueue | None = None
    kafka_producer: KafkaProducer | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def require_db(self) -> Database:
        if self.db is None:
            raise PluginError("resources", "db", "role did not declare 'postgres' in needs")
        return self.db

    def require_queue(self) -> ShardedQueue:
        if self.queue is None:
            raise PluginError("resources", "queue", "role did not declare 'redis' in needs")
        return self.queue

    def require_kafka_producer(self) -> KafkaProducer:
        if self.kafka_producer is None:
            raise PluginError(
                "resources", "kafka_producer", "role did not declare 'kafka_producer' in needs"
            )
        return self.kafka_producer


@dataclass(frozen=True)
class RoleContext:
    role: str
    settings: Settings
    resources: Resources
    health: Health
    # Set on the first SIGTERM/SIGINT: stop taking new work, finish what is in flight.
    stopping: trio.Event


@runtime_checkable
class RolePlugin(Protocol):
    # Subset of KNOWN_NEEDS: adapters the runtime opens (postgres, redis, kafka_producer)
    # and dependencies /readyz checks ("kafka" alone: checked, no shared producer).
    needs: ClassVar[frozenset[str]]

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...


RoleFactory = Callable[[RoleContext], RolePlugin]


KNOWN_NEEDS = frozenset({"postgres", "redis", "kafka", "kafka_producer"})


def import_target(key: str, target: str) -> Any:
    """Import ``module:attr``; raise PluginError naming the settings key on any failure."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(key, target, "expected 'module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PluginError(key, target, f"cannot import module {module_name!r}: {err}") from None
    except Exception as err:  # the module itself fails while importing
        raise PluginError(
            key, target, f"importing module {module_name!r} failed: {err!r}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(
                key, target, f"module {module_name!r} has no attribute {attr!r}"
            ) from None
    return obj


def load_role_factory(role: str, target: str) -> RoleFactory:
    """Load and check a role plugin factory: callable, with ``run`` and valid ``needs``."""
    key = f"plugins.{role}"
    factory = import_target(key, target)
    if not callable(factory):
        raise PluginError(key, target, "is not callable")
    run = getattr(factory, "run", None)
    if inspect.isclass(factory) and (run is None or not inspect.iscoroutinefunction(run)):
        raise PluginError(key, target, "class has no 'async def run(self, *, task_status)' method")
    needs = getattr(factory, "needs", None)
    if not isinstance(needs, frozenset) or not needs <= KNOWN_NEEDS:
        raise PluginError(key, target, f"'needs' must be a frozenset of {sorted(KNOWN_NEEDS)}")
    return factory  # type: ignore[no-any-return]  # checked structurally above


def check_handler(key: str, target: str) -> None:
    """Import a handler target and check its shape without calling anything: a handler
    (see :func:`load_handler`), or a handler factory taking one argument. Runs before any
    connection is made; a factory's own failure shows when the executor calls it."""
    handler = import_target(key, target)
    if not is_handler_factory(handler):
        _check_handler(key, target, handler)
        return
    if not callable(handler):
        raise PluginError(key, target, "is not callable")
    try:
        inspect.signature(handler).bind(None)
    except TypeError:
        raise PluginError(key, target, "handler factory must accept one HandlerContext") from None
    except ValueError:  # no signature to inspect (a builtin): the call will tell
        pass


def load_handler(key: str, target: str, context: HandlerContext | None = None) -> Handler:
    """Load an event handler: an ``async def handler(event)``, an object with such a
    ``__call__``, or the result of a :func:`handler_factory` called with ``context``."""
    handler = import_target(key, target)
    if is_handler_factory(handler):
        if context is None:
            raise PluginError(key, target, "is a handler factory; it needs a HandlerContext")
        try:
            handler = handler(context)
        except EventschedError:
            raise
        except Exception as err:
            raise PluginError(key, target, f"handler factory failed: {err!r}") from err
    _check_handler(key, target, handler)
    return handler  # type: ignore[no-any-return]  # checked structurally by _check_handler


def _check_handler(key: str, target: str, handler: object) -> None:
    if not callable(handler):
        raise PluginError(key, target, "is not callable")
    if not (
        inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(type(handler).__call__)
    ):
        raise PluginError(key, target, "must be an async function taking one HandlerEvent")
    try:
        inspect.signature(handler).bind(None)
    except TypeError:
        raise PluginError(key, target, "must accept exactly one argument (the event)") from None
