"""The public face: ``eventsched.__all__`` and the README's handler example, which must run
(its ``mypy --strict`` check is in tests/deploy/test_readme_example.py: it takes seconds)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

import eventsched
from tests.support.readme import handler_example


def test_everything_in_all_is_there() -> None:
    assert sorted(eventsched.__all__) == sorted(set(eventsched.__all__))
    # The client's names are loaded on first use (a role's process never loads them).
    assert [name for name in eventsched.__all__ if not hasattr(eventsched, name)] == []
    assert set(eventsched.__all__) <= set(dir(eventsched))
    assert {"HandlerEvent", "Handler", "HandlerContext", "handler_factory", "PermanentError",
            "new_event", "encode_event", "kafka_key", "kafka_headers", "__version__",
            "Client", "AsyncClient", "ClientError", "DeliveryError"} <= set(
        eventsched.__all__
    )  # fmt: skip


def test_the_readme_handler_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {}
    exec(compile(handler_example(), "README example", "exec"), namespace)
    place_order = namespace["place_order"]
    event = eventsched.HandlerEvent(
        id="01a2", type="order.placed", payload={"order_id": "A-1"},
        execute_at=datetime.now(UTC), attempt=2,
    )  # fmt: skip
    asyncio.run(place_order(event))  # type: ignore[operator]
    assert "placing order A-1, attempt 2, idempotency key 01a2" in capsys.readouterr().out
    with pytest.raises(eventsched.PermanentError, match="no order_id"):
        asyncio.run(place_order(eventsched.HandlerEvent("x", "t", {}, event.execute_at, 1)))  # type: ignore[operator]
    from eventsched.core.domain.handler import is_handler_factory

    assert is_handler_factory(namespace["notify_shipping"])
    assert not is_handler_factory(place_order)
