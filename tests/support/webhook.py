"""Webhook test harness: an HTTP receiver and a non-HTTP port on threads, a handler caller.

The receivers listen on loopback in the test process (no server of the stack); the fixtures
``receiver``, ``not_http`` and ``closed_port`` reach the tiers through their conftest.
:func:`call_webhook` runs the built-in webhook handler on the asyncio side, as the executor
does.
"""

from __future__ import annotations

import functools
import json
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import outcome
import pytest
import trio_asyncio

from eventsched.core.runtime.contracts import (
    HandlerContext,
    HandlerEvent,
    PermanentError,
    load_handler,
)
from eventsched.core.runtime.settings import Settings, build_settings
from eventsched.plugins.handlers import WebhookError
from tests.support.proc import free_port

BUILTIN = "eventsched.plugins.handlers"


# -- a receiver -----------------------------------------------------------------------------------


class Receiver(ThreadingHTTPServer):
    """Answers POST /<status>[/...] with that status (a 3xx with ``Location: /200``; /slow
    sleeps 2 s); records every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append((self.path, dict(self.headers), json.loads(body)))
        if self.path == "/slow":
            time.sleep(2)
        first = self.path.split("?")[0].strip("/").split("/")[0]
        status = int(first) if first.isdigit() else 200
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "/200")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


# How often a receiver's and a non-HTTP port's thread looks at its stop flag: what shutting
# one down waits for at most, once per test that uses it.
POLL = 0.005


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, args=(POLL,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def loopback_webhook_executor(make_settings: Callable[..., Settings]) -> Settings:
    """Executor settings whose default handler is the built-in webhook, with payload URLs
    allowed to 127.0.0.1 only, two attempts with a short backoff, and no reconciler."""
    return make_settings(
        executor={
            "concurrency": 8,
            "max_retries": 2,
            "retry_backoff": {"base": "100ms", "jitter": 0.0},
            "webhook": {"allow_payload_url": True, "allowed_hosts": ["127.0.0.1"]},
        },
        handlers={"default": f"{BUILTIN}:webhook"},
        reconciler={"enabled": False},
    )


def settings_with(**sections: Any) -> Settings:
    return build_settings(sections, "test")


def event(type_: str = "order.placed", attempt: int = 1, **payload: Any) -> HandlerEvent:
    return HandlerEvent(
        id="01890a5d-ac96-774b-bcce-b302099a8057",
        type=type_,
        payload=payload,
        execute_at=datetime(2024, 5, 1, 10, 0, tzinfo=UTC),
        attempt=attempt,
    )


async def on_asyncio(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run an asyncio coroutine function the way the executor runs handlers; its exception
    comes out plain (not inside the loop nursery's group)."""
    async with trio_asyncio.open_loop():
        result = await outcome.acapture(trio_asyncio.aio_as_trio(fn), *args)
    return result.unwrap()


@functools.cache
def _tls() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's CAs), built once: loading the CA bundle is most
    of what making a client costs, and each call below makes one."""
    return httpx.create_ssl_context()


def context(settings: Settings, clients: list[httpx.AsyncClient] | None = None) -> HandlerContext:
    made = clients if clients is not None else []

    def client() -> httpx.AsyncClient:
        if not made:
            made.append(httpx.AsyncClient(verify=_tls()))
        return made[0]

    return HandlerContext(settings, "handlers.default", client)


async def call_webhook(settings: Settings, ev: HandlerEvent) -> None:
    clients: list[httpx.AsyncClient] = []
    handler = load_handler("handlers.default", f"{BUILTIN}:webhook", context(settings, clients))

    async def run() -> None:
        try:
            await handler(ev)
        finally:
            for client in clients:
                await client.aclose()

    await on_asyncio(run)


# -- payload-chosen URLs (guard) ----------------------------------------------------------------------


SECRET = "pw-s3cr3t"
TOKEN = "TOKENs3cr3tabcdefghijklmnop"  # a path part of 27 token characters
QSECRET = "q-s3cr3t"
SECRETS = (SECRET, TOKEN, QSECRET)


class NotHttp:
    """A loopback TCP port that accepts, writes a non-HTTP banner and closes; counts accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(POLL)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def not_http() -> Iterator[NotHttp]:
    server = NotHttp()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on."""
    return free_port()


def payload_settings(*allowed: str, **webhook: Any) -> Any:
    return settings_with(
        webhooks={"default": "http://127.0.0.1:9/never"},
        executor={
            "webhook": {"allow_payload_url": True, "allowed_hosts": list(allowed), **webhook}
        },
    )


async def failure(settings: Any, url: str) -> Exception:
    with pytest.raises((PermanentError, WebhookError)) as info:
        await call_webhook(settings, event(webhook_url=url))
    return info.value


def without_port(text: str, port: int) -> str:
    return text.replace(f":{port}", ":PORT")
