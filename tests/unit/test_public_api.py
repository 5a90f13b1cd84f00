"""The public face: ``eventsched.__all__`` and the README's handler example, which must
type-check under ``mypy --strict`` against the installed package and run."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

import eventsched

REPO = Path(__file__).resolve().parents[2]


def _readme_handler_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Writing a handler", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_everything_in_all_is_there() -> None:
    assert sorted(eventsched.__all__) == sorted(set(eventsched.__all__))
    assert [name for name in eventsched.__all__ if name not in vars(eventsched)] == []
    assert {"HandlerEvent", "Handler", "HandlerContext", "handler_factory", "PermanentError",
            "new_event", "encode_event", "kafka_key", "kafka_headers", "__version__"} <= set(
        eventsched.__all__
    )  # fmt: skip


def test_the_readme_handler_example_type_checks_strictly(tmp_path: Path) -> None:
    example = tmp_path / "myapp_handlers.py"
    example.write_text(_readme_handler_example())
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(example)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_readme_handler_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {}
    exec(compile(_readme_handler_example(), "README example", "exec"), namespace)
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
