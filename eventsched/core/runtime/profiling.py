"""Continuous profiling with Pyroscope (``pyroscope-io``), enabled by ``pyroscope.enabled``.

The agent samples this process and pushes profiles to ``pyroscope.server`` under the
application name ``eventsched-<role>`` (what the Grafana dashboards link to). Profiling is
an aid, never a dependency: when the server does not answer at start-up the app logs one
warning and carries on (the agent keeps trying in the background and delivers once the
server is up).
"""

from __future__ import annotations

import importlib.util
import os
import socket

from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.settings import Settings

log = get_logger(__name__)


def application_name(roles: list[str]) -> str:
    return "eventsched-" + "+".join(roles) if len(roles) < 3 else "eventsched-all"


def start_profiling(settings: Settings, roles: list[str]) -> bool:
    """Start the agent if enabled; return whether it was started."""
    cfg = settings.pyroscope
    if not cfg.enabled:
        return False
    if importlib.util.find_spec("pyroscope") is None:
        raise ConfigError(
            "pyroscope.enabled",
            "needs the profiling extra: pip install 'eventsched[profiling]'",
        )
    import httpx  # only for the check below: a role that does not profile never loads it
    import pyroscope  # an optional dependency: only loaded when enabled

    server = cfg.server.rstrip("/")
    try:
        httpx.get(f"{server}/ready", timeout=2.0)
    except httpx.HTTPError as err:
        log.warning("pyroscope_unreachable", server=server, error=str(err))
    pyroscope.configure(
        application_name=application_name(roles),
        server_address=server,
        sample_rate=cfg.sample_rate,
        upload_interval=max(1, int(cfg.upload_interval)),
        oncpu=True,
        gil_only=False,
        enable_logging=False,
        tags={
            "role": "+".join(roles),
            "env": settings.env,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
        },
    )
    log.info("pyroscope_started", server=server, application=application_name(roles))
    return True


def stop_profiling() -> None:
    import pyroscope

    pyroscope.shutdown()
