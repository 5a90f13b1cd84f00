"""The layering the package docstrings promise: role plugins reach Kafka, Redis, SAQ and
PostgreSQL only through core's adapters, and no role plugin imports another (the
reconciler, which lives with the executor it serves, is the one exception)."""

from __future__ import annotations

import ast
from pathlib import Path

PLUGINS = Path(__file__).resolve().parents[1] / "eventsched" / "plugins"
ADAPTED = ("confluent_kafka", "saq", "redis", "psycopg", "psycopg_pool")
ROLES = {"producer", "consumer", "executor", "reconciler"}
ALLOWED = {("executor", "reconciler")}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_role_plugins_use_core_adapters_only() -> None:
    offending = {
        f"{path.name}: {name}"
        for path in PLUGINS.glob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in ADAPTED
    }
    assert offending == set()


def test_no_role_plugin_imports_another() -> None:
    offending = set()
    for path in PLUGINS.glob("*.py"):
        if path.stem not in ROLES:
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[:2] == ["eventsched", "plugins"] and len(parts) > 2:
                other = parts[2]
                if other in ROLES and other != path.stem and (path.stem, other) not in ALLOWED:
                    offending.add(f"{path.stem} imports {other}")
    assert offending == set()
