"""Which hosts and addresses a payload-chosen webhook URL may reach (SSRF guard).

Two gates, both passed before any connection is opened:

1. **Host**: the URL's host must be listed in ``executor.webhook.allowed_hosts``: a name
   (``hooks.example.com``), ``*.example.com`` (its subdomains), ``*`` (any host), or an
   address or network (``10.1.0.0/16``, ``::1``) containing the literal address in the URL.
2. **Addresses**: the host is resolved (``getaddrinfo``, which also turns odd IPv4 spellings
   such as ``2130706433`` or ``0x7f.1`` into addresses) and *every* address must be public,
   or inside a network listed explicitly. IPv4-mapped IPv6 (``::ffff:127.0.0.1``) is judged
   as the IPv4 address it maps; other IPv6 forms embedding IPv4 (IPv4-compatible, NAT64,
   6to4, Teredo) are not public.

:class:`GuardedBackend` is an httpcore network backend that applies both gates in
``connect_tcp`` and then connects to the addresses it checked (in the resolver's order),
never to the name, so a second DNS answer cannot swap in another address (no rebinding
gap). TLS is unaffected: httpcore still verifies the certificate against, and sends SNI for,
the URL's host name. It runs on the asyncio side (where handlers run).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import httpcore

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``resolver(host, port)`` -> address strings; raises OSError when the name does not resolve.
Resolver = Callable[[str, int], Awaitable[list[str]]]

HOST_NOT_ALLOWED: Final = "host not allowed by executor.webhook.allowed_hosts"
ADDRESS_NOT_ALLOWED: Final = (
    "host resolves to a non-public address not listed in executor.webhook.allowed_hosts"
)

# IPv6 ranges that embed or translate IPv4 addresses (or are documentation-only): the
# address a packet ends up at is not the one written, so none of them counts as public.
_EMBEDDING_V6: Final = tuple(
    ipaddress.IPv6Network(n)
    for n in ("::/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "2001:db8::/32")
)
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class AddressRefused(Exception):
    """The target is not allowed; raised before any connection is attempted."""


class UnresolvableHost(Exception):
    """The host name does not resolve (may pass: retried by the caller)."""


def canonical(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it reaches; others unchanged."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public(ip: IPAddress) -> bool:
    """Whether ``ip`` is a globally routable unicast address: not loopback, link-local,
    private, shared (100.64/10), multicast, unspecified, reserved, documentation, nor an
    IPv6 form that embeds an IPv4 address."""
    ip = canonical(ip)
    if (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or not ip.is_global
    ):
        return False
    return not (isinstance(ip, ipaddress.IPv6Address) and any(ip in n for n in _EMBEDDING_V6))


def _literal(host: str) -> IPAddress | None:
    try:
        return canonical(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


@dataclass(frozen=True)
class AllowList:
    """Parsed ``executor.webhook.allowed_hosts`` (see the module docstring)."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".example.com" for "*.example.com"
    networks: tuple[IPNetwork, ...] = ()
    any_host: bool = False

    def permits_host(self, host: str) -> bool:
        """Gate 1: is the URL's host (a name or an address literal) listed?"""
        if self.any_host:
            return True
        literal = _literal(host)
        if literal is not None:
            return self._listed(literal)
        name = host.lower().rstrip(".")
        return name in self.names or any(name.endswith(s) for s in self.suffixes)

    def permits_address(self, ip: IPAddress) -> bool:
        """Gate 2: is this resolved address public, or inside a listed network?"""
        ip = canonical(ip)
        return self._listed(ip) or is_public(ip)

    def _listed(self, ip: IPAddress) -> bool:
        return any(ip in network for network in self.networks)


def parse_allowed_hosts(entries: Iterable[str]) -> AllowList:
    """Parse the allow-list; raises ValueError naming the first bad entry."""
    names: set[str] = set()
    suffixes: list[str] = []
    networks: list[IPNetwork] = []
    any_host = False
    for raw in entries:
        entry = str(raw).strip().lower()
        if entry == "*":
            any_host = True
            continue
        try:
            networks.append(ipaddress.ip_network(entry))
            continue
        except ValueError as err:
            if ":" in entry or "/" in entry or re.fullmatch(r"[0-9.]+", entry):
                raise ValueError(f"{raw!r} is not an address or network: {err}") from None
        wildcard = entry.startswith("*.")
        name = entry[2:] if wildcard else entry
        name = name.rstrip(".")
        if not name.isascii() or not _NAME.fullmatch(name):
            raise ValueError(
                f"{raw!r} is not a host name, *.domain, * or an address/network"
                " (write internationalised names in their xn-- form)"
            )
        if wildcard:
            suffixes.append(f".{name}")
        else:
            names.add(name)
    return AllowList(frozenset(names), tuple(suffixes), tuple(networks), any_host)


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's ``getaddrinfo`` (in asyncio's executor thread): /etc/hosts, DNS, and
    the numeric forms ``inet_aton`` accepts."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


async def checked_addresses(
    allow: AllowList, host: str, port: int, resolver: Resolver = system_resolver
) -> list[IPAddress]:
    """Both gates: the addresses ``host`` may be reached at, in the resolver's order.

    Raises :class:`AddressRefused` if the host is not listed or any address it resolves to
    is not allowed (the text does not depend on the port or on what listens there), and
    :class:`UnresolvableHost` if it does not resolve.
    """
    if not allow.permits_host(host):
        raise AddressRefused(HOST_NOT_ALLOWED)
    try:
        answers = await resolver(host.strip("[]"), port)
    except (OSError, UnicodeError):
        raise UnresolvableHost("cannot resolve the host") from None
    addresses: list[IPAddress] = []
    for answer in answers:
        # A scoped IPv6 answer ("fe80::1%eth0") keeps its scope in ip_address(); judged alike.
        ip = canonical(ipaddress.ip_address(answer))
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise UnresolvableHost("cannot resolve the host")
    if not all(allow.permits_address(ip) for ip in addresses):
        raise AddressRefused(ADDRESS_NOT_ALLOWED)
    return addresses


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend: checks the target (:func:`checked_addresses`), then
    connects to the checked addresses only, trying each in turn; unix sockets are refused.
    ``inner`` does the connecting (default: httpcore's anyio backend, which httpx uses on
    asyncio)."""

    def __init__(
        self,
        allow: AllowList,
        *,
        resolver: Resolver = system_resolver,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._allow = allow
        self._resolver = resolver
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await checked_addresses(self._allow, host, port, self._resolver)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                failure = err
        assert failure is not None  # checked_addresses never returns an empty list
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
