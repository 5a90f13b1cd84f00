"""Importing eventsched has no side effects: asyncio stays as it was until an entry point
runs the trio-asyncio bootstrap (eventsched.core.runtime.bootstrap)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

# Each claim needs a fresh interpreter. Every script is registered when this module is
# imported, and the module's fixture starts them all at once: they run side by side while the
# tests read their answers one by one.
_SCRIPTS: list[str] = []
Interpreters = dict[str, "subprocess.Popen[str]"]


def _script(code: str) -> str:
    _SCRIPTS.append(textwrap.dedent(code))
    return _SCRIPTS[-1]


@pytest.fixture(scope="module")
def interpreters() -> Iterator[Interpreters]:
    running = {
        code: subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for code in _SCRIPTS
    }
    try:
        yield running
    finally:
        for proc in running.values():
            proc.kill()
            proc.communicate()


def _output(interpreters: Interpreters, code: str) -> str:
    out, err = interpreters[code].communicate(timeout=60)
    assert interpreters[code].returncode == 0, err
    return out.strip()


UNTOUCHED = _script(
    """
    import asyncio, _asyncio, sys
    loop_fn = asyncio.get_running_loop
    policy = asyncio.get_event_loop_policy()
    import eventsched
    print(asyncio.get_running_loop is loop_fn is _asyncio.get_running_loop,
          asyncio.get_event_loop_policy() is policy,
          "trio_asyncio" in sys.modules,
          "saq" in sys.modules, "psycopg" in sys.modules,
          bool(eventsched.__version__))
    """
)


def test_import_eventsched_leaves_asyncio_untouched(interpreters: Interpreters) -> None:
    assert _output(interpreters, UNTOUCHED) == "True True False False False True"


REBINDS = _script(
    """
    import asyncio, _asyncio
    from asyncio import get_running_loop as bound_early
    import types, sys
    early = types.ModuleType("early")
    early.get_running_loop = bound_early
    sys.modules["early"] = early
    from eventsched.core.runtime import aioloop
    from eventsched.core.runtime import bootstrap
    bootstrap.install()
    bootstrap.install()
    print(asyncio.get_running_loop is not _asyncio.get_running_loop,
          early.get_running_loop is asyncio.get_running_loop,
          aioloop.installed())
    """
)


def test_the_bootstrap_patches_asyncio_and_rebinds_earlier_imports(
    interpreters: Interpreters,
) -> None:
    assert _output(interpreters, REBINDS) == "True True True"


PLAIN_ASYNCIO = _script(
    """
    import asyncio
    from eventsched.core.runtime import bootstrap
    bootstrap.install()
    async def main():
        await asyncio.sleep(0)
        return asyncio.get_running_loop() is not None
    print(asyncio.run(main()))
    """
)


def test_plain_asyncio_still_runs_after_the_bootstrap(interpreters: Interpreters) -> None:
    assert _output(interpreters, PLAIN_ASYNCIO) == "True"


# Nothing imported asyncio before the bootstrap (the CLI's case): asyncio.timeout(), as
# redis-py's commands use it, must still find its task inside trio-asyncio.
TIMEOUTS = _script(
    """
    import sys
    from eventsched.core.runtime import bootstrap
    assert "asyncio" not in sys.modules
    bootstrap.install()
    import asyncio, trio, trio_asyncio

    async def timed():
        async with asyncio.timeout(5):
            await asyncio.sleep(0)
        return "ok"

    async def main():
        async with trio_asyncio.open_loop():
            return await trio_asyncio.aio_as_trio(timed)()

    print(trio.run(main))
    """
)


def test_asyncio_timeouts_work_inside_trio_asyncio_when_the_bootstrap_came_first(
    interpreters: Interpreters,
) -> None:
    assert _output(interpreters, TIMEOUTS) == "ok"


# An application that only sends events must not load what the roles run on; making a
# client may load trio (eventsched.core.kafka), never these. Nor OpenTelemetry: tracing is
# off unless configured, and then costs nothing (core.runtime.tracing).
CLIENT = _script(
    """
    import sys
    forbidden = ("trio_asyncio", "saq", "psycopg", "psycopg_pool", "redis", "opentelemetry")
    import eventsched.client
    from eventsched import AsyncClient, Client, ClientError, DeliveryError
    # asyncio too: the trio-asyncio bootstrap must be able to patch it afterwards.
    after_import = [m for m in (*forbidden, "asyncio") if m in sys.modules]
    Client("127.0.0.1:9", timeout=1).close(0)
    AsyncClient("127.0.0.1:9", timeout=1)
    after_use = [m for m in forbidden if m in sys.modules]
    print(after_import, after_use, "trio" in sys.modules)
    """
)


def test_the_client_loads_no_server_library_and_no_trio_asyncio(interpreters: Interpreters) -> None:
    assert _output(interpreters, CLIENT) == "[] [] True"


# A role's process imports only what it runs on: the consumer, after the bootstrap, the CLI
# and the composition root, loads neither the client (and through it httpx, rich's
# pretty-printer for httpx's command line) nor httpx itself (RSS counts every module).
CONSUMER_ROLE = _script(
    """
    import sys
    from eventsched.core.runtime import bootstrap
    bootstrap.install()
    import eventsched.cli
    import eventsched.core.runtime.root
    import eventsched.plugins.consumer
    print([m for m in ("eventsched.client", "httpx") if m in sys.modules])
    from eventsched import Client
    print(Client.__module__)
    """
)


def test_the_consumer_role_loads_neither_the_client_nor_httpx(interpreters: Interpreters) -> None:
    assert _output(interpreters, CONSUMER_ROLE) == "[]\neventsched.client.blocking"
