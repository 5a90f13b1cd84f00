"""Operator commands that fail on their input before connecting to anything (the commands
against a running stack are in tests/integration/test_operator.py).
"""

from __future__ import annotations

import pytest

from tests.support.cli import run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--in", "5m", "--payload", "{oops"], "--payload: not valid JSON"),
        (["--in", "5m", "--payload", "[1, 2]"], "--payload: must be a JSON object"),
        (["--in", "5m", "--payload", '"text"'], "--payload: must be a JSON object"),
        (["--at", "2030-01-31T09:00:00"], "--at: '2030-01-31T09:00:00' is not an RFC 3339 time"),
        (["--at", "tomorrow"], "--at: 'tomorrow' is not an RFC 3339 time"),
        (["--at", "2030-01-31T09:00:00Z", "--in", "5m"], "--at/--in: give exactly one"),
        ([], "--at/--in: give exactly one"),
        (["--in", "soon"], "--in: expected a duration"),
        (["--in", "3650d"], "--at/--in: more than consumer.horizon"),
        (["--in", "1s", "--key", ""], "--key: "),
    ],
)
def test_send_rejects_bad_input_with_one_line_and_exit_2(args: list[str], message: str) -> None:
    # No broker is needed: the input is checked before anything is sent.
    result = run(None, "send", "--type", "t", *args)

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"eventsched: error: {message}")
    assert result.stderr.count("\n") == 1
