"""Importing eventsched has no side effects: asyncio stays as it was until an entry point
runs the trio-asyncio bootstrap (eventsched.core.runtime.bootstrap)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_eventsched_leaves_asyncio_untouched() -> None:
    out = _python(
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
    assert out == "True True False False False True"


def test_the_bootstrap_patches_asyncio_and_rebinds_earlier_imports() -> None:
    out = _python(
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
    assert out == "True True True"


def test_plain_asyncio_still_runs_after_the_bootstrap() -> None:
    out = _python(
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
    assert out == "True"


def test_asyncio_timeouts_work_inside_trio_asyncio_when_the_bootstrap_came_first() -> None:
    # Nothing imported asyncio before the bootstrap (the CLI's case): asyncio.timeout(), as
    # redis-py's commands use it, must still find its task inside trio-asyncio.
    out = _python(
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
    assert out == "ok"


def test_the_client_loads_no_server_library_and_no_trio_asyncio() -> None:
    # An application that only sends events must not load what the roles run on; making a
    # client may load trio (eventsched.core.kafka), never these.
    out = _python(
        """
        import sys
        forbidden = ("trio_asyncio", "saq", "psycopg", "psycopg_pool", "redis")
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
    assert out == "[] [] True"
