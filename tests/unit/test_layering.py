"""The layering the package docstrings promise: role plugins reach Kafka, Redis, SAQ and
PostgreSQL only through core's adapters, and no role plugin imports another (the
reconciler lives in the executor's package, with the executor it serves)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PLUGINS = Path(__file__).resolve().parents[2] / "eventsched" / "plugins"
ADAPTED = ("confluent_kafka", "saq", "redis", "psycopg", "psycopg_pool")
ROLES = {"producer", "consumer", "executor", "api"}


@functools.cache
def _tree(path: Path) -> ast.Module:
    """A module parsed once for the three tests (parsing is most of what they cost)."""
    return ast.parse(path.read_text())


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _role_of(path: Path) -> str:
    """A role is a module or a package: ``plugins/producer.py`` -> ``producer``;
    ``plugins/api/app.py`` -> ``api``."""
    return path.relative_to(PLUGINS).parts[0].removesuffix(".py")


def test_role_plugins_use_core_adapters_only() -> None:
    offending = {
        f"{path.relative_to(PLUGINS)}: {name}"
        for path in PLUGINS.rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in ADAPTED
    }
    assert offending == set()


def test_no_role_plugin_imports_another() -> None:
    offending = set()
    for path in PLUGINS.rglob("*.py"):
        role = _role_of(path)
        if role not in ROLES:
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[:2] == ["eventsched", "plugins"] and len(parts) > 2:
                other = parts[2]
                if other in ROLES and other != role:
                    offending.add(f"{role} imports {other}")
    assert offending == set()


def _part(module: str) -> str:
    """``eventsched.core.kafka.producer`` -> ``core.kafka``; ``eventsched.cli`` -> ``cli``.

    ``core.runtime`` holds both the foundation every part uses (errors, settings, logs,
    metrics) and the composition root that uses every part, so its modules count one by one:
    ``eventsched.core.runtime.settings`` -> ``core.runtime.settings``."""
    parts = module.split(".")[1:]
    if not parts:
        return "eventsched"
    if parts[:2] == ["core", "runtime"] and len(parts) > 2:
        return ".".join(parts[:3])
    if parts[0] in ("core", "plugins") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def _documented() -> dict[str, set[str]]:
    text = (PLUGINS.parents[1] / "docs" / "architecture.md").read_text()
    block = text.split("```dependencies\n", 1)[1].split("```", 1)[0]
    return {
        part: set(deps.split())
        for part, _, deps in (line.partition(":") for line in block.splitlines() if line)
    }


def test_the_imports_match_docs_architecture() -> None:
    package = PLUGINS.parent
    actual: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        part = _part(module)
        for node in ast.walk(_tree(path)):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(
                "eventsched"
            ):
                continue
            is_package = (
                node.module != "eventsched"
                and (package.parent / str(node.module).replace(".", "/")).is_dir()
            )
            targets = (
                [f"{node.module}.{alias.name}" for alias in node.names]
                if is_package
                else [str(node.module)]
            )
            for target in targets:
                if _part(target) != part:
                    actual.setdefault(part, set()).add(_part(target))
    documented = _documented()
    undocumented = {
        part: sorted(deps - documented.get(part, set()))
        for part, deps in actual.items()
        if deps - documented.get(part, set())
    }
    assert undocumented == {}, "imports missing from docs/architecture.md"
    stale = {
        part: sorted(deps - actual.get(part, set()))
        for part, deps in documented.items()
        if deps - actual.get(part, set())
    }
    assert stale == {}, "docs/architecture.md lists imports the code no longer has"
    core_to_plugins = {
        part: sorted(dep for dep in deps if dep.startswith("plugins"))
        for part, deps in actual.items()
        if part.startswith("core") and any(dep.startswith("plugins") for dep in deps)
    }
    assert core_to_plugins == {}
