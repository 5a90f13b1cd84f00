"""Specification of the webhook address guard (pure logic: no test here connects anywhere).

Which hosts and addresses a payload-chosen webhook URL may reach, how odd address forms are
normalised, and that the connection goes to the address that was checked. Resolvers are
substituted where a name would need DNS; numeric forms and ``localhost`` go through the
system's ``getaddrinfo``, which answers them without any network traffic.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import httpcore
import pytest
import trio_asyncio

from eventsched.core.runtime.netguard import (
    AddressRefused,
    GuardedBackend,
    UnresolvableHost,
    checked_addresses,
    is_public,
    parse_allowed_hosts,
    system_resolver,
)

REFUSED = [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "10.0.0.1", "172.16.0.1", "172.31.255.255",
    "192.168.1.1", "169.254.169.254", "100.64.0.1", "224.0.0.1", "224.0.1.1",
    "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.2.1", "198.18.0.1",
    "::1", "::", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
    "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "ff0e::1",
    "::7f00:1",         # IPv4-compatible (deprecated) form of 127.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "2002:7f00:1::1",   # 6to4 of 127.0.0.1
    "2001::1",          # Teredo
    "2001:db8::1",      # documentation
]  # fmt: skip
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_public(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("entries", "host", "expected"),
    [
        (["hooks.example.com"], "hooks.example.com", True),
        (["hooks.example.com"], "HOOKS.Example.com.", True),
        (["hooks.example.com"], "evil.example.com", False),
        (["hooks.example.com"], "127.0.0.1", False),
        (["*.example.org"], "a.b.example.org", True),
        (["*.example.org"], "example.org", False),
        (["*.example.org"], "badexample.org", False),
        (["127.0.0.1"], "127.0.0.1", True),
        (["127.0.0.0/8"], "127.0.0.2", True),
        (["127.0.0.0/8"], "::ffff:127.0.0.2", True),
        (["127.0.0.1"], "2130706433", False),  # not an address literal: a name, not listed
        (["127.0.0.1"], "localhost", False),
        (["*"], "anything.example", True),
        (["*"], "10.0.0.1", True),  # the host gate only; the address gate still applies
    ],
)
def test_the_host_must_be_listed(entries: list[str], host: str, expected: bool) -> None:
    assert parse_allowed_hosts(entries).permits_host(host) is expected


@pytest.mark.parametrize(
    ("entries", "address", "expected"),
    [
        (["hooks.example.com"], "8.8.8.8", True),
        (["hooks.example.com"], "127.0.0.1", False),
        (["hooks.example.com"], "169.254.169.254", False),
        (["hooks.example.com", "127.0.0.0/8"], "127.0.0.1", True),
        (["hooks.example.com", "127.0.0.0/8"], "::ffff:127.0.0.1", True),
        (["hooks.example.com", "127.0.0.0/8"], "10.0.0.1", False),
        (["10.1.0.0/16"], "10.1.2.3", True),
        (["10.1.0.0/16"], "10.2.0.1", False),
        (["::1"], "::1", True),
        (["*"], "127.0.0.1", False),
    ],
)
def test_a_non_public_address_must_be_listed_explicitly(
    entries: list[str], address: str, expected: bool
) -> None:
    allow = parse_allowed_hosts(entries)
    assert allow.permits_address(ipaddress.ip_address(address)) is expected


@pytest.mark.parametrize(
    "entry", ["", " ", "http://x", "10.0.0.0/33", "10.0.0.1/8", "a b", "*.", "x/y", "bücher.de"]
)
def test_bad_allow_list_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_allowed_hosts([entry])


# -- resolution ------------------------------------------------------------------------------


def resolver_of(answers: dict[str, list[str]], calls: list[str] | None = None) -> Any:
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in answers:
            raise OSError(f"unknown host {host}")
        return answers[host]

    return resolve


ANY = parse_allowed_hosts(["*"])


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f.1", "127.1", "017700000001", "::ffff:127.0.0.1", "localhost"]
)
async def test_odd_loopback_forms_resolve_to_loopback_and_are_refused(host: str) -> None:
    # The system resolver normalises them (inet_aton forms, IPv4-mapped IPv6, /etc/hosts);
    # it runs on the asyncio side, like the handlers.
    async with trio_asyncio.open_loop():
        assert {str(a) for a in await trio_asyncio.aio_as_trio(system_resolver)(host, 80)} <= {
            "127.0.0.1",
            "::ffff:127.0.0.1",
            "::1",
        }
        with pytest.raises(AddressRefused):
            await trio_asyncio.aio_as_trio(checked_addresses)(ANY, host, 80, system_resolver)


@pytest.mark.parametrize(
    ("host", "answer"),
    [
        ("metadata.google.internal", ["169.254.169.254"]),
        ("internal.example", ["10.0.0.1"]),
        ("rebind.example", ["93.184.216.34", "127.0.0.1"]),  # every address is checked
        ("mapped.example", ["::ffff:192.168.0.1"]),
    ],
)
async def test_names_resolving_to_non_public_addresses_are_refused(
    host: str, answer: list[str]
) -> None:
    with pytest.raises(AddressRefused):
        await checked_addresses(ANY, host, 80, resolver_of({host: answer}))


async def test_an_unlisted_host_is_refused_before_resolving() -> None:
    calls: list[str] = []
    allow = parse_allowed_hosts(["hooks.example.com"])
    with pytest.raises(AddressRefused):
        await checked_addresses(allow, "other.example", 80, resolver_of({}, calls))
    assert calls == []


async def test_an_unresolvable_name_is_its_own_error() -> None:
    with pytest.raises(UnresolvableHost):
        await checked_addresses(ANY, "nowhere.example", 80, resolver_of({}))


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records connection attempts instead of connecting; fails the ones listed."""

    def __init__(self, failing: set[str] | None = None) -> None:
        self.attempts: list[tuple[str, int]] = []
        self.failing = failing or set()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's interface
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        self.attempts.append((host, port))
        if host in self.failing:
            raise httpcore.ConnectError("refused")
        return httpcore.AsyncMockStream([])

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's interface
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AssertionError("not used")

    async def sleep(self, seconds: float) -> None:
        pass


async def test_the_connection_goes_to_the_checked_address_not_a_second_lookup() -> None:
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])  # a rebinding resolver

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    inner = RecordingBackend()
    backend = GuardedBackend(ANY, resolver=rebinding, inner=inner)
    await backend.connect_tcp("hooks.example.com", 443)
    assert inner.attempts == [("93.184.216.34", 443)]
    with pytest.raises(AddressRefused):
        await backend.connect_tcp("hooks.example.com", 443)
    assert inner.attempts == [("93.184.216.34", 443)]  # nothing for the refused answer


async def test_every_checked_address_is_tried_in_order() -> None:
    inner = RecordingBackend(failing={"93.184.216.34"})
    resolve = resolver_of({"hooks.example.com": ["93.184.216.34", "::ffff:1.1.1.1"]})
    backend = GuardedBackend(ANY, resolver=resolve, inner=inner)
    await backend.connect_tcp("hooks.example.com", 80)
    assert inner.attempts == [("93.184.216.34", 80), ("1.1.1.1", 80)]


async def test_unix_sockets_are_refused() -> None:
    backend = GuardedBackend(ANY, resolver=resolver_of({}), inner=RecordingBackend())
    with pytest.raises(AddressRefused):
        await backend.connect_unix_socket("/run/docker.sock")
