"""The project's small error hierarchy.

Library errors are translated at the adapter boundary (``raise ... from err``) so that
callers only ever handle these types. Each class builds its own message from context.
:func:`describe` is the one way an error becomes a line of text. Imports nothing of the
package (every module may import this one).
"""

from __future__ import annotations


class EventschedError(Exception):
    """Base class of every error eventsched raises on purpose."""


class ConfigError(EventschedError):
    """A setting is missing or invalid; start-up stops with exit code 2."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"invalid setting {key}: {problem}")


class PluginError(EventschedError):
    """A plugin named in settings cannot be imported or has the wrong interface."""

    def __init__(self, key: str, target: str, problem: str) -> None:
        self.key = key
        self.target = target
        self.problem = problem
        super().__init__(f"invalid plugin {key} = {target!r}: {problem}")


class DependencyError(EventschedError):
    """An external dependency (postgres, redis, kafka) failed or is unreachable."""

    def __init__(self, dependency: str, problem: str) -> None:
        self.dependency = dependency
        self.problem = problem
        super().__init__(f"{dependency} unavailable: {problem}")


class UntestedVersion(EventschedError):
    """An installed library whose internals eventsched relies on is not a version it was
    tested with; start-up stops (exit code 1) instead of running on unchecked code."""

    def __init__(self, library: str, installed: str, tested: str) -> None:
        self.library = library
        super().__init__(
            f"{library} {installed} is not a version eventsched was tested with"
            f" ({tested}): install {library}{tested}"
        )


class MigrationError(EventschedError):
    """A schema migration failed or the schema is in a dirty state."""


class DevStackError(EventschedError):
    """An embedded server of the Docker-free dev stack failed to start."""


class DecodeError(EventschedError):
    """A Kafka message is not a valid event; ``reason`` is a short stable code for the DLQ."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def describe(err: BaseException) -> str:
    """One line for an error, as logged, stored or shown: ``Type: message``, or ``Type``
    alone when the message is empty; a group of one exception is described by that
    exception.

    The text is not redacted here (this module imports nothing of the package, and
    ``settings`` imports it): log lines are redacted as a whole by the log configuration;
    a caller that stores or publishes the text passes it through
    :func:`eventsched.core.runtime.redaction.redact`."""
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
