"""Every log event name is snake_case (a stable key for log queries and alerts)."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "eventsched"
# A logging call whose first argument is a string literal, possibly on the next line.
_CALL = re.compile(
    r"\b(?:log|_log|logger)\.(?:debug|info|warning|error|exception|critical|log)\(\s*"
    r"(?:[\w.]+,\s*)?\"([^\"]*)\""
)


def test_every_log_event_name_is_snake_case() -> None:
    found: list[tuple[str, str]] = []
    bad: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for match in _CALL.finditer(path.read_text()):
            found.append((path.name, match.group(1)))
            if not re.fullmatch(r"[a-z][a-z0-9_]*", match.group(1)):
                bad.append(f"{path.relative_to(PACKAGE.parent)}: {match.group(1)!r}")
    assert len(found) > 100, "the pattern no longer finds the logging calls"
    assert bad == []
