"""Settings files for child processes (``eventsched --settings FILE``), from tests and bench/."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_settings(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """A settings file layered over config/settings.toml: ``[default.<section>]`` tables
    (a dotted section such as ``kafka.client`` is a sub-table), nested dicts as sub-tables,
    keys quoted so that ``session.timeout.ms`` stays one key."""
    lines: list[str] = []

    def table(name: str, values: Mapping[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = {k: v for k, v in values.items() if isinstance(v, Mapping)}
        for key, value in values.items():
            if key not in nested:
                lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
        for key, value in nested.items():
            table(f"{name}.{json.dumps(key)}", value)

    for section, values in sections.items():
        table(f"default.{section}", values)
    path.write_text("\n".join(lines) + "\n")
    return path
