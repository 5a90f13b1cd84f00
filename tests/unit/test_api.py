"""The api role's pure parts: the ``[api]`` checks, tokens, request bodies, transitions, the
list cursor and the OpenAPI document (no servers: the HTTP behaviour is in
tests/integration/test_api.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from eventsched.core.domain.commands import refusal
from eventsched.core.domain.event import STATUSES
from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.root import expand_roles
from eventsched.core.runtime.sections import ApiSettings, ApiToken
from eventsched.core.runtime.settings import build_settings
from eventsched.plugins.api import Api
from eventsched.plugins.api.auth import check_api_settings, is_loopback, load_tokens
from eventsched.plugins.api.openapi import document
from eventsched.plugins.api.schemas import ApiError, ScheduleRequest, decode_body
from eventsched.plugins.api.views import decode_cursor, encode_cursor

TOKEN = "t" * 20


def test_the_openapi_document_is_valid_openapi_3_1() -> None:
    # Imported here: the validator pulls in jsonschema and pydantic (a third of a second
    # the rest of the unit tier need not pay at collection).
    from openapi_spec_validator import validate

    doc = document(1_048_576, 500, 500)
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_all_does_not_include_the_api_role() -> None:
    assert expand_roles(["all"]) == ["producer", "consumer", "executor"]
    assert expand_roles(["api", "consumer"]) == ["consumer", "api"]


@pytest.mark.parametrize(
    ("api", "key"),
    [
        (ApiSettings(), "api.tokens"),
        (ApiSettings(auth="none", host="0.0.0.0"), "api.auth"),
        (ApiSettings(tokens=(ApiToken(name="a"),)), "api.tokens[0]"),
        (ApiSettings(tokens=(ApiToken(name="a", token=TOKEN, token_file="/x"),)), "api.tokens[0]"),
        (ApiSettings(tokens=(ApiToken(name="a", token="short"),)), "api.tokens[0]"),
        (ApiSettings(tokens=(ApiToken(name="a", token=TOKEN + " x"),)), "api.tokens[0]"),
        (
            ApiSettings(
                tokens=(ApiToken(name="a", token=TOKEN), ApiToken(name="a", token="u" * 20))
            ),
            "api.tokens[1].name",
        ),
        (
            ApiSettings(tokens=(ApiToken(name="a", token=TOKEN), ApiToken(name="b", token=TOKEN))),
            "api.tokens[1]",
        ),
        (
            ApiSettings(tokens=(ApiToken(name="a", token_file="/nonexistent"),)),
            "api.tokens[0].token_file",
        ),
    ],
)
def test_settings_the_role_refuses_name_the_key_but_never_the_token(
    api: ApiSettings, key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        check_api_settings(api)
    assert caught.value.key == key
    assert TOKEN not in str(caught.value)


def test_settings_the_role_accepts(tmp_path: Path) -> None:
    check_api_settings(ApiSettings(auth="none"))
    check_api_settings(ApiSettings(auth="none", host="::1"))
    (tmp_path / "t").write_text(f"  {TOKEN}\n")
    check_api_settings(ApiSettings(tokens=(ApiToken(name="f", token_file=str(tmp_path / "t")),)))
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and not is_loopback("10.0.0.1")


def test_check_settings_is_the_runtime_hook() -> None:
    settings = build_settings({"api": {"tokens": [{"name": "ci", "token": TOKEN}]}})
    Api.check_settings(settings)
    assert TOKEN not in repr(settings)
    with pytest.raises(ConfigError, match=r"api\.tokens"):
        Api.check_settings(build_settings({}))


def test_tokens_find_the_caller() -> None:
    tokens = load_tokens(
        (ApiToken(name="w", token=TOKEN), ApiToken(name="r", token="r" * 20, read_only=True))
    )
    assert tokens.check(f"Bearer {TOKEN}") == tokens.check(f"bearer  {TOKEN} ")
    caller = tokens.check(f"Bearer {TOKEN}")
    assert caller is not None and (caller.name, caller.read_only) == ("w", False)
    reader = tokens.check("Bearer " + "r" * 20)
    assert reader is not None and reader.read_only
    for header in (None, "", "Bearer", "Bearer ", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
        assert tokens.check(header) is None, header


def test_a_body_with_several_bad_fields_names_each() -> None:
    with pytest.raises(ApiError) as caught:
        decode_body(b'{"type": 1, "payload": "x", "extra": true, "delay_ms": 1.5}', ScheduleRequest)
    assert caught.value.status == 422
    assert {f.field for f in caught.value.fields} == {"type", "payload", "extra", "delay_ms"}
    body = decode_body(b'{"type": "t", "payload": {}, "delay_ms": 5}', ScheduleRequest)
    assert (body.type, body.delay_ms, body.execute_at) == ("t", 5, None)


def test_transitions() -> None:
    allowed = {
        (op, status)
        for op in ("cancel", "reschedule", "retry")
        for status in STATUSES
        if refusal(op, status) is None  # type: ignore[arg-type]
    }
    assert allowed == {
        ("cancel", "scheduled"),
        ("cancel", "running"),
        ("cancel", "retrying"),
        ("reschedule", "scheduled"),
        ("reschedule", "retrying"),
        ("retry", "dead"),
        ("retry", "cancelled"),
    }


def test_the_cursor_round_trips_and_refuses_others() -> None:
    when, ident = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC), uuid.uuid4()
    assert decode_cursor(encode_cursor(when, ident)) == (when, ident)
    for bad in ("", "garbage", "W10", encode_cursor(when, ident)[:-3]):
        with pytest.raises(ValueError):
            decode_cursor(bad)


def test_the_api_keeps_a_margin_below_the_consumers_max_past() -> None:
    from eventsched.core.domain.decode import DecodeLimits
    from eventsched.plugins.api.app import PAST_MARGIN, api_limits

    consumer = DecodeLimits(max_past=3600.0, horizon=86_400.0, max_message_bytes=10)
    limits = api_limits(consumer)
    assert limits.max_past == 3600.0 - PAST_MARGIN
    assert (limits.horizon, limits.max_message_bytes) == (86_400.0, 10)
    assert api_limits(DecodeLimits(max_past=1.0)).max_past == 0.0
