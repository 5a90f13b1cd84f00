"""Bearer tokens of the HTTP API: the start-up checks of ``[api]`` and the per-request check.

Pure functions plus one small class; they run on the trio side (token files are read once,
at start-up, before anything is connected). A token never appears in a log line, an error,
a response or a metric: a settings error names the token by its ``name``, and the request
check compares SHA-256 digests with :func:`hmac.compare_digest` against every configured
token (no early exit), so neither the answer nor its timing tells how much of a guess was
right.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.sections import ApiSettings, ApiToken

#: Shorter tokens are refused at start-up: they can be guessed.
MIN_TOKEN_LENGTH: Final = 16


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request: the token's name ("" without auth) and what it may do."""

    name: str
    read_only: bool


ANONYMOUS: Final = Caller("", read_only=False)


class Tokens:
    """The configured tokens, as digests; :meth:`check` finds the caller of a request."""

    def __init__(self, tokens: dict[str, tuple[str, bool]]) -> None:
        # digest -> (name, read_only)
        self._by_digest = [(_digest(token), name, ro) for token, (name, ro) in tokens.items()]
        self._by_name = {name: (digest, Caller(name, ro)) for digest, name, ro in self._by_digest}

    def by_name(self, name: str) -> tuple[bytes, Caller] | None:
        """The digest of a token and its caller, by the token's name (the web console's
        session keys are derived from the digest: :mod:`.session`)."""
        return self._by_name.get(name)

    def check(self, authorization: str | None) -> Caller | None:
        """The caller of an ``Authorization: Bearer <token>`` header, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = _digest(token.strip())
        found: Caller | None = None
        for known, name, read_only in self._by_digest:  # all of them: constant time
            if hmac.compare_digest(known, digest):
                found = Caller(name, read_only)
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_api_settings(api: ApiSettings) -> None:
    """Raise ConfigError naming the key for an ``[api]`` the role must not start with."""
    if api.auth == "none":
        if not is_loopback(api.host):
            raise ConfigError(
                "api.auth",
                f'"none" is allowed only with a loopback api.host, not {api.host!r}:'
                " configure api.tokens instead",
            )
        return
    if not api.tokens:
        raise ConfigError(
            "api.tokens",
            'required with api.auth = "token": add {name, token | token_file} entries'
            ' (or api.auth = "none" on a loopback host)',
        )
    load_tokens(api.tokens)


def load_tokens(entries: tuple[ApiToken, ...]) -> Tokens:
    """Read every token (files included) and check them; ConfigError names the entry."""
    tokens: dict[str, tuple[str, bool]] = {}
    names: set[str] = set()
    for index, entry in enumerate(entries):
        key = f"api.tokens[{index}]"
        if not entry.name.strip():
            raise ConfigError(f"{key}.name", "must not be empty")
        if entry.name in names:
            raise ConfigError(f"{key}.name", f"{entry.name!r} is used twice")
        names.add(entry.name)
        token = _token_of(entry, key)
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                key, f"token of {entry.name!r} is shorter than {MIN_TOKEN_LENGTH} characters"
            )
        if any(c.isspace() for c in token) or not token.isprintable():
            raise ConfigError(key, f"token of {entry.name!r} contains spaces or control characters")
        if token in tokens:
            raise ConfigError(key, f"token of {entry.name!r} is also {tokens[token][0]!r}'s")
        tokens[token] = (entry.name, entry.read_only)
    return Tokens(tokens)


def _token_of(entry: ApiToken, key: str) -> str:
    if bool(entry.token) == bool(entry.token_file):
        raise ConfigError(key, f"{entry.name!r} needs exactly one of token and token_file")
    if entry.token:
        return entry.token
    try:
        text = Path(entry.token_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise ConfigError(
            f"{key}.token_file", f"cannot read {entry.token_file}: {reason}"
        ) from None
    token = text.strip()
    if not token:
        raise ConfigError(f"{key}.token_file", f"{entry.token_file} is empty")
    return token
