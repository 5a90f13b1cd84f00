"""The web console's session cookie and CSRF tokens: signed values, no server-side state.

Pure functions plus one small class, no I/O. Logging in with an API token gives a cookie
that holds the token's *name*, an expiry and a random nonce, signed with HMAC-SHA256 under a
key derived from that token (never the token itself): the cookie proves its holder knew
the token, every api replica with the same tokens accepts it, and removing a token from
``api.tokens`` ends its sessions. With ``api.auth = "none"`` the key is random per process
(sessions end when the role restarts).

A form's CSRF token is an HMAC of the session's nonce under the same key, so it is valid
only with the cookie it was issued for; the login form (no session yet) carries a token
signed with the process key and a time, and the login is also refused when the browser says
it comes from another site (``Origin``, ``Sec-Fetch-Site``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Final

import msgspec

from eventsched.plugins.api.auth import Caller, Tokens

#: The cookie's name.
COOKIE: Final = "eventsched_console"
#: Seconds a session lasts.
SESSION_SECONDS: Final = 12 * 3600
#: Seconds a login form's token is accepted.
LOGIN_FORM_SECONDS: Final = 3600
_CONTEXT: Final = b"eventsched console session v1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    caller: Caller
    nonce: str
    expires: int


class Sessions:
    """Issue and check session cookies and CSRF tokens (see the module docstring)."""

    def __init__(self, tokens: Tokens | None) -> None:
        self._tokens = tokens
        self._process_key = secrets.token_bytes(32)

    def _key(self, name: str) -> tuple[bytes, Caller] | None:
        if self._tokens is None:
            return self._process_key, Caller("", read_only=False)
        found = self._tokens.by_name(name)
        if found is None:
            return None
        digest, caller = found
        return hmac.new(digest, _CONTEXT, hashlib.sha256).digest(), caller

    def login(self, token: str) -> tuple[Caller, str] | None:
        """The caller of ``token`` and its new cookie value, or None for a wrong token
        (with ``auth = "none"`` any token, even empty, logs in)."""
        if self._tokens is None:
            caller = Caller("", read_only=False)
        else:
            found = self._tokens.check(f"Bearer {token}") if token.strip() else None
            if found is None:
                return None
            caller = found
        payload = _b64(
            msgspec.json.encode([caller.name, int(time.time()) + SESSION_SECONDS, _nonce()])
        )
        keyed = self._key(caller.name)
        assert keyed is not None
        return caller, f"{payload}.{_sign(keyed[0], payload.encode())}"

    def check(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session of a cookie value, or None (absent, forged, expired, token gone)."""
        if not cookie or cookie.count(".") != 1:
            return None
        payload, mac = cookie.split(".")
        try:
            name, expires, nonce = msgspec.json.decode(_unb64(payload), type=tuple[str, int, str])
        except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        keyed = self._key(name)
        if keyed is None:
            return None
        key, caller = keyed
        if not hmac.compare_digest(_sign(key, payload.encode()), mac):
            return None
        if expires < (now if now is not None else time.time()):
            return None
        return Session(caller, nonce, expires)

    def csrf(self, session: Session) -> str:
        """The CSRF token of the forms of this session."""
        keyed = self._key(session.caller.name)
        assert keyed is not None
        return _sign(keyed[0], b"csrf:" + session.nonce.encode())

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(session), token or "")

    def login_form_token(self, now: float | None = None) -> str:
        stamp = str(int(now if now is not None else time.time()))
        return f"{stamp}.{_sign(self._process_key, b'login:' + stamp.encode())}"

    def login_form_ok(self, token: str | None, now: float | None = None) -> bool:
        stamp, _, mac = (token or "").partition(".")
        if not stamp.isdigit() or not mac:
            return False
        good = _sign(self._process_key, b"login:" + stamp.encode())
        age = (now if now is not None else time.time()) - int(stamp)
        return hmac.compare_digest(good, mac) and 0 <= age <= LOGIN_FORM_SECONDS


def _sign(key: bytes, message: bytes) -> str:
    return _b64(hmac.new(key, message, hashlib.sha256).digest())


def _nonce() -> str:
    return secrets.token_urlsafe(16)


def same_origin(origin: str | None, fetch_site: str | None, host: str | None) -> bool:
    """False when the browser says a POST comes from another site: ``Sec-Fetch-Site``
    other than same-origin/none, or an ``Origin`` whose host is not the request's
    ``Host``. Without either header (an old browser, a script) it is up to the CSRF token."""
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    if origin is None or origin == "null":
        return origin is None
    _, _, rest = origin.partition("://")
    return bool(host) and rest == host
