"""The trio-asyncio bootstrap of an eventsched process: call :func:`install` once, early.

The runtime runs asyncio libraries (psycopg's async pool, redis.asyncio, SAQ, httpx on
anyio) inside trio through trio-asyncio, which patches :mod:`asyncio` when it is imported.
A module that bound the unpatched C ``get_running_loop`` before that (psycopg's waiting
module does ``from asyncio import get_running_loop``) fails with "no running event loop"
inside trio-asyncio, so :func:`install` also rebinds that name in every module already
imported, whatever the import order was. It then installs the batched loop step of
:mod:`eventsched.core.runtime.aioloop`.

Importing ``eventsched`` does none of this (a library import must not patch asyncio for
the whole process): the entry points call :func:`install` - the CLI (``eventsched`` and
``python -m eventsched``) before it runs a command, and the test suite's ``conftest``.
Code that embeds the runtime in its own process calls it before opening a trio-asyncio
loop. Idempotent.
"""

from __future__ import annotations

import sys

_installed = False


def install() -> None:
    """Patch asyncio for trio-asyncio and install the batched loop step (idempotent)."""
    global _installed
    if _installed:
        return
    # The order matters: asyncio first, then trio_asyncio (whose import patches it), then the
    # C module. Importing _asyncio before asyncio leaves asyncio.timeout() without a current
    # task inside trio-asyncio ("Timeout should be used inside a task": redis-py's commands).
    import asyncio  # isort: skip

    import trio_asyncio  # noqa: F401  # isort: skip

    import _asyncio  # isort: skip

    unpatched = _asyncio.get_running_loop
    for module in list(sys.modules.values()):
        if getattr(module, "get_running_loop", None) is unpatched and module is not _asyncio:
            setattr(module, "get_running_loop", asyncio.get_running_loop)  # noqa: B010 - any module

    from eventsched.core.runtime import aioloop

    aioloop.install()
    _installed = True
