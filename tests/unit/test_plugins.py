"""Plugin loading: a bad import path or a wrong interface fails fast, naming the key."""

from __future__ import annotations

import pytest

from eventsched.core.runtime.contracts import load_handler, load_role_factory
from eventsched.core.runtime.errors import PluginError
from tests.support import roles


def test_loads_a_valid_role() -> None:
    factory = load_role_factory("producer", "tests.support.roles:DrainingRole")
    assert factory.__name__ == "DrainingRole"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nocolon", "invalid plugin plugins.producer = 'nocolon': expected 'module:attr'"),
        (
            "no.such.module:X",
            "invalid plugin plugins.producer = 'no.such.module:X': cannot import module 'no.such.module': No module named 'no'",
        ),
        (
            "tests.support.roles:Missing",
            "invalid plugin plugins.producer = 'tests.support.roles:Missing': module 'tests.support.roles' has no attribute 'Missing'",
        ),
        (
            "tests.support.roles:NotARole",
            "invalid plugin plugins.producer = 'tests.support.roles:NotARole': class has no 'async def run(self, *, task_status)' method",
        ),
        (
            "tests.support.roles:BadNeeds",
            "invalid plugin plugins.producer = 'tests.support.roles:BadNeeds': 'needs' must be a frozenset of ['kafka', 'kafka_producer', 'postgres', 'redis']",
        ),
        ("os:sep", "invalid plugin plugins.producer = 'os:sep': is not callable"),
    ],
)
def test_bad_role_plugins(target: str, message: str) -> None:
    with pytest.raises(PluginError) as info:
        load_role_factory("producer", target)
    assert str(info.value) == message


def test_loads_a_handler() -> None:
    handler = load_handler("handlers.default", "tests.support.roles:good_handler")
    assert handler is roles.good_handler


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("tests.support.roles:sync_handler", "must be an async function taking one HandlerEvent"),
        ("tests.support.roles:two_arg_handler", "must accept exactly one argument (the event)"),
        ("tests.support.roles:nothing", "has no attribute 'nothing'"),
    ],
)
def test_bad_handlers(target: str, problem: str) -> None:
    with pytest.raises(PluginError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        load_handler("handlers.x", target)
