"""The web console at ``/ui/``: server-rendered pages over the API's reads and writes.

Runs on the trio side, in the api role's Starlette app. Pages are Jinja2 templates
(``templates/``, autoescaped) with one stylesheet and htmx (``static/``, shipped in the
package: no CDN); htmx only refreshes the overview, every page and button works without
JavaScript. Writes go through the API's own paths (:meth:`Handlers.send_command`,
:meth:`ScheduleHandlers.set_paused`): the same checks, the same Kafka commands, the caller's
token name as ``requested_by``.

Security: a login form takes an API token and sets a signed session cookie
(:mod:`.session`; HttpOnly, SameSite=Strict, Secure when the request came over https, never
the token itself); every POST needs the session's CSRF token in its form and is refused
when the browser says it comes from another site; every answer carries a
Content-Security-Policy without inline scripts or styles. A read-only token sees the pages
without their buttons and gets 403 for a POST. Neither tokens nor cookies are logged.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eventsched.core.domain.commands import RETRYABLE, Op, refusal
from eventsched.core.domain.event import STATUSES, format_time
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.redaction import redact
from eventsched.core.runtime.units import parse_duration
from eventsched.core.store import events as eventstore
from eventsched.core.store import overview, queries
from eventsched.core.store import schedules as schedule_store
from eventsched.plugins.api.app import Handlers, _query_time
from eventsched.plugins.api.schedules import ScheduleHandlers
from eventsched.plugins.api.schemas import ApiError, FieldError, due_time, invalid
from eventsched.plugins.api.session import COOKIE, SESSION_SECONDS, Session, Sessions, same_origin
from eventsched.plugins.api.views import decode_cursor, encode_cursor

log = get_logger(__name__)

HERE: Final = Path(__file__).resolve().parent
TEMPLATES: Final = HERE / "templates"
STATIC: Final = HERE / "static"

#: Every console answer's policy: scripts and styles from this origin only (no inline
#: ones), no frames, forms post here only.
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
PAGE_SIZE: Final = 50
#: A form body larger than this is refused.
MAX_FORM_BYTES: Final = 16 * 1024
#: The default and the largest number of dead events one replay click retries.
REPLAY_DEFAULT: Final = 100
REPLAY_MAX: Final = 500
#: The forecast chart has at most this many bars (minutes are grouped beyond).
MAX_BARS: Final = 360
_NOTICES: Final = {
    "cancel": "cancel sent",
    "reschedule": "reschedule sent",
    "retry": "retry sent",
    "paused": "schedule paused",
    "resumed": "schedule resumed",
}

Page = Callable[[Request, Session], Awaitable[Response]]


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str


def bars(values: list[tuple[str, float]], width: float = 720, height: float = 120) -> list[Bar]:
    """An SVG bar chart's rectangles (no inline styles: the CSP forbids them)."""
    if not values:
        return []
    top = max(v for _, v in values) or 1.0
    step = width / len(values)
    out = []
    for i, (label, value) in enumerate(values):
        h = height * value / top
        out.append(Bar(round(i * step, 2), round(height - h, 2), max(step - 1, 0.5), round(h, 2),
                       label))  # fmt: skip
    return out


def forecast_bars(fc: overview.Forecast, now: datetime) -> tuple[list[Bar], int]:
    """The forecast's bars from now on, minutes grouped so there are at most
    :data:`MAX_BARS`; and the minutes per bar."""
    minutes = fc.hours * 60
    group = max(1, math.ceil(minutes / MAX_BARS))
    start = now.replace(second=0, microsecond=0)
    counts = [0] * math.ceil(minutes / group + 1)
    for minute, n in fc.minutes:
        index = int((minute - start).total_seconds() // 60) // group
        if 0 <= index < len(counts):
            counts[index] += n
    values = [
        (f"{format_time(start + timedelta(minutes=i * group))[11:16]}Z: {n}", float(n))
        for i, n in enumerate(counts)
    ]
    return bars(values), group


def hour_values(hour: overview.LastHour, now: datetime) -> list[tuple[str, float]]:
    """Attempts per minute for every minute of the last hour (none: 0), oldest first."""
    first = (now - timedelta(hours=1)).replace(second=0, microsecond=0)
    counts = {m.minute.astimezone(UTC): m.attempts for m in hour.minutes}
    values = []
    for i in range(61):
        minute = first + timedelta(minutes=i)
        n = counts.get(minute, 0)
        values.append((f"{format_time(minute)[11:16]}Z: {n}", float(n)))
    return values


def _time(value: datetime | None) -> str:
    return "-" if value is None else format_time(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["time"] = _time
    env.filters["ms"] = lambda v: "-" if v is None else f"{v:.1f} ms"
    return env


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a console path only (no open redirect)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"


class _SecuredStatic:
    """The static files with the console's security headers (and a day of caching)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                headers.append((b"cache-control", b"public, max-age=86400"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class Console:
    """The console's pages and actions; one per app, sharing the API's handlers."""

    def __init__(self, h: Handlers) -> None:
        self.h = h
        self.schedules = ScheduleHandlers(h)
        self.sessions = Sessions(h.config.tokens)
        self.env = _environment()

    # -- plumbing ------------------------------------------------------------------------

    def render(
        self,
        request: Request,
        template: str,
        session: Session | None,
        code: int = 200,
        **context: Any,
    ) -> Response:
        html = self.env.get_template(template).render(
            session=session,
            csrf=self.sessions.csrf(session) if session is not None else "",
            path=request.url.path,
            auth=self.h.config.tokens is not None,
            **context,
        )
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
        return HTMLResponse(html, code, headers)

    def error(
        self,
        request: Request,
        session: Session | None,
        code: int,
        message: str,
        details: list[str] | None = None,
    ) -> Response:
        return self.render(
            request, "error.html", session, code, status=code, message=message,
            details=details or [],
        )  # fmt: skip

    def session(self, request: Request) -> Session | None:
        return self.sessions.check(request.cookies.get(COOKIE))

    async def form(self, request: Request) -> dict[str, str]:
        """An urlencoded form body (first value of each field); 413 when too large."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise ApiError(413, "too_large", f"form larger than {MAX_FORM_BYTES} bytes")
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] for k, v in fields.items()}

    def page(self, fn: Page) -> Callable[[Request], Awaitable[Response]]:
        """A GET page: the session or a redirect to the login form; errors as a page."""

        @wraps(fn)
        async def endpoint(request: Request) -> Response:
            session = self.session(request)
            if session is None:
                query = urlencode({"next": request.url.path + _query(request)})
                return RedirectResponse(f"/ui/login?{query}", 303, SECURITY_HEADERS)
            return await self._answer(request, session, fn)

        return endpoint

    def action(
        self,
        fn: Callable[[Request, Session, dict[str, str]], Awaitable[Response]],
        *,
        write: bool = True,
    ) -> Callable[[Request], Awaitable[Response]]:
        """A POST: a session, a same-site request, the form's CSRF token and (``write``) a
        token that may write; then ``fn(request, session, form)``."""

        async def checked(request: Request, session: Session) -> Response:
            if not same_origin(
                request.headers.get("origin"),
                request.headers.get("sec-fetch-site"),
                request.headers.get("host"),
            ):
                raise ApiError(403, "forbidden", "a request from another site")
            form = await self.form(request)
            if not self.sessions.csrf_ok(session, form.get("csrf")):
                raise ApiError(403, "forbidden", "the form's CSRF token is missing or wrong")
            if write and session.caller.read_only:
                raise ApiError(403, "forbidden", f"token {session.caller.name!r} is read-only")
            return await fn(request, session, form)

        @wraps(fn)
        async def endpoint(request: Request) -> Response:
            session = self.session(request)
            if session is None:
                return self.error(request, None, 403, "log in first")
            return await self._answer(request, session, checked)

        return endpoint

    async def _answer(self, request: Request, session: Session, fn: Page) -> Response:
        try:
            return await fn(request, session)
        except ApiError as err:
            details = [f"{f.field}: {f.message}" for f in err.fields]
            return self.error(request, session, err.status, err.message, details)
        except Exception as err:  # a bug or an unexpected database error: 500, logged
            log.error("console_request_failed", path=request.url.path, error=redact(repr(err)))
            return self.error(request, session, 500, "internal error")

    # -- login ---------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if self.session(request) is not None:
            return RedirectResponse(_safe_next(request.query_params.get("next")), 303)
        return self.render(
            request, "login.html", None,
            form_token=self.sessions.login_form_token(),
            next=_safe_next(request.query_params.get("next")), failed=False,
        )  # fmt: skip

    async def login(self, request: Request) -> Response:
        try:
            form = await self.form(request)
        except ApiError as err:
            return self.error(request, None, err.status, err.message)
        origin_ok = same_origin(
            request.headers.get("origin"),
            request.headers.get("sec-fetch-site"),
            request.headers.get("host"),
        )
        if not origin_ok or not self.sessions.login_form_ok(form.get("csrf")):
            return self.error(
                request, None, 403,
                "the login form is stale or came from another site: load it again",
            )  # fmt: skip
        target = _safe_next(form.get("next"))
        logged_in = self.sessions.login(form.get("token", ""))
        if logged_in is None:
            log.info("console_login_refused")
            return self.render(
                request, "login.html", None, 401,
                form_token=self.sessions.login_form_token(), next=target, failed=True,
            )  # fmt: skip
        caller, cookie = logged_in
        log.info("console_login", token_name=caller.name)
        response = RedirectResponse(target, 303, SECURITY_HEADERS)
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=SESSION_SECONDS,
            path="/ui/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        response = RedirectResponse("/ui/login", 303, SECURITY_HEADERS)
        response.delete_cookie(COOKIE, path="/ui/", httponly=True, samesite="strict")
        return response

    # -- pages ---------------------------------------------------------------------------

    async def overview_page(self, request: Request, session: Session) -> Response:
        text = request.query_params.get("hours", "6")
        if not text.isdigit() or not 1 <= int(text) <= overview.MAX_FORECAST_HOURS:
            raise invalid(
                FieldError("hours", f"must be an integer from 1 to {overview.MAX_FORECAST_HOURS}")
            )
        hours = int(text)
        now = datetime.now(UTC)
        # Not queries.stats (GET /v1/stats): its exact counts scan the whole table, and
        # this page refreshes itself; these are eventsched status's (succeeded estimated on
        # a big table) and need no scan of the succeeded events.
        counts = await self.h._read(eventstore.status_counts)
        oldest = await self.h._read(eventstore.oldest_overdue)
        by_type = await self.h._read(overview.pending_by_type)
        hour = await self.h._read(overview.last_hour)
        fc = await self.h._read(overview.forecast, hours)
        dead, undeliverable = await self.h._read(overview.dead_by_reason)
        forecast_chart, group = forecast_bars(fc, now)
        busiest = sorted(fc.minutes, key=lambda m: (-m[1], m[0]))[:10]
        hour_chart = bars(hour_values(hour, now))
        return self.render(
            request, "overview.html", session,
            counts=counts, oldest=oldest, by_type=by_type, statuses=STATUSES, hour=hour, hour_chart=hour_chart, forecast=fc,
            forecast_chart=forecast_chart, group=group, busiest=busiest, hours=hours,
            dead=dead, dead_total=sum(dead.values()), undeliverable=undeliverable,
        )  # fmt: skip

    async def events_page(self, request: Request, session: Session) -> Response:
        params = request.query_params
        errors: list[FieldError] = []
        status = params.get("status") or None
        if status is not None and status not in STATUSES:
            errors.append(FieldError("status", f"must be one of {', '.join(STATUSES)}"))
        type_ = params.get("type") or None
        after_time = _query_time(params.get("due_after") or None, "due_after", errors)
        before_time = _query_time(params.get("due_before") or None, "due_before", errors)
        after = None
        if cursor := params.get("cursor"):
            try:
                after = decode_cursor(cursor)
            except ValueError as err:
                errors.append(FieldError("cursor", str(err)))
        rows: list[queries.EventSummary] = []
        next_url = None
        if not errors:
            rows = await self.h._read(
                queries.list_events, limit=PAGE_SIZE + 1, status=status, type_=type_,
                due_after=after_time, due_before=before_time, after=after,
            )  # fmt: skip
            if len(rows) > PAGE_SIZE:
                rows = rows[:PAGE_SIZE]
                kept = {k: v for k, v in params.items() if k != "cursor" and v}
                kept["cursor"] = encode_cursor(rows[-1].execute_at, rows[-1].id)
                next_url = "/ui/events?" + urlencode(kept)
        filters = {k: params.get(k, "") for k in ("status", "type", "due_after", "due_before")}
        first_url = "/ui/events?" + urlencode({k: v for k, v in filters.items() if v})
        return self.render(
            request, "events.html", session, 422 if errors else 200,
            rows=rows, filters=filters, statuses=STATUSES, errors=errors, next_url=next_url,
            paged=after is not None, first_url=first_url,
        )  # fmt: skip

    async def event_page(self, request: Request, session: Session) -> Response:
        event_id = self._event_id(request)
        row = await self.h._read(queries.event_with_attempts, event_id)
        if row is None:
            raise ApiError(404, "not_found", "no event with this id")
        possible = {op: refusal(op, row.status) is None for op in ("cancel", "reschedule", "retry")}
        command = request.query_params.get("command", "")
        return self.render(
            request, "event.html", session,
            row=row, possible=possible, notice=_NOTICES.get(request.query_params.get("sent", "")),
            command=command if _is_uuid(command) else None,
            applied=any(str(c.command_id) == command for c in row.history),
            payload=_pretty(row.payload),
        )  # fmt: skip

    async def dead_page(self, request: Request, session: Session) -> Response:
        reasons, undeliverable = await self.h._read(overview.dead_by_reason)
        reason = request.query_params.get("reason") or None
        rows = []
        if reason is not None:
            rows = await self.h._read(overview.dead_of_reason, reason, overview.MAX_DEAD_LISTED)
        replayed = request.query_params.get("replayed", "")
        refused = request.query_params.get("refused", "")
        return self.render(
            request, "dead.html", session,
            reasons=reasons, undeliverable=undeliverable, reason=reason, rows=rows,
            replayed=int(replayed) if replayed.isdigit() else None,
            refused=int(refused) if refused.isdigit() else 0,
            replay_default=REPLAY_DEFAULT, replay_max=REPLAY_MAX,
            retryable=RETRYABLE,
        )  # fmt: skip

    async def schedules_page(self, request: Request, session: Session) -> Response:
        rows = await self.h._read(schedule_store.list_schedules)
        return self.render(
            request, "schedules.html", session,
            rows=[schedule_store.row_json(r) for r in rows],
            notice=_NOTICES.get(request.query_params.get("sent", "")),
        )  # fmt: skip

    # -- actions -------------------------------------------------------------------------

    @staticmethod
    def _event_id(request: Request) -> uuid.UUID:
        try:
            return uuid.UUID(request.path_params["id"])
        except ValueError:
            raise ApiError(404, "not_found", "no event with this id") from None

    async def command(
        self, request: Request, session: Session, form: dict[str, str], op: Op
    ) -> Response:
        event_id = self._event_id(request)
        now = datetime.now(UTC)
        due = None
        if op != "cancel":
            due = _form_due(form, now, required=op == "reschedule")
        command = await self.h.send_command(session.caller, event_id, op, due, now=now)
        log.info("console_command", op=op, event_id=str(event_id), requested_by=session.caller.name)
        query = urlencode({"sent": op, "command": str(command.command_id)})
        return RedirectResponse(f"/ui/events/{event_id}?{query}", 303, SECURITY_HEADERS)

    async def cancel(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        return await self.command(request, session, form, "cancel")

    async def reschedule(
        self, request: Request, session: Session, form: dict[str, str]
    ) -> Response:
        return await self.command(request, session, form, "reschedule")

    async def retry(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        return await self.command(request, session, form, "retry")

    async def replay(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        """Retry the dead events of one reason, oldest death first, up to ``limit``: one
        retry command each, as the event page's button sends it."""
        reason = form.get("reason", "")
        text = form.get("limit", "") or str(REPLAY_DEFAULT)
        if not reason:
            raise invalid(FieldError("reason", "required"))
        if not text.isdigit() or not 1 <= int(text) <= REPLAY_MAX:
            raise invalid(FieldError("limit", f"must be an integer from 1 to {REPLAY_MAX}"))
        rows = await self.h._read(overview.dead_of_reason, reason, int(text))
        sent = refused = 0
        for row in rows:
            try:
                await self.h.send_command(session.caller, row.id, "retry", None)
            except ApiError as err:
                if err.status not in (404, 409):  # gone or not dead any more: skip it
                    raise ApiError(
                        err.status, err.error,
                        f"{err.message} ({sent} of {len(rows)} retries were sent before)",
                        headers=err.headers,
                    ) from None  # fmt: skip
                refused += 1
                continue
            sent += 1
        log.info("console_replay", reason=reason, sent=sent, refused=refused,
                 requested_by=session.caller.name)  # fmt: skip
        query = urlencode({"reason": reason, "replayed": sent, "refused": refused})
        return RedirectResponse(f"/ui/dead?{query}", 303, SECURITY_HEADERS)

    async def pause(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        await self.schedules.set_paused(session.caller, request.path_params["name"], True)
        return RedirectResponse("/ui/schedules?sent=paused", 303, SECURITY_HEADERS)

    async def resume(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        await self.schedules.set_paused(session.caller, request.path_params["name"], False)
        return RedirectResponse("/ui/schedules?sent=resumed", 303, SECURITY_HEADERS)


def _query(request: Request) -> str:
    query = request.url.query
    return f"?{query}" if query else ""


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _pretty(payload: Any) -> str:
    import json

    return json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=True)


def _form_due(form: dict[str, str], now: datetime, *, required: bool) -> datetime | None:
    """The due time of a form: ``at`` (RFC 3339 with an offset) or ``in`` (a duration:
    ``30s``, ``5m``, ``2h``); 422 as the API's ``execute_at``/``delay_ms``."""
    errors: list[FieldError] = []
    at = _query_time(form.get("at") or None, "at", errors)
    delay_ms = None
    if text := form.get("in"):
        try:
            delay_ms = round(float(parse_duration(text)) * 1000)
        except ValueError as err:
            errors.append(FieldError("in", str(err)))
    if errors:
        raise invalid(*errors)
    try:
        return due_time(at, delay_ms, now, required=required)
    except ApiError as err:  # name the form's fields, not the API body's
        names = {"execute_at": "at", "delay_ms": "in"}
        raise invalid(
            *(FieldError(names.get(f.field, f.field), f.message) for f in err.fields)
        ) from None


def console_routes(h: Handlers) -> list[BaseRoute]:
    c = Console(h)
    return [
        Route("/ui", lambda r: RedirectResponse("/ui/", 308), methods=["GET"]),
        Route("/ui/", c.page(c.overview_page), methods=["GET"]),
        Route("/ui/login", c.login_form, methods=["GET"]),
        Route("/ui/login", c.login, methods=["POST"]),
        Route("/ui/logout", c.action(c.logout, write=False), methods=["POST"]),
        Route("/ui/events", c.page(c.events_page), methods=["GET"]),
        Route("/ui/events/{id}", c.page(c.event_page), methods=["GET"]),
        Route("/ui/events/{id}/cancel", c.action(c.cancel), methods=["POST"]),
        Route("/ui/events/{id}/reschedule", c.action(c.reschedule), methods=["POST"]),
        Route("/ui/events/{id}/retry", c.action(c.retry), methods=["POST"]),
        Route("/ui/dead", c.page(c.dead_page), methods=["GET"]),
        Route("/ui/dead/replay", c.action(c.replay), methods=["POST"]),
        Route("/ui/schedules", c.page(c.schedules_page), methods=["GET"]),
        Route("/ui/schedules/{name}/pause", c.action(c.pause), methods=["POST"]),
        Route("/ui/schedules/{name}/resume", c.action(c.resume), methods=["POST"]),
        Mount("/ui/static", app=_SecuredStatic(StaticFiles(directory=STATIC)), name="static"),
    ]
