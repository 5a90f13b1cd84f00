"""Redaction: secrets out of any text before it reaches a log, a row, a header or a body.

Passwords and user info in URLs, query values, fragments, token-like path segments and
``password=`` conninfo values become ``***``. Pure string functions, safe on any side
(trio, asyncio or a worker thread); every error text that may quote a DSN or a webhook URL
goes through :func:`redact`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

# A URL: scheme, then everything up to whitespace or a quote/bracket that ends it in text.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*")
_PASSWORD = re.compile(r"(password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\S+)", re.I)
#: Path segments this long made of token characters are taken for secrets (API tokens,
#: signed webhook paths such as Slack's) whatever the settings say.
DEFAULT_SECRET_PATH: Final = re.compile(r"[A-Za-z0-9._~+=-]{20,}")


def compile_secret_paths(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    """The default secret-path pattern plus ``executor.webhook.secret_path_patterns``."""
    return (DEFAULT_SECRET_PATH, *(re.compile(p) for p in patterns))


_DEFAULT_PATHS: Final = (DEFAULT_SECRET_PATH,)


def redact_url(url: str, secret_paths: Sequence[re.Pattern[str]] = _DEFAULT_PATHS) -> str:
    """``url`` without its secrets: the password (and in http(s) URLs a user info without
    a colon, which is a token), every query value, the fragment, and path segments matching ``secret_paths`` in
    full. Parsed defensively: the user info runs to the *last* "@" before the query, so an
    unencoded "@" or "/" in a password does not leave a piece of it behind."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, hash_, _fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        # A user name alone is an account name in a database URL, but a token in an
        # http(s) URL (https://<token>@host/); a user name with "/" is a broken parse.
        keep = "/" not in user and (colon or not scheme.lower().startswith("http"))
        shown = f"{user}{':***' if colon else ''}@" if keep else "***@"
    else:
        shown = ""
    authority, slash, path = rest.partition("/")
    if path:
        path = "/".join(
            "***" if any(p.fullmatch(segment) for p in secret_paths) else segment
            for segment in path.split("/")
        )
    out = f"{scheme}://{shown}{authority}{slash}{path}"
    if question:
        pairs = (
            f"{k}=***" if eq else "***" for k, eq, _ in (p.partition("=") for p in query.split("&"))
        )
        out += "?" + "&".join(pairs) if query else "?"
    if hash_:
        out += "#***"
    return out


def _redact_match(found: str, secret_paths: Sequence[re.Pattern[str]]) -> str:
    # Punctuation after a URL in prose ("POST <url>: HTTP 503") is not part of it.
    url = found.rstrip(":,.;)")
    return redact_url(url, secret_paths) + found[len(url) :]


def redact(text: str, secret_paths: Sequence[re.Pattern[str]] = _DEFAULT_PATHS) -> str:
    """Remove secrets from ``text`` before it reaches a log, a row, a header or a body:
    every URL in it goes through :func:`redact_url`, ``password=...`` (conninfo) values
    become ``***``."""
    if "://" in text:
        text = _URL.sub(lambda m: _redact_match(m.group(0), secret_paths), text)
    if "assword" in text or "ASSWORD" in text:
        text = _PASSWORD.sub(lambda m: f"{m.group(1)}***", text)
    return text
