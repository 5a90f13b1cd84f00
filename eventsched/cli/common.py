"""What every command of the CLI shares: the settings (loaded once, on first use), the
decorators that turn our errors into one line and the documented exit code, and the
group class whose usage errors are one line too."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from eventsched.core.domain.retention import policy_from_settings
from eventsched.core.domain.schedulefields import specs_from_settings
from eventsched.core.runtime.errors import (
    ConfigError,
    DependencyError,
    DevStackError,
    EventschedError,
    MigrationError,
    PluginError,
)
from eventsched.core.runtime.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])

#: The ``--json`` flag of the commands that can print JSON instead of text.
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def fail(code: int, message: str) -> NoReturn:
    click.echo(f"eventsched: {message}", err=True)
    sys.exit(code)


def dev_stack_hint(state: Any) -> None:
    """After a command found no server: if a dev stack runs from this directory (its data
    dir, ``dev.data_dir``) on other addresses than the command's settings, say which env
    file to source (on stderr)."""
    if not isinstance(state, State) or state._settings is None:
        return
    from eventsched.core.operations.devstack import env_file_hint

    s = state.settings
    hint = env_file_hint(
        Path(s.dev.data_dir),
        {
            "EVENTSCHED_POSTGRES__DSN": s.postgres.dsn,
            "EVENTSCHED_REDIS__URL": s.redis.url,
            "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
        },
    )
    if hint:
        click.echo(f"eventsched: hint: {hint}", err=True)


def handle_errors(fn: F) -> F:
    """Turn our errors into one clear line and the documented exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, PluginError) as err:
            fail(2, f"error: {err}")
        except DependencyError as err:
            click.echo(f"eventsched: error: {err}", err=True)
            dev_stack_hint(args[0] if args else None)
            sys.exit(1)
        except (MigrationError, DevStackError) as err:
            fail(1, f"error: {err}")
        except EventschedError as err:
            fail(1, f"error: {err}")

    return wrapper  # type: ignore[return-value]  # same signature as fn


def input_errors_exit_2(fn: F) -> F:
    """Bad option values of the operator commands: one line, exit 2 (like bad settings)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from eventsched.core.operations.send import InputError

        try:
            return fn(*args, **kwargs)
        except InputError as err:
            fail(2, f"error: {err}")

    return wrapper  # type: ignore[return-value]  # same signature as fn


def subcommand(group: click.Group, name: str) -> Callable[[F], F]:
    """A subcommand of ``group`` that an operator runs: it gets the settings (``state``),
    and our errors and bad option values become one line and exit 1 or 2."""

    def decorate(fn: F) -> F:
        return group.command(name)(pass_state(handle_errors(input_errors_exit_2(fn))))  # type: ignore[return-value]

    return decorate


class OneLineUsage(click.Group):
    """A group whose usage errors (an unknown option, a bad value) are one line, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            fail(2, f"error: {err.format_message()}")


class State:
    def __init__(self, settings_path: str | None) -> None:
        self.settings_path = settings_path
        self._settings: Settings | None = None
        #: False for `run` and `dev`, which configure logging for their processes themselves.
        self.command_logging = True

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.settings_path)
            specs_from_settings(self._settings)  # [schedules.<name>]: the domain's checks
            policy_from_settings(self._settings.retention)  # [retention]: likewise
            if self.command_logging:
                # Operator commands print their results on stdout; their log lines (at
                # logging.level) go to stderr, so the two never mix.
                configure_logging(self._settings, stream=sys.stderr)
        return self._settings


pass_state = click.make_pass_decorator(State)


def configure_logging(settings: Settings, stream: Any = None, *, batched: bool = False) -> None:
    """``batched``: info lines written together (``logging.flush_interval``), for the roles."""
    from eventsched.core.runtime.logs import configure_logging

    configure_logging(
        settings.logging.level,
        settings.logging.format,
        stream=stream,
        flush_interval=settings.logging.flush_interval if batched else 0.0,
    )
