"""Command line: thin. Parses flags, loads settings, calls core.

Exit codes: 0 success, 1 a dependency or operation failed, 2 bad usage or bad settings
(one line on stderr naming the key, no traceback), 130 forced shutdown (second signal).

This module is the root group (:data:`cli`) and the console entry point (:func:`main`);
the commands are in the modules beside it: ``run`` (run, dev), ``admin`` (migrate,
topics, status, retention), ``events`` (send, events, dlq) and ``schedules``; what they
share (settings, errors and exit codes) is ``common``.
"""

from __future__ import annotations

import click

from eventsched.cli.admin import migrate, retention, status, topics
from eventsched.cli.common import State
from eventsched.cli.events import dlq, events, send
from eventsched.cli.run import dev, run
from eventsched.cli.schedules import schedules
from eventsched.core.runtime import bootstrap


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--settings",
    "settings_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="An extra settings file layered over config/settings.toml.",
)
@click.version_option(package_name="eventsched")
@click.pass_context
def cli(ctx: click.Context, settings_path: str | None) -> None:
    """eventsched: deferred events from Kafka, recorded in PostgreSQL, run on time from Redis."""
    ctx.obj = State(settings_path)


for command in (run, dev, migrate, topics, status, retention, send, events, dlq, schedules):
    cli.add_command(command)


def main() -> None:
    bootstrap.install()  # before any command opens a trio-asyncio loop
    cli(prog_name="eventsched")
